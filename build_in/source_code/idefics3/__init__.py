"""Idefics3: SmolVLM's predecessor, the same tower, connector, tiling and checkpoint layout (see smolvlm); its own
model_type and defaults (Llama text)."""

from __future__ import annotations

from pathlib import Path

from ..smolvlm import (SHARDING, TEXT_MODELS, DeployLanguageModel, DeployVision, embedding_table, host_spec,
                       load_config, load_language_model, load_vision, reference, shard_plan)
from ..smolvlm.checkpoint import PRESETS, write_family_checkpoint

MODEL_TYPES = ("idefics3",)


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, init_std: float | None = None,
                     text: str | None = None) -> Path:
    """Write a random-weight Idefics3 checkpoint to `out_dir` (`text`: llama, the default, or qwen3)."""
    return write_family_checkpoint(out_dir, preset, seed, init_std, text or "llama", "idefics3")


__all__ = ["MODEL_TYPES", "PRESETS", "SHARDING", "TEXT_MODELS", "DeployLanguageModel", "DeployVision",
           "embedding_table", "host_spec", "reference", "load_config", "load_language_model", "load_vision",
           "shard_plan", "write_checkpoint"]
