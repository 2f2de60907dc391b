"""Qwen2.5-VL: deploy model definition, its sharding plan, built-in checkpoints and host settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from vlmc.runtime.cpu_ops.image import ImageConfig
from vlmc.runtime.cpu_ops.pipeline import HostSpec, TextSpec
from vlmc.runtime.cpu_ops.video import VideoConfig
from vlmc.runtime.cpu_ops.vision import VisionSpec

from . import reference  # transformers as the reference, for parity checks
from .checkpoint import PRESETS, write_checkpoint
from .model import (SHARDING, DeployLanguageModel, DeployVision, embedding_table,
                    load_language_model, load_vision, shard_plan)

MODEL_TYPES = ("qwen2_5_vl",)


def load_config(checkpoint_dir: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(checkpoint_dir))


def host_spec(checkpoint_dir: str | Path, config=None) -> HostSpec:
    config = config or load_config(checkpoint_dir)
    v = config.vision_config
    return qwen_host_spec(checkpoint_dir, config, v.hidden_size // v.num_heads, v.window_size)


def qwen_host_spec(checkpoint_dir, config, vision_head_dim: int, window_size: int | None,
                   rope: str = "mrope", videos: bool = True, video_defaults: dict | None = None) -> HostSpec:
    """The host steps of a Qwen VL family: the Qwen2-VL image (and, `videos`, video) processor, the tower's 2-D
    rotary (and windows), placeholder expansion by grid and M-RoPE positions (`rope`: the text rotary scheme; a
    vision config with `tokens_per_second` spaces a video's temporal positions by absolute time;
    `video_defaults`: the family's video processor style and defaults, see VideoConfig)."""
    v, t = config.vision_config, config.text_config
    videos = videos and getattr(config, "video_token_id", None) is not None
    params = t.rope_parameters or {}
    return HostSpec(
        image=ImageConfig.from_checkpoint(checkpoint_dir),
        vision=VisionSpec(head_dim=vision_head_dim, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                          window_size=window_size,
                          rope_theta=float((v.rope_parameters or {}).get("rope_theta", 10000.0))),
        text=TextSpec(hidden_size=t.hidden_size,
                      head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
                      rope_theta=float(params.get("rope_theta", 1000000.0)),
                      mrope_section=tuple(params.get("mrope_section", (16, 24, 24))),
                      vocab_size=t.vocab_size, image_token_id=config.image_token_id,
                      eos_token_ids=_eos_token_ids(checkpoint_dir, t), rope=rope,
                      video_token_id=config.video_token_id if videos else None,
                      tokens_per_second=getattr(v, "tokens_per_second", None) if videos else None),
        video=VideoConfig.from_checkpoint(checkpoint_dir, **(video_defaults or {})) if videos else None,
    )


def rope_text_spec(checkpoint_dir, config, image_token_id: int) -> TextSpec:
    """The text side of a family whose language model is a plain one with 1-D RoPE (default rope type only):
    three equal position rows, delta 0."""
    t = config.text_config
    params = t.rope_parameters or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"{checkpoint_dir}: rope_type {params['rope_type']!r} is not supported (default only)")
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return TextSpec(hidden_size=t.hidden_size, head_dim=head_dim, rope_theta=float(params.get("rope_theta", 10000.0)),
                    mrope_section=(head_dim // 2, 0, 0), vocab_size=t.vocab_size, image_token_id=image_token_id,
                    eos_token_ids=_eos_token_ids(checkpoint_dir, t), rope="rope")


def tiled_host_spec(tile_config: Callable) -> Callable:
    """`host_spec` of a tiling family: `tile_config(checkpoint_dir, config)` for the image side, plain 1-D RoPE
    for the text side."""
    def host_spec(checkpoint_dir, config=None) -> HostSpec:
        config = config or load_config(checkpoint_dir)
        return HostSpec(image=tile_config(checkpoint_dir, config), vision=None,
                        text=rope_text_spec(checkpoint_dir, config, config.image_token_id))
    return host_spec


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def special_tokens(checkpoint_dir: Path) -> dict:
    """The tokenizer's named special tokens: top-level keys of tokenizer_config.json, or its
    `extra_special_tokens` (where transformers 5 writes them)."""
    config = read_json(checkpoint_dir / "tokenizer_config.json")
    extra = config.get("extra_special_tokens")
    return {**config, **(extra if isinstance(extra, dict) else {})}


def _eos_token_ids(checkpoint_dir, text_config) -> tuple[int, ...]:
    eos = read_json(Path(checkpoint_dir) / "generation_config.json").get("eos_token_id")
    eos = text_config.eos_token_id if eos is None else eos
    return tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()


__all__ = ["MODEL_TYPES", "PRESETS", "SHARDING", "DeployLanguageModel", "DeployVision",
           "embedding_table", "host_spec", "reference", "load_config", "load_language_model", "load_vision", "shard_plan",
           "write_checkpoint"]
