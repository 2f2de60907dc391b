"""Hugging Face transformers as the reference for SmolVLM / Idefics3: the PIL image processor (LANCZOS), the
prompt expanded as the processor does it (SmolVLMProcessor needs torchvision and num2words, absent here), 1-D
positions, get_image_features and generate. A cap on the tiles lowers the processor's `size.longest_edge` in whole
tiles, as a smaller setting would."""

from __future__ import annotations

import torch

from ..qwen2_5_vl.reference import as_numpy, fake_quantize_modules, tiled_reference_inputs
from ..qwen2_5_vl.reference import generate_tiled_reference as generate_reference
from ..qwen2_5_vl.reference import load_model as _load_model

__all__ = ["as_numpy", "fake_quantize", "generate_reference", "load_model", "reference_inputs", "vision_outputs"]


def _process(processor, image, max_tiles):
    """The processor's output for one image, with the largest longest_edge (in whole tiles) whose grid has at
    most max_tiles tiles."""
    tile = processor.max_image_size["longest_edge"]
    edge = processor.size["longest_edge"]
    while True:
        out = processor(images=[image], return_tensors="pt", return_row_col_info=True,
                        size={"longest_edge": edge})
        rows, cols = out["rows"][0][0], out["cols"][0][0]
        if max_tiles is None or rows * cols <= max_tiles or edge <= tile:
            return out, rows, cols
        edge = (-(-edge // tile) - 1) * tile


def reference_inputs(checkpoint_dir, images, text, min_pixels=None, max_pixels=None, model=None, messages=None,
                     max_tiles=None):
    from transformers import AutoImageProcessor, AutoTokenizer

    if min_pixels is not None or max_pixels is not None:
        raise ValueError("this model cuts images into tiles: min_pixels / max_pixels do not apply")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    processor = AutoImageProcessor.from_pretrained(checkpoint_dir, backend="pil")
    model = model or load_model(checkpoint_dir)
    if messages is None:
        messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pixel_values, layouts = None, None
    if images:
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        seq = model.model.image_seq_len
        pixels, layouts, strings = [], [], []
        for image in images:
            out, rows, cols = _process(processor, image, max_tiles)
            pixels.append(out["pixel_values"][0])
            layouts.append([out["pixel_values"].shape[1], max(rows, 1), max(cols, 1)])
            strings.append(get_image_prompt_string(rows, cols, seq, "<fake_token_around_image>", "<image>",
                                                   "<global-img>"))
        pixel_values, layouts = torch.cat(pixels)[None], torch.tensor(layouts)
        parts = prompt.split("<image>")
        prompt = parts[0] + "".join(s.replace("<image>", "<|placeholder|>") + rest
                                    for s, rest in zip(strings, parts[1:]))
        prompt = prompt.replace("<|placeholder|>", "<image>")
    return tiled_reference_inputs(tokenizer, prompt, pixel_values, layouts)


@torch.no_grad()
def vision_outputs(model, pixel_values, image_grid_thw=None) -> dict:
    pixel_values = pixel_values if pixel_values.ndim == 5 else pixel_values[None]
    features = model.model.get_image_features(pixel_values.to(model.device)).pooler_output
    return {"embeddings": as_numpy(torch.cat([f.reshape(-1, f.shape[-1]) for f in features]))}


def load_model(checkpoint_dir, vision_scheme=None, text_scheme=None):
    return _load_model(checkpoint_dir, vision_scheme, text_scheme, quantizer=fake_quantize)


def fake_quantize(model, vision_scheme=None, text_scheme=None) -> None:
    """The artifacts' effective weights in transformers' SmolVLM / Idefics3, in place."""
    fake_quantize_modules({"": model.model.vision_model, "connector.": model.model.connector.modality_projection},
                          model.model.text_model, model.lm_head, vision_scheme, text_scheme, _deploy_name)


def _deploy_name(name: str) -> tuple[str, tuple[str, ...]]:
    if name == "embeddings.patch_embedding":
        return "patch_embed", ()
    if name.startswith("encoder.layers."):
        return "layers." + name[len("encoder.layers."):], ()
    return name, ()
