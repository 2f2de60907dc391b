"""Qwen3-VL (dense): its vision tower (learned positions, deepstack), Qwen3 attention on the shared decoder and
interleaved M-RoPE; the host steps and the checkpoint layout are the Qwen family's."""

from __future__ import annotations

from pathlib import Path

from ..qwen2_5_vl import load_config, qwen_host_spec
from . import reference
from .checkpoint import PRESETS, write_checkpoint
from .model import (SHARDING, DeployLanguageModel, DeployVision, embedding_table, load_language_model, load_vision,
                    shard_plan)

MODEL_TYPES = ("qwen3_vl",)
# Qwen3VLVideoProcessor (transformers 5.24): linspace sampling, pixel bounds over the clip with a per-frame cap of
# 768 tokens, a "<t seconds>" text before every temporal patch
# (its constructor ignores min_pixels / max_pixels keys: only a config's `size` sets the bounds)
VIDEO_DEFAULTS = dict(min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768, max_video_tokens=768, sampling="linspace",
                      pixel_bounds="clip", frame_timestamps=True, pixel_keys=False)


def host_spec(checkpoint_dir: str | Path, config=None):
    from dataclasses import replace

    config = config or load_config(checkpoint_dir)
    v = config.vision_config
    spec = qwen_host_spec(checkpoint_dir, config, v.hidden_size // v.num_heads, window_size=None,
                          rope="mrope_interleaved", video_defaults=VIDEO_DEFAULTS)
    return replace(spec, vision=replace(spec.vision, position_grid=int(v.num_position_embeddings ** 0.5)))


__all__ = ["MODEL_TYPES", "PRESETS", "SHARDING", "DeployLanguageModel", "DeployVision", "embedding_table",
           "host_spec", "reference", "load_config", "load_language_model", "load_vision", "shard_plan",
           "write_checkpoint"]
