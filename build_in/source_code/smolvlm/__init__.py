"""SmolVLM (and, through `idefics3`, Idefics3): the longest edge resized, tiles plus a global image (LANCZOS), a
SigLIP-style tower with a static position table, pixel shuffle and a linear connector, and a Llama or Qwen3
language model with 1-D RoPE."""

from __future__ import annotations

from pathlib import Path

from vlmc.runtime.cpu_ops.tiles import TileConfig

from ..qwen2_5_vl import load_config, read_json, special_tokens, tiled_host_spec
from . import reference
from .checkpoint import PRESETS, TEXT_MODELS, write_checkpoint
from .model import (SHARDING, DeployLanguageModel, DeployVision, embedding_table, load_language_model, load_vision,
                    shard_plan)

MODEL_TYPES = ("smolvlm",)


def tile_config(checkpoint_dir, config) -> TileConfig:
    """The Idefics3/SmolVLM processor's settings and prompt tokens (from the tokenizer's config where it names
    them)."""
    checkpoint_dir = Path(checkpoint_dir)
    pre = read_json(checkpoint_dir / "preprocessor_config.json")
    tokens = special_tokens(checkpoint_dir)
    v = config.vision_config
    tile = int((pre.get("max_image_size") or {}).get("longest_edge", v.image_size))
    if tile != v.image_size:
        raise ValueError(f"{checkpoint_dir}: tiles of {tile} px do not match the tower's image_size {v.image_size}")
    if not pre.get("do_image_splitting", True):
        raise ValueError(f"{checkpoint_dir}: do_image_splitting false (one resized image) is not supported")
    edge = int((pre.get("size") or {}).get("longest_edge", 4 * tile))
    per_side = -(-edge // tile)
    tokens_per_tile = (tile // v.patch_size) ** 2 // int(config.scale_factor) ** 2
    image = tokens.get("image_token", "<image>")
    return TileConfig(
        tile_size=tile, patch_size=v.patch_size, tokens_per_tile=tokens_per_tile, tiling="longest_edge",
        max_tiles=per_side * per_side, longest_edge=edge, resample=int(pre.get("resample", 1)),
        image_mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
        rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
        prompt={"format": "tile_grid", "placeholder": image, "image": image,
                "fake": tokens.get("fake_image_token", "<fake_token_around_image>"),
                "global": tokens.get("global_image_token", "<global-img>"), "row_col": "<row_{row}_col_{col}>"})


host_spec = tiled_host_spec(tile_config)


__all__ = ["MODEL_TYPES", "PRESETS", "SHARDING", "TEXT_MODELS", "DeployLanguageModel", "DeployVision",
           "embedding_table", "host_spec", "reference", "load_config", "load_language_model", "load_vision",
           "shard_plan", "write_checkpoint"]
