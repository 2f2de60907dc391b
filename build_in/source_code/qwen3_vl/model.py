"""Deploy-friendly Qwen3-VL (dense): a new vision tower and Qwen3 attention on the shared decoder.

- `DeployVision`: 16-px patches through the Conv3d (with bias) as a matmul; the learned square position table,
  resampled to each image's grid as a gather of 4 bilinear taps whose indices and weights the host computes
  (`pos_index`, `pos_weight`); LayerNorm blocks with a fc1/fc2 MLP and full attention; the merger (LayerNorm before
  the 2x2 merge) and the deepstack mergers (LayerNorm after it) on the outputs of `deepstack_visual_indexes`.
  Two output groups: "embeddings" and "deepstack" (one tensor per deepstack layer).
- The language model is the shared decoder with Qwen3's options: RMSNorm of each query and key head, no qkv bias,
  the config's head_dim, and the deepstack features added after each of the first layers in prompt graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ....compile.quantize import Scheme
from ..qwen2_5_vl.model import (SHARDING, VisionTower, embedding_table, iter_weights, load_streaming, shard_plan,
                                visual_example_inputs)
from ..qwen2_vl.model import VisionBlock
from ..qwen2_5_vl.model import DeployLanguageModel, decoder_options
from ..qwen2_5_vl.model import load_language_model as _load_decoder


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.linear_fc1 = nn.Linear(dim, hidden)
        self.act = ACT2FN[act]
        self.linear_fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class PatchMerger(nn.Module):
    """LayerNorm, 2x2 merge, fc-GELU-fc; the deepstack mergers normalise after the merge (`post_norm`)."""

    def __init__(self, out_dim: int, dim: int, merge_size: int, post_norm: bool):
        super().__init__()
        self.merged_dim = dim * merge_size * merge_size
        self.post_norm = post_norm
        self.norm = nn.LayerNorm(self.merged_dim if post_norm else dim, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.act_fn = nn.GELU()
        self.linear_fc2 = nn.Linear(self.merged_dim, out_dim)

    def forward(self, x):
        x = self.norm(x.reshape(-1, self.merged_dim)) if self.post_norm else self.norm(x).reshape(-1, self.merged_dim)
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class DeployVision(VisionTower):
    """Vision tower for one image padded to N patches: pixel_values [N, patch_dim] in the processor's order,
    full_ranges int32 [N, 2], cos and sin [N, head_dim], pos_index int32 [N, 4] and pos_weight [N, 4] (the position
    table's bilinear taps; zero weight on padding) -> chunks of the merged embeddings, then the chunks of each
    deepstack feature, [N / merge_unit, text hidden] each."""

    INPUTS = ("pixel_values", "full_ranges", "cos", "sin", "pos_index", "pos_weight")

    def __init__(self, vision_config, chunks: Sequence[int] | None = None):
        super().__init__()
        c = vision_config
        self._set_shapes(c, c.hidden_size, c.out_hidden_size, chunks)
        self.patch_embed = nn.Linear(self.patch_dim, c.hidden_size)
        self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(c.hidden_size, c.num_heads,
                                                VisionMLP(c.hidden_size, c.intermediate_size, c.hidden_act))
                                    for _ in range(c.depth))
        self.merger = PatchMerger(c.out_hidden_size, c.hidden_size, c.spatial_merge_size, post_norm=False)
        self.deepstack_visual_indexes = list(c.deepstack_visual_indexes)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(c.out_hidden_size, c.hidden_size, c.spatial_merge_size, post_norm=True)
            for _ in self.deepstack_visual_indexes)

    def example_inputs(self, budget: int) -> dict[str, torch.Tensor]:
        inputs = visual_example_inputs(self.INPUTS[:4], budget, self.patch_dim, self.head_dim)
        return {**inputs, "pos_index": torch.zeros(budget, 4, dtype=torch.int32), "pos_weight": torch.zeros(budget, 4)}

    @property
    def output_groups(self) -> list[dict]:
        return [{"name": "embeddings", "count": 1, "chunks": self.chunks},
                {"name": "deepstack", "count": len(self.deepstack_visual_indexes), "chunks": self.chunks}]

    def forward(self, pixel_values, full_ranges, cos, sin, pos_index, pos_weight):
        n = pixel_values.shape[0]
        # pos_index holds flat table rows in [0, num_position_embeddings) by construction (host taps are clamped
        # to the table's edge; padding rows use row 0 with weight 0), so the gather is in bounds.
        taps = self.pos_embed(pos_index.reshape(-1)).reshape(n, 4, -1)
        x = self.patch_embed(pixel_values) + (taps * pos_weight[:, :, None]).sum(1)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x, full_ranges, cos, sin)
            if i in self.deepstack_visual_indexes:
                feature = self.deepstack_merger_list[self.deepstack_visual_indexes.index(i)](x)
                outputs.append(feature)
        merged = self.merger(x)
        return tuple(part for y in (merged, *outputs) for part in torch.split(y, self.chunks, dim=-1))


def load_vision(checkpoint_dir, config, chunks=None, scheme: Scheme | None = None) -> DeployVision:
    with torch.device("meta"):
        model = DeployVision(config.vision_config, chunks)

    def weights():
        for key, tensor in iter_weights(checkpoint_dir, "vision"):
            if key.startswith("patch_embed.proj."):  # Conv3d with stride == kernel is a matmul
                key = "patch_embed." + key.rpartition(".")[2]
                tensor = tensor.reshape(tensor.shape[0], -1) if tensor.ndim > 1 else tensor
            yield key, tensor
    return load_streaming(model, weights(), scheme or Scheme())


def load_language_model(checkpoint_dir, text_config, tp: int = 1, rank: int = 0, all_reduce: Callable | None = None,
                        scheme: Scheme | None = None) -> DeployLanguageModel:
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(str(checkpoint_dir)).vision_config
    options = decoder_options(text_config, len(vision.deepstack_visual_indexes))
    return _load_decoder(checkpoint_dir, text_config, tp, rank, all_reduce, scheme, options)


__all__ = ["SHARDING", "DeployLanguageModel", "DeployVision", "embedding_table", "load_language_model", "load_vision",
           "shard_plan"]
