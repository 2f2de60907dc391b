"""Deploy-friendly SmolVLM / Idefics3 (one code for both: the same tower, connector and checkpoint layout).

- `DeployVision`: the SigLIP-style tower for a fixed number of T tiles per call. The host cuts each tile into
  patches, so the Conv2d patch embedding is a matmul. Positions are a static table: every tile is full, so
  transformers' bucketised position ids are a fixed list, computed once when the weights load (its bucketize
  lookup compiles to wrong numbers in TVM and is never exported). LayerNorm blocks with q/k/v/out projections and
  an fc1/fc2 MLP attend within each tile through per-row key ranges, then post_layernorm, the pixel shuffle by the
  config's scale factor and the connector's linear give [T * tokens_per_tile, text hidden], in chunks.
- The language model is the shared decoder (Llama or Qwen3 by the text config) with 1-D RoPE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ....compile.ops import attention_op
from ....compile.quantize import Scheme
from ..qwen2_5_vl.model import (SHARDING, DeployLanguageModel, iter_weights,
                                load_streaming, shard_plan, text_loaders)
from ..qwen2_vl.model import VisionMLP

PREFIXES = {  # checkpoint prefix -> deploy prefix, per part
    "vision": (("model.vision_model.embeddings.patch_embedding.", "patch_embed."),
               ("model.vision_model.embeddings.", ""), ("model.vision_model.encoder.layers.", "layers."),
               ("model.vision_model.", ""), ("model.connector.modality_projection.", "connector.")),
    "text": (("model.text_model.", ""), ("lm_head.", "lm_head.")),
}


def position_ids(grid: int) -> torch.Tensor:
    """The position-table rows of a full tile of grid x grid patches, computed as transformers' NaViT embeddings
    do for a full patch mask (fractional coordinates bucketised against the table's boundaries)."""
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    coords = torch.clamp(torch.arange(grid, dtype=torch.float32) * (1.0 / torch.tensor(float(grid))), max=1.0 - 1e-6)
    buckets = torch.bucketize(coords, boundaries, right=True)
    return (buckets[:, None] * grid + buckets[None, :]).reshape(-1)


class VisionAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        dim = c.hidden_size
        self.num_heads, self.head_dim = c.num_attention_heads, dim // c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.fused = True

    def forward(self, x, ranges):
        n = x.shape[0]
        q, k, v = (p(x).reshape(n, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention_op(self.fused)(q, k, v, ranges).reshape(n, -1))


class EncoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c.hidden_size, c.intermediate_size, c.hidden_act)

    def forward(self, x, ranges):
        x = x + self.self_attn(self.layer_norm1(x), ranges)
        return x + self.mlp(self.layer_norm2(x))


class Connector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x):
        return self.proj(x)


class DeployVision(nn.Module):
    """The tower and connector for T tiles: pixel_values [T * N, 3 * P * P] (each tile's N patches, row-major,
    flattened as (channel, row, column)) and full_ranges int32 [T * N, 2] (each row's tile; empty for padding
    tiles) -> chunks of the image tokens [T * N / scale^2, text hidden]."""

    INPUTS = ("pixel_values", "full_ranges")

    def __init__(self, config, chunks: Sequence[int] | None = None):
        super().__init__()
        c = config.vision_config
        self.grid = c.image_size // c.patch_size
        self.patch_dim = c.num_channels * c.patch_size * c.patch_size
        self.scale = int(config.scale_factor)
        out_hidden = config.text_config.hidden_size
        self.chunks = list(chunks) if chunks else [out_hidden]
        if sum(self.chunks) != out_hidden:
            raise ValueError(f"output chunks {self.chunks} do not add up to the hidden size {out_hidden}")
        self.patch_embed = nn.Linear(self.patch_dim, c.hidden_size)
        self.position_table = nn.Parameter(torch.zeros(self.grid * self.grid, c.hidden_size))  # see position_ids
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.connector = Connector(c.hidden_size * self.scale ** 2, out_hidden)
        self.tokens_per_tile = self.grid * self.grid // self.scale ** 2

    def example_inputs(self, tiles: int) -> dict[str, torch.Tensor]:
        n = self.grid * self.grid
        rows = torch.arange(tiles, dtype=torch.int32).repeat_interleave(n) * n
        return {"pixel_values": torch.zeros(tiles * n, self.patch_dim),
                "full_ranges": torch.stack([rows, rows + n], dim=1).contiguous()}

    @property
    def output_groups(self) -> list[dict]:
        return [{"name": "embeddings", "count": 1, "chunks": self.chunks}]

    def pixel_shuffle(self, x):
        """The connector's order: [T, N, C] -> [T, N / s^2, C * s^2]."""
        t, n, c = x.shape
        g, s = self.grid, self.scale
        x = x.reshape(t, g, g // s, c * s).permute(0, 2, 1, 3)
        x = x.reshape(t, g // s, g // s, c * s * s).permute(0, 2, 1, 3)
        return x.reshape(t, n // (s * s), c * s * s)

    def forward(self, pixel_values, full_ranges):
        n = self.grid * self.grid
        tiles = pixel_values.shape[0] // n
        x = (self.patch_embed(pixel_values).reshape(tiles, n, -1) + self.position_table).reshape(tiles * n, -1)
        for layer in self.layers:
            x = layer(x, full_ranges)
        x = self.pixel_shuffle(self.post_layernorm(x).reshape(tiles, n, -1))
        x = self.connector(x.reshape(tiles * self.tokens_per_tile, -1))
        return tuple(torch.split(x, self.chunks, dim=-1))


def load_vision(checkpoint_dir, config, chunks=None, scheme: Scheme | None = None) -> DeployVision:
    with torch.device("meta"):
        model = DeployVision(config, chunks)
    rows = position_ids(model.grid)

    def weights():
        for key, tensor in iter_weights(checkpoint_dir, "vision", prefixes=PREFIXES):
            if key == "patch_embed.weight":  # Conv2d with stride == kernel is a matmul
                tensor = tensor.reshape(tensor.shape[0], -1)
            elif key == "position_embedding.weight":  # the full tile's rows, in patch order
                key, tensor = "position_table", tensor[rows]
            yield key, tensor
    return load_streaming(model, weights(), scheme or Scheme())


load_language_model, embedding_table = text_loaders(PREFIXES)


__all__ = ["PREFIXES", "SHARDING", "DeployLanguageModel", "DeployVision", "embedding_table", "load_language_model",
           "load_vision", "shard_plan"]
