"""InternVL (transformers' native "-hf" checkpoints): tiles chosen by aspect ratio plus a thumbnail, InternViT with
a CLS token and learned positions, pixel shuffle and an MLP projector, and a Qwen2 or Qwen3 language model with
1-D RoPE."""

from __future__ import annotations

from pathlib import Path

from vlmc.runtime.cpu_ops.tiles import TileConfig

from ..qwen2_5_vl import load_config, read_json, special_tokens, tiled_host_spec
from . import reference
from .checkpoint import PRESETS, TEXT_MODELS, write_checkpoint
from .model import (SHARDING, DeployLanguageModel, DeployVision, embedding_table, load_language_model, load_vision,
                    shard_plan)

MODEL_TYPES = ("internvl",)


def tile_config(checkpoint_dir, config) -> TileConfig:
    """GotOcr2's crop_to_patches settings and InternVL's prompt tokens (from the tokenizer's config)."""
    checkpoint_dir = Path(checkpoint_dir)
    pre = read_json(checkpoint_dir / "preprocessor_config.json")
    tokens = special_tokens(checkpoint_dir)
    v = config.vision_config
    size = pre.get("size") or {"height": v.image_size[0], "width": v.image_size[1]}
    if size["height"] != size["width"] or size["height"] != v.image_size[0]:
        raise ValueError(f"{checkpoint_dir}: tiles of {size} do not match the tower's image_size {v.image_size}")
    patch = v.patch_size[0]
    tokens_per_tile = int((size["height"] // patch) * config.downsample_ratio) ** 2
    context = tokens.get("context_image_token", "<IMG_CONTEXT>")
    return TileConfig(
        tile_size=size["height"], patch_size=patch, tokens_per_tile=tokens_per_tile, tiling="aspect_ratio",
        max_tiles=int(pre.get("max_patches", 12)) if pre.get("crop_to_patches", False) else 1,
        min_tiles=int(pre.get("min_patches", 1)), resample=int(pre.get("resample", 3)),
        image_mean=tuple(pre.get("image_mean", (0.485, 0.456, 0.406))),
        image_std=tuple(pre.get("image_std", (0.229, 0.224, 0.225))),
        rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
        prompt={"format": "wrapped", "placeholder": context, "image": context,
                "start": tokens.get("start_image_token", "<img>"), "end": tokens.get("end_image_token", "</img>")})


host_spec = tiled_host_spec(tile_config)


__all__ = ["MODEL_TYPES", "PRESETS", "SHARDING", "TEXT_MODELS", "DeployLanguageModel", "DeployVision",
           "embedding_table", "host_spec", "reference", "load_config", "load_language_model", "load_vision",
           "shard_plan", "write_checkpoint"]
