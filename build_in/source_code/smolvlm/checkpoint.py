"""Built-in random-weight SmolVLM and Idefics3 checkpoints: a SigLIP-style tower, pixel shuffle and a linear
connector over a Qwen3 (the Reyes-0.6B pattern) or Llama (SmolLM2) language model, with the Qwen tokenizer plus
the family's image tokens, its chat template and the longest-edge tiling processor config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..qwen2_5_vl.checkpoint import DEFAULT_INIT_STD, build_tokenizer

FAKE, IMAGE, GLOBAL, END = "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"
MAX_GRID = 6  # <row_r_col_c> tokens for grids up to this many rows and columns

# SmolVLM-Instruct's template: each image part becomes "<image>", which the processor expands per tile.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

TEXT_MODELS = ("qwen3", "llama")

PRESETS = {
    # Runs the whole pipeline in seconds: 32-px tiles of 16 patches, 4 tokens each after a 2x pixel shuffle, and
    # images resized to a longest edge of 4 tiles.
    "tiny": dict(
        num_merges=400, tile=32, patch=8, edge_tiles=4, scale_factor=2,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
        head_dim=32,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    ),
    # SmolVLM-256M/500M's tiling and per-head shapes (512-px tiles of 16-px patches, a 4x shuffle to 64 tokens per
    # tile, SigLIP head_dim 64, text head_dim 64 / 128 for Qwen3) at few layers and small widths.
    "small": dict(
        num_merges=800, tile=512, patch=16, edge_tiles=4, scale_factor=4,
        text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
        head_dim=128,
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
    ),
}


def build_tokenizer_with_image_tokens(num_merges: int):
    tokenizer = build_tokenizer(num_merges)
    grid = [f"<row_{r}_col_{c}>" for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)]
    tokenizer.add_special_tokens({"additional_special_tokens": [FAKE, IMAGE, GLOBAL, END, *grid]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(config_class, preset: str, tokenizer, text_model: str, init_std: float):
    spec = PRESETS[preset]
    eos, pad = tokenizer.convert_tokens_to_ids(END), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = dict(spec["text"], model_type=text_model, vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_act="silu",
                max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=100000.0, bos_token_id=pad,
                eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False, initializer_range=init_std,
                attention_bias=False, head_dim=spec["head_dim"] if text_model == "qwen3" else None)
    if text["head_dim"] is None:
        del text["head_dim"]
    vision = dict(spec["vision"], image_size=spec["tile"], patch_size=spec["patch"], initializer_range=init_std)
    return config_class(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                        scale_factor=spec["scale_factor"], tie_word_embeddings=False, pad_token_id=pad)


def write_family_checkpoint(out_dir, preset: str, seed: int, init_std: float | None, text: str, family: str) -> Path:
    """A random-weight `family` ("smolvlm" or "idefics3") checkpoint with `text` ("qwen3" or "llama")."""
    import transformers
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if text not in TEXT_MODELS:
        raise ValueError(f"unknown text model {text!r} for {family}; choose one of {', '.join(TEXT_MODELS)}")
    names = {"smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration", "SmolVLM"),
             "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration", "Idefics3")}[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = PRESETS[preset]
    tokenizer = build_tokenizer_with_image_tokens(spec["num_merges"])
    config = build_config(getattr(transformers, names[0]), preset, tokenizer, text,
                          DEFAULT_INIT_STD if init_std is None else init_std)
    torch.manual_seed(seed)
    model = getattr(transformers, names[1])(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    eos = [tokenizer.convert_tokens_to_ids(END), tokenizer.convert_tokens_to_ids("<|im_end|>")]
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad).save_pretrained(out)
    tile = spec["tile"]
    seq = (tile // spec["patch"]) ** 2 // spec["scale_factor"] ** 2
    preprocessor = {
        "image_processor_type": f"{names[2]}ImageProcessor", "processor_class": f"{names[2]}Processor",
        "do_image_splitting": True, "max_image_size": {"longest_edge": tile},
        "size": {"longest_edge": spec["edge_tiles"] * tile}, "resample": 1, "do_pad": True,
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "rescale_factor": 1 / 255,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": f"{names[2]}Processor", "image_seq_len": seq}, indent=2) + "\n")
    return out


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, init_std: float | None = None,
                     text: str | None = None) -> Path:
    """Write a random-weight SmolVLM checkpoint to `out_dir` (`text`: qwen3, the default, or llama)."""
    return write_family_checkpoint(out_dir, preset, seed, init_std, text or "qwen3", "smolvlm")
