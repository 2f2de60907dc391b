"""Built-in random-weight Qwen3-VL (dense) checkpoints: Qwen2.5-VL's tokenizer, template and writer, Qwen3-VL's
config (explicit head_dim, q/k norms, interleaved M-RoPE, deepstack) and image processor (16-px patches, mean and
std 0.5)."""

from __future__ import annotations

from pathlib import Path

from ..qwen2_5_vl.checkpoint import DEFAULT_INIT_STD, text_config, vision_token_ids, write_qwen_checkpoint
from ..qwen2_5_vl.checkpoint import with_depth as qwen_with_depth

PRESETS = {
    # Runs the whole pipeline in seconds; head_dim 32 is not hidden / heads (16), as in the real 4B/8B models.
    "tiny": dict(
        num_merges=400,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5]),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0, 1]),
    ),
    # The real models' per-head shapes (text head_dim 128 over 4 heads of a 256-wide model, mrope [24, 20, 20];
    # vision head_dim 64, the 48 x 48 position table), deepstack after the first and third of 3 vision blocks.
    "small": dict(
        num_merges=800,
        text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128, mrope_section=[24, 20, 20]),
        vision=dict(depth=3, hidden_size=128, intermediate_size=256, num_heads=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[0, 2]),
    ),
}


def build_config(spec: dict, tokenizer, init_std: float = DEFAULT_INIT_STD):
    from transformers import Qwen3VLConfig

    text, ids = text_config(spec, tokenizer, init_std)
    mrope = text.pop("rope_scaling")["mrope_section"]
    for key in ("rope_theta", "use_sliding_window", "sliding_window", "max_window_layers"):
        text.pop(key)
    text.update(attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                       "mrope_section": mrope, "mrope_interleaved": True})
    vision = dict(spec["vision"], hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text["hidden_size"], initializer_range=init_std)
    return Qwen3VLConfig(text_config=text, vision_config=vision, **vision_token_ids(ids),
                         tie_word_embeddings=text["tie_word_embeddings"])


def with_depth(spec: dict, text_layers: int | None, vision_depth: int | None) -> dict:
    """A preset at another depth; its deepstack blocks keep their fractions of the tower's depth (Qwen3-VL-4B: 24
    blocks, deepstack after 5, 11 and 17)."""
    out = qwen_with_depth(spec, text_layers, vision_depth)
    if vision_depth is not None:
        old = spec["vision"]["depth"]
        out["vision"]["deepstack_visual_indexes"] = sorted(
            {min(vision_depth - 1, max(0, round((i + 1) * vision_depth / old) - 1))
             for i in spec["vision"]["deepstack_visual_indexes"]})
    return out


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, init_std: float | None = None,
                     text_layers: int | None = None, vision_depth: int | None = None) -> Path:
    """Write a random-weight Qwen3-VL checkpoint to `out_dir` and return its path (`text_layers`, `vision_depth`:
    the preset at another depth)."""
    from transformers import Qwen3VLForConditionalGeneration

    return write_qwen_checkpoint(out_dir, PRESETS, preset, build_config, Qwen3VLForConditionalGeneration,
                                 "Qwen3VLProcessor", seed, init_std,
                                 spec=with_depth(PRESETS[preset], text_layers, vision_depth) if preset in PRESETS
                                 else None,
                                 image_processor={"patch_size": 16, "image_mean": [0.5, 0.5, 0.5],
                                                  "image_std": [0.5, 0.5, 0.5]})
