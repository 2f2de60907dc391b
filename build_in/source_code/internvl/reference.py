"""Hugging Face transformers as the reference for InternVL: the GotOcr2 PIL image processor, the prompt expanded as
InternVLProcessor does it (its constructor needs torchvision, absent here), 1-D positions, get_image_features and
generate."""

from __future__ import annotations

import torch

from ..qwen2_5_vl.reference import as_numpy, fake_quantize_modules, tiled_reference_inputs
from ..qwen2_5_vl.reference import generate_tiled_reference as generate_reference
from ..qwen2_5_vl.reference import load_model as _load_model

__all__ = ["as_numpy", "fake_quantize", "generate_reference", "load_model", "reference_inputs", "vision_outputs"]


def reference_inputs(checkpoint_dir, images, text, min_pixels=None, max_pixels=None, model=None, messages=None,
                     max_tiles=None):
    """Inputs for one user turn [images..., text] (or `messages`); `max_tiles`: the processor's max_patches."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    if min_pixels is not None or max_pixels is not None:
        raise ValueError("InternVL cuts images into tiles: min_pixels / max_pixels do not apply")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    kwargs = {"max_patches": max_tiles} if max_tiles is not None else {}
    processor = AutoImageProcessor.from_pretrained(checkpoint_dir, backend="pil", **kwargs)
    model = model or load_model(checkpoint_dir)
    if messages is None:
        messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pixel_values, layouts = None, None
    if images:
        out = processor(images=images, return_tensors="pt")
        pixel_values, counts = out["pixel_values"], [int(n) for n in out["num_patches"]]
        size = processor.size
        layouts = []
        for image, n in zip(images, counts):  # (tiles, rows, columns), as the host describes an image
            cols, rows = get_optimal_tiled_canvas((image.height, image.width), (size.height, size.width),
                                                  processor.min_patches, processor.max_patches) if n > 1 else (1, 1)
            layouts.append([n, rows, cols])
        layouts = torch.tensor(layouts)
        seq = model.config.image_seq_length
        context, start, end = tokenizer.context_image_token, tokenizer.start_image_token, tokenizer.end_image_token
        parts = prompt.split(context)
        prompt = parts[0] + "".join(f"{start}{'<|placeholder|>' * (seq * n)}{end}{rest}"
                                    for n, rest in zip(counts, parts[1:]))
        prompt = prompt.replace("<|placeholder|>", context)
    return tiled_reference_inputs(tokenizer, prompt, pixel_values, layouts)


@torch.no_grad()
def vision_outputs(model, pixel_values, image_grid_thw=None) -> dict:
    c = model.config
    out = model.model.get_image_features(pixel_values.to(model.device), vision_feature_layer=c.vision_feature_layer,
                                         vision_feature_select_strategy=c.vision_feature_select_strategy)
    features = out.pooler_output
    return {"embeddings": as_numpy(features.reshape(-1, features.shape[-1]))}


def load_model(checkpoint_dir, vision_scheme=None, text_scheme=None):
    return _load_model(checkpoint_dir, vision_scheme, text_scheme, quantizer=fake_quantize)


def fake_quantize(model, vision_scheme=None, text_scheme=None) -> None:
    """The artifacts' effective weights in transformers' InternVL, in place (see qwen2_5_vl.reference)."""
    fake_quantize_modules({"": model.model.vision_tower, "projector.": model.model.multi_modal_projector},
                          model.model.language_model, model.lm_head, vision_scheme, text_scheme, _deploy_name)


def _deploy_name(name: str) -> tuple[str, tuple[str, ...]]:
    """A tower module's transformers name -> its deploy layer (see model.PREFIXES); nothing is fused."""
    if name == "embeddings.patch_embeddings.projection":
        return "patch_embed", ()
    if name.startswith("encoder.layer."):
        return "layers." + name[len("encoder.layer."):], ()
    return name, ()
