"""Built-in random-weight Qwen2-VL checkpoints: Qwen2.5-VL's tokenizer, template and writer, Qwen2-VL's config."""

from __future__ import annotations

from pathlib import Path

from ..qwen2_5_vl.checkpoint import (DEFAULT_INIT_STD, text_config, vision_token_ids, with_depth,
                                     write_qwen_checkpoint)

PRESETS = {
    # Runs the whole pipeline in seconds.
    "tiny": dict(
        num_merges=400,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4),
    ),
    # The real model's per-head shapes (text head_dim 128, mrope [16, 24, 24]; vision head_dim 80), at few layers
    # and small widths.
    "small": dict(
        num_merges=800,
        text=dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[16, 24, 24]),
        vision=dict(depth=4, embed_dim=160, num_heads=2, mlp_ratio=4),
    ),
}


def build_config(spec: dict, tokenizer, init_std: float = DEFAULT_INIT_STD):
    from transformers import Qwen2VLConfig

    text, ids = text_config(spec, tokenizer, init_std)
    vision_config = dict(spec["vision"], hidden_act="quick_gelu", in_channels=3, patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2, hidden_size=text["hidden_size"], initializer_range=init_std)
    return Qwen2VLConfig(text_config=text, vision_config=vision_config, **vision_token_ids(ids),
                         tie_word_embeddings=text["tie_word_embeddings"], initializer_range=init_std)


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, init_std: float | None = None,
                     text_layers: int | None = None, vision_depth: int | None = None) -> Path:
    """Write a random-weight Qwen2-VL checkpoint to `out_dir` and return its path (`text_layers`, `vision_depth`:
    the preset at another depth)."""
    from transformers import Qwen2VLForConditionalGeneration

    return write_qwen_checkpoint(out_dir, PRESETS, preset, build_config, Qwen2VLForConditionalGeneration,
                                 "Qwen2VLProcessor", seed, init_std,
                                 spec=with_depth(PRESETS[preset], text_layers, vision_depth) if preset in PRESETS
                                 else None)
