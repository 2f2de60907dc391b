"""Qwen2-VL: its own vision tower (LayerNorm blocks, full attention, quick_gelu MLP); the Qwen2 language model, the
sharding plan, the host steps and the reference are those of Qwen2.5-VL."""

from __future__ import annotations

from pathlib import Path

from ..qwen2_5_vl import load_config, qwen_host_spec, reference
from .checkpoint import PRESETS, write_checkpoint
from .model import (SHARDING, DeployLanguageModel, DeployVision, embedding_table, load_language_model, load_vision,
                    shard_plan)

MODEL_TYPES = ("qwen2_vl",)


def host_spec(checkpoint_dir: str | Path, config=None):
    config = config or load_config(checkpoint_dir)
    v = config.vision_config
    return qwen_host_spec(checkpoint_dir, config, v.embed_dim // v.num_heads, window_size=None)


__all__ = ["MODEL_TYPES", "PRESETS", "SHARDING", "DeployLanguageModel", "DeployVision", "embedding_table",
           "host_spec", "reference", "load_config", "load_language_model", "load_vision", "shard_plan",
           "write_checkpoint"]
