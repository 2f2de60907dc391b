"""Built-in random-weight InternVL checkpoints (transformers' native "-hf" layout): an InternViT tower, pixel
shuffle and the MLP projector over a Qwen2 (InternVL3) or Qwen3 (InternVL3.5) language model, with the Qwen
tokenizer plus InternVL's image tokens, its chat template and the GotOcr2 tiling processor config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..qwen2_5_vl.checkpoint import DEFAULT_INIT_STD, build_tokenizer

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}

# InternVL-hf's template: each image part becomes "<IMG_CONTEXT>\n", which the processor expands per tile.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are InternVL, a multimodal large language model.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'video' %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT_MODELS = ("qwen2", "qwen3")

PRESETS = {
    # Runs the whole pipeline in seconds: 56-px tiles of 16 patches (4 tokens each after the pixel shuffle).
    "tiny": dict(
        num_merges=400, tile=56, max_tiles=6,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
        qwen3=dict(head_dim=32),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    ),
    # The real models' per-head shapes (InternViT head_dim 64, text head_dim 128) and tiling (448-px tiles of
    # 1024 patches, 256 tokens each, up to 12 tiles and the thumbnail) at few layers and small widths.
    "small": dict(
        num_merges=800, tile=448, max_tiles=12,
        text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1),
        qwen3=dict(head_dim=128),
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2),
    ),
}


def build_config(preset: str, tokenizer, text_model: str, init_std: float):
    from transformers import InternVLConfig

    spec = PRESETS[preset]
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in IMAGE_TOKENS.items()}
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = dict(spec["text"], model_type=text_model, vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_act="silu",
                max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=pad,
                eos_token_id=eos, tie_word_embeddings=False, initializer_range=init_std)
    if text_model == "qwen3":
        text.update(spec["qwen3"], attention_bias=False)
    tile, patch = spec["tile"], 14
    vision = dict(spec["vision"], image_size=[tile, tile], patch_size=[patch, patch], initializer_range=init_std,
                  layer_scale_init_value=0.1)
    tokens_per_tile = (tile // patch) ** 2 // 4
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["context_image_token"],
                          image_seq_length=tokens_per_tile, downsample_ratio=0.5, tie_word_embeddings=False)


@torch.no_grad()
def _randomize_zero_inits(model, std: float, generator) -> None:
    """transformers zero-initialises the CLS token and the position table and sets every layer scale to one
    constant: random values make each of them matter (a swapped lambda_1/lambda_2 would show)."""
    emb = model.model.vision_tower.embeddings
    for tensor in (emb.cls_token, emb.position_embeddings):
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
    for layer in model.model.vision_tower.encoder.layer:
        for tensor in (layer.lambda_1, layer.lambda_2):
            tensor.copy_(0.1 + 0.05 * torch.randn(tensor.shape, generator=generator))


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, init_std: float | None = None,
                     text: str | None = None) -> Path:
    """Write a random-weight InternVL checkpoint to `out_dir` (`text`: qwen2, the default, or qwen3)."""
    from transformers import GenerationConfig, InternVLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    text = text or "qwen2"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if text not in TEXT_MODELS:
        raise ValueError(f"unknown text model {text!r} for internvl; choose one of {', '.join(TEXT_MODELS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    std = DEFAULT_INIT_STD if init_std is None else init_std
    tokenizer = build_tokenizer(PRESETS[preset]["num_merges"])
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS.values())})
    tokenizer.chat_template = CHAT_TEMPLATE
    for name, tok in IMAGE_TOKENS.items():  # what InternVLProcessor reads from the tokenizer
        tokenizer.init_kwargs[name] = tok
    config = build_config(preset, tokenizer, text, std)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    _randomize_zero_inits(model, std, torch.Generator().manual_seed(seed + 1))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(bos_token_id=eos[1], eos_token_id=eos, pad_token_id=eos[1]).save_pretrained(out)
    tile = PRESETS[preset]["tile"]
    preprocessor = {
        "image_processor_type": "GotOcr2ImageProcessor", "processor_class": "InternVLProcessor",
        "crop_to_patches": True, "min_patches": 1, "max_patches": PRESETS[preset]["max_tiles"],
        "size": {"height": tile, "width": tile}, "resample": 3,
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "rescale_factor": 1 / 255,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "InternVLProcessor", "image_seq_length": config.image_seq_length}, indent=2) + "\n")
    return out
