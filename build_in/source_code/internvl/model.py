"""Deploy-friendly InternVL (transformers' native "-hf" layout).

- `DeployVision`: InternViT for a fixed number of T tiles per call. The host cuts each tile into patches, so the
  Conv2d patch embedding is a matmul. A CLS token is put in front of each tile's patches and the learned position
  table is added as it is (tiles are always the native size, so no interpolation). LayerNorm (or RMSNorm) blocks
  follow, with separate q/k/v, optional q/k RMSNorm over the full width, layer scales and an fc1/fc2 MLP. Attention
  stays within each tile through per-row key ranges. Then the CLS token is dropped, InternVL's pixel shuffle
  runs, and the LayerNorm-Linear-GELU-Linear projector gives [T * tokens_per_tile, text hidden], in chunks.
- The language model is the shared decoder (Qwen2 or Qwen3 by the text config) with 1-D RoPE (three equal position
  rows on the host).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ....compile.ops import attention_op
from ....compile.quantize import Scheme
from ..qwen2_5_vl.model import (SHARDING, DeployLanguageModel, RMSNorm, iter_weights,
                                load_streaming, shard_plan, text_loaders)
from ..qwen2_vl.model import VisionMLP

PREFIXES = {  # checkpoint prefix -> deploy prefix, per part (transformers 5 saves InternVL's legacy layout)
    "vision": (("vision_tower.embeddings.patch_embeddings.projection.", "patch_embed."),
               ("vision_tower.embeddings.", ""), ("vision_tower.encoder.layer.", "layers."),
               ("vision_tower.layernorm.", "post_layernorm."), ("multi_modal_projector.", "projector.")),
    "text": (("language_model.model.", ""), ("language_model.lm_head.", "lm_head."),
             ("model.language_model.", ""), ("lm_head.", "lm_head.")),
}


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rms_norm":
        return RMSNorm(dim, eps)
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown InternViT norm_type {kind!r}")


class VisionAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        dim = c.hidden_size
        self.num_heads, self.head_dim = c.num_attention_heads, dim // c.num_attention_heads
        self.q_proj = nn.Linear(dim, dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(dim, dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(dim, dim, bias=c.attention_bias)
        self.projection_layer = nn.Linear(dim, dim)
        self.qk_norm = bool(c.use_qk_norm)
        if self.qk_norm:  # InternViT-6B: RMSNorm over the full width, before the heads split
            self.q_norm, self.k_norm = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6)
        self.fused = True

    def forward(self, x, ranges):
        n = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(n, self.num_heads, self.head_dim) for t in (q, k, v))
        return self.projection_layer(attention_op(self.fused)(q, k, v, ranges).reshape(n, -1))


class VisionLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = VisionAttention(c)
        self.mlp = VisionMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.layernorm_before = _norm(c.norm_type, c.hidden_size, c.layer_norm_eps)
        self.layernorm_after = _norm(c.norm_type, c.hidden_size, c.layer_norm_eps)
        self.lambda_1 = nn.Parameter(torch.ones(c.hidden_size))
        self.lambda_2 = nn.Parameter(torch.ones(c.hidden_size))

    def forward(self, x, ranges):
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x), ranges)
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.layer_norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class DeployVision(nn.Module):
    """InternVL's tower and projector for T tiles: pixel_values [T * N, 3 * P * P] (each tile's N patches,
    row-major, flattened as (channel, row, column)) and full_ranges int32 [T * (N + 1), 2] (each row's tile; empty
    for padding tiles) -> chunks of the image tokens [T * tokens_per_tile, text hidden]."""

    INPUTS = ("pixel_values", "full_ranges")

    def __init__(self, config, chunks: Sequence[int] | None = None):
        super().__init__()
        c = config.vision_config
        if config.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not "
                             f"supported (only 'default': the CLS token dropped)")
        size, patch = c.image_size[0], c.patch_size[0]
        self.grid = size // patch  # patches per tile side
        self.patch_dim = c.num_channels * patch * patch
        self.scale = config.downsample_ratio
        out_hidden = config.text_config.hidden_size
        self.chunks = list(chunks) if chunks else [out_hidden]
        if sum(self.chunks) != out_hidden:
            raise ValueError(f"output chunks {self.chunks} do not add up to the hidden size {out_hidden}")
        self.patch_embed = nn.Linear(self.patch_dim, c.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, c.hidden_size))
        # hidden_states[k] is the output of layer k - 1 (0: the embeddings); -1 is the last layer, normalised
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer {layer!r}: only one layer is supported")
        depth = c.num_hidden_layers if layer == -1 else (layer % (c.num_hidden_layers + 1))
        self.layers = nn.ModuleList(VisionLayer(c) for _ in range(depth))
        self.post_layernorm = (nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
                               if layer == -1 and not c.use_mean_pooling else None)
        merged = int(c.hidden_size / self.scale ** 2)
        self.projector = Projector(merged, out_hidden, config.projector_hidden_act)
        self.tokens_per_tile = int(self.grid * self.scale) ** 2

    def example_inputs(self, tiles: int) -> dict[str, torch.Tensor]:
        n = self.grid * self.grid
        rows = torch.arange(tiles, dtype=torch.int32).repeat_interleave(n + 1) * (n + 1)
        return {"pixel_values": torch.zeros(tiles * n, self.patch_dim),
                "full_ranges": torch.stack([rows, rows + n + 1], dim=1).contiguous()}

    @property
    def output_groups(self) -> list[dict]:
        return [{"name": "embeddings", "count": 1, "chunks": self.chunks}]

    def pixel_shuffle(self, x):
        """InternVL's order: [T, w, h, C] -> [T, h * s, w * s, C / s^2] (the two transposes of transformers')."""
        t, w, h, c = x.shape
        s = self.scale
        x = x.reshape(t, w, int(h * s), int(c / s)).permute(0, 2, 1, 3)
        x = x.reshape(t, int(h * s), int(w * s), int(c / (s * s))).permute(0, 2, 1, 3)
        return x

    def forward(self, pixel_values, full_ranges):
        n = self.grid * self.grid
        tiles = pixel_values.shape[0] // n
        x = self.patch_embed(pixel_values).reshape(tiles, n, -1)
        x = torch.cat([self.cls_token.expand(tiles, 1, x.shape[-1]), x], dim=1) + self.position_embeddings
        x = x.reshape(tiles * (n + 1), -1)
        for layer in self.layers:
            x = layer(x, full_ranges)
        if self.post_layernorm is not None:
            x = self.post_layernorm(x)
        x = x.reshape(tiles, n + 1, -1)[:, 1:].reshape(tiles, self.grid, self.grid, -1)
        x = self.pixel_shuffle(x)
        x = self.projector(x.reshape(tiles * self.tokens_per_tile, -1))
        return tuple(torch.split(x, self.chunks, dim=-1))


def load_vision(checkpoint_dir, config, chunks=None, scheme: Scheme | None = None) -> DeployVision:
    with torch.device("meta"):
        model = DeployVision(config, chunks)
    wanted = set(model.state_dict())

    def weights():
        for key, tensor in iter_weights(checkpoint_dir, "vision", prefixes=PREFIXES):
            if key == "patch_embed.weight":  # Conv2d with stride == kernel is a matmul
                tensor = tensor.reshape(tensor.shape[0], -1)
            if key in wanted:  # layers past vision_feature_layer are not needed
                yield key, tensor
    return load_streaming(model, weights(), scheme or Scheme())


load_language_model, embedding_table = text_loaders(PREFIXES)


__all__ = ["PREFIXES", "SHARDING", "DeployLanguageModel", "DeployVision", "embedding_table", "load_language_model",
           "load_vision", "shard_plan"]
