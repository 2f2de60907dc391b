"""Deploy-friendly Qwen2-VL: the vision tower differs from Qwen2.5-VL's, the language model (Qwen2) does not.

- `DeployVision`: patch embed as a matmul; LayerNorm blocks with a fc1/fc2 MLP (the config's activation,
  quick_gelu in the real models) and full attention over the image in every block; a LayerNorm merger. Inputs and
  output come as in Qwen2.5-VL's tower (see its model.py) minus the window ranges: with no windows the host keeps
  the processor's patch order.
- The language model, its sharding plan, the streaming loader and the checkpoint layout are Qwen2.5-VL's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ....compile.quantize import Scheme
from ..qwen2_5_vl.model import (SHARDING, DeployLanguageModel, PatchMerger, VisionAttention, VisionTower,
                                embedding_table, iter_weights, load_language_model, load_streaming, shard_plan)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """LayerNorm, attention, LayerNorm, `mlp` (Qwen2-VL's fc1/fc2, Qwen3-VL's linear_fc1/linear_fc2)."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x, ranges, cos, sin):
        x = x + self.attn(self.norm1(x), ranges, cos, sin)
        return x + self.mlp(self.norm2(x))


class DeployVision(VisionTower):
    """Vision tower for one image padded to a fixed patch budget N: pixel_values [N, patch_dim] in the processor's
    order, full_ranges int32 [N, 2] (the image's patches; empty for padding), cos and sin [N, head_dim] -> chunks
    of the merged embeddings [N / merge_unit, text hidden]."""

    INPUTS = ("pixel_values", "full_ranges", "cos", "sin")

    def __init__(self, vision_config, chunks: Sequence[int] | None = None):
        super().__init__()
        c = vision_config
        self._set_shapes(c, c.embed_dim, c.hidden_size, chunks)
        self.patch_embed = nn.Linear(self.patch_dim, c.embed_dim, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(c.embed_dim, c.num_heads,
                                                VisionMLP(c.embed_dim, int(c.embed_dim * c.mlp_ratio), c.hidden_act))
                                    for _ in range(c.depth))
        self.merger = PatchMerger(c.hidden_size, c.embed_dim, c.spatial_merge_size,
                                  norm=lambda d: nn.LayerNorm(d, eps=1e-6))

    def forward(self, pixel_values, full_ranges, cos, sin):
        x = self.patch_embed(pixel_values)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        for block in self.blocks:
            x = block(x, full_ranges, cos, sin)
        return tuple(torch.split(self.merger(x), self.chunks, dim=-1))


def load_vision(checkpoint_dir, config, chunks=None, scheme: Scheme | None = None) -> DeployVision:
    with torch.device("meta"):
        model = DeployVision(config.vision_config, chunks)
    # Conv3d with stride == kernel is a matmul: its weight flattened to [out, in * t * p * p]
    weights = ((("patch_embed.weight", t.reshape(t.shape[0], -1)) if k == "patch_embed.proj.weight" else (k, t))
               for k, t in iter_weights(checkpoint_dir, "vision"))
    return load_streaming(model, weights, scheme or Scheme())


__all__ = ["SHARDING", "DeployLanguageModel", "DeployVision", "embedding_table", "load_language_model",
           "load_vision", "shard_plan"]
