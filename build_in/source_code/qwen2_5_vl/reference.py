"""Hugging Face transformers as the reference: its image processor, the tokenizer with image pads expanded the way
the Qwen VL processors do, and the model's own get_rope_index (Qwen2-VL and Qwen2.5-VL alike: the model class
comes from the checkpoint's config)."""

from __future__ import annotations

import inspect

import numpy as np
import torch


def reference_inputs(checkpoint_dir, images, text, min_pixels=None, max_pixels=None, model=None, messages=None,
                     videos=None):
    """Inputs for one user turn [images..., videos..., text], or for a whole conversation `messages` (chat-template
    messages whose image and video parts are {"type": "image"} / {"type": "video"}, in the order of `images` and
    `videos`). `videos`: already processed videos, {"pixel_values_videos", "video_grid_thw",
    "second_per_grid_ts"} (transformers' video processor needs torchvision, which this host lacks), and optionally
    "placeholders": the text each video's <|video_pad|> becomes (default: its grid's pad tokens)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    # The PIL processor is what the host ops reproduce; with torchvision installed (GPU machines) transformers would
    # pick its torchvision one, whose resize differs slightly.
    processor = AutoImageProcessor.from_pretrained(checkpoint_dir, backend="pil", **kwargs)
    video_grid = None if videos is None else torch.as_tensor(np.asarray(videos["video_grid_thw"])).reshape(-1, 3)
    if messages is None:
        num_videos = 0 if video_grid is None else len(video_grid)
        content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in range(num_videos)]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    merge = processor.merge_size ** 2
    if images:
        out = processor(images=images, return_tensors="pt")
        pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
        prompt = _expand(prompt, "<|image_pad|>", grid, merge)
    else:
        pixel_values, grid = None, None
    if video_grid is not None and videos.get("placeholders") is not None:
        pieces = prompt.split("<|video_pad|>")
        prompt = pieces[0] + "".join(p + rest for p, rest in zip(videos["placeholders"], pieces[1:]))
    elif video_grid is not None:
        prompt = _expand(prompt, "<|video_pad|>", video_grid, merge)
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model = model or load_model(checkpoint_dir)
    mm_type = (input_ids == model.config.image_token_id).int()  # the processor's mm_token_type_ids
    extra = {}
    if video_grid is not None:
        mm_type[input_ids == model.config.video_token_id] = 2
        extra = {"pixel_values_videos": torch.as_tensor(np.asarray(videos["pixel_values_videos"])),
                 "video_grid_thw": video_grid,
                 # as the processor returns them: a list of floats made a tensor (float32)
                 "second_per_grid_ts": torch.tensor([float(x) for x in videos["second_per_grid_ts"]])}
    dev = model.device  # get_rope_index runs where the model is (a GPU model too); results come back to the host
    rope_kwargs = {"image_grid_thw": None if grid is None else grid.to(dev)}
    if video_grid is not None:
        rope_kwargs["video_grid_thw"] = video_grid.to(dev)
        if "second_per_grid_ts" in inspect.signature(model.model.get_rope_index).parameters:
            rope_kwargs["second_per_grid_ts"] = extra["second_per_grid_ts"].to(dev)
    position_ids, deltas = model.model.get_rope_index(input_ids.to(dev), mm_type.to(dev), **rope_kwargs)
    position_ids, deltas = position_ids.cpu(), deltas.cpu()
    return {"pixel_values": pixel_values, "image_grid_thw": grid, "input_ids": input_ids,
            "mm_token_type_ids": mm_type, "position_ids": position_ids, "rope_deltas": deltas, **extra}


def _expand(prompt: str, pad: str, grids, merge: int) -> str:
    """Each `pad` of the prompt expanded to its grid's tokens, as the processor does."""
    for t, h, w in grids.tolist():
        prompt = prompt.replace(pad, "<|placeholder|>" * (t * h * w // merge), 1)
    return prompt.replace("<|placeholder|>", pad)


def generate_reference(model, ref, max_new_tokens, with_logits=False, image_inputs=("pixel_values", "image_grid_thw")):
    """Greedy tokens from transformers' generate (and, with_logits, the logits of every step); `image_inputs`: the
    entries of `ref` the model takes with images (mm_token_type_ids too, where the family has them, and the video
    inputs where `ref` has a video)."""
    kwargs = dict(input_ids=ref["input_ids"], attention_mask=torch.ones_like(ref["input_ids"]))
    if "mm_token_type_ids" in ref:
        kwargs["mm_token_type_ids"] = ref["mm_token_type_ids"]
    if ref["pixel_values"] is not None:
        kwargs.update({name: ref[name] for name in image_inputs})
    if "pixel_values_videos" in ref:
        kwargs.update(pixel_values_videos=ref["pixel_values_videos"], video_grid_thw=ref["video_grid_thw"])
        if "second_per_grid_ts" in inspect.signature(model.forward).parameters:  # Qwen2.5-VL's absolute time
            kwargs["second_per_grid_ts"] = ref["second_per_grid_ts"]
    kwargs = {k: v.to(model.device) for k, v in kwargs.items()}
    with torch.no_grad():
        out = model.generate(**kwargs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ref["input_ids"].shape[1]:].tolist()
    return (tokens, [as_numpy(step[0]) for step in out.logits]) if with_logits else tokens


def tiled_reference_inputs(tokenizer, prompt: str, pixel_values, layouts) -> dict:
    """The reference inputs of a tiling family from its expanded prompt: 1-D RoPE positions (three equal rows, delta
    0) and the layouts (tiles, rows, columns) per image in place of a grid."""
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    positions = torch.arange(input_ids.shape[1])[None, None].expand(3, 1, -1)
    return {"pixel_values": pixel_values, "image_grid_thw": layouts, "input_ids": input_ids,
            "position_ids": positions, "rope_deltas": torch.zeros(1, dtype=torch.long)}


def generate_tiled_reference(model, ref, max_new_tokens, with_logits=False):
    """generate_reference for a tiling family: the tiles are the only image input (the layout is vlmc's)."""
    return generate_reference(model, ref, max_new_tokens, with_logits, image_inputs=("pixel_values",))


@torch.no_grad()
def vision_outputs(model, pixel_values, image_grid_thw) -> dict:
    """The vision tower's outputs for the images of one prompt, by output group, as numpy."""
    out = model.model.visual(pixel_values.to(model.device), grid_thw=image_grid_thw.to(model.device))
    return {"embeddings": as_numpy(out.pooler_output)}


def as_numpy(x):
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)


def load_model(checkpoint_dir, vision_scheme=None, text_scheme=None, quantizer=None):
    """transformers' model; with schemes, its weights replaced by the effective (fake-quant) weights vlmc's
    artifacts compute with (by `quantizer`, default the Qwen VL layout's): the tier-A reference of a
    reduced-precision artifact."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor loading bar is noise in a parity report
    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint_dir)).eval()
    if vision_scheme is not None or text_scheme is not None:
        (quantizer or fake_quantize)(model, vision_scheme, text_scheme)
    return model


def _deploy_name(name: str) -> tuple[str, tuple[str, ...]]:
    """A transformers module name (relative to the vision tower or the text model) -> the deploy layer it becomes
    and the checkpoint layers fused into that (for `skip`)."""
    from .model import FUSED

    if name == "patch_embed.proj":
        return "patch_embed", ()
    for fused, parts in FUSED.items():
        for part in parts:
            if name.endswith("." + part):
                prefix = name[:len(name) - len(part)]
                return prefix + fused, tuple(prefix + p for p in parts)
    return name, ()


def fake_quantize(model, vision_scheme=None, text_scheme=None) -> None:
    """Put the effective weights of `vision_scheme` / `text_scheme` (vlmc.compile.quantize) into a transformers
    Qwen VL model, in place: every linear (and the patch embedding) the deploy model quantizes, and the bf16
    token embedding table of a reduced-precision LLM artifact."""
    fake_quantize_modules({"": model.model.visual}, model.model.language_model, model.lm_head, vision_scheme,
                          text_scheme)


@torch.no_grad()
def fake_quantize_modules(vision: dict, text, lm_head, vision_scheme, text_scheme, vision_name=None) -> None:
    """The effective weights in place: `vision` maps a deploy-name prefix to a transformers module of the visual
    artifact, `text` is the text model (its embedding table stored bf16 when quantized; the shared decoder's
    names) and `vision_name` maps a tower module's name to (deploy layer, checkpoint layers fused into it)."""
    import torch.nn as nn

    from ....compile.quantize import effective_weight

    if text_scheme is not None and text_scheme.quantizes_weights:
        embed = text.embed_tokens.weight
        if lm_head.weight is embed:  # tied: the head is quantized, the table stored bf16; untie them
            lm_head.weight = nn.Parameter(embed.detach().clone())
        embed.copy_(embed.to(torch.bfloat16).float())
    parts = [(prefix, root, vision_scheme, vision_name or _deploy_name) for prefix, root in vision.items()]
    parts += [("", text, text_scheme, _deploy_name), ("", {"lm_head": lm_head}, text_scheme, _deploy_name)]
    quantized = {"vision": [], "text": []}  # the quantized layers of each artifact (the text one's: the lm_head too)
    for prefix, root, scheme, deploy_name in parts:
        if scheme is None or not scheme.quantizes_weights:
            continue
        modules = root.items() if isinstance(root, dict) else root.named_modules()
        for name, module in modules:
            if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                continue
            deploy, fused = deploy_name(prefix + name)
            if not scheme.skips(deploy, fused):
                module.weight.copy_(effective_weight(module.weight, scheme, deploy))
                quantized["text" if scheme is text_scheme else "vision"].append(module)
    # GEMM inputs (backend.compute: bf16 or int8): every layer of the visual artifact, on every call (the tower runs
    # on prompts only); the text model's layers (not the lm_head: logits stay fp32) in forwards over more than one
    # token, i.e. the prompt, which vlmc runs through its prompt graphs (decode steps keep fp32 inputs)
    if vision_scheme is not None and vision_scheme.compute != "fp32":
        for root in vision.values():
            _gemm_inputs(root, lambda: True, _int8_row_layers(vision_scheme, quantized["vision"]))
    if text_scheme is not None and text_scheme.compute != "fp32":
        _gemm_inputs(text, _prompt_flag(text), _int8_row_layers(text_scheme, quantized["text"]))
    # int8 decode GEMV inputs (backend.decode_compute): the int8/int4 layers (the lm_head too) in forwards over one
    # token, i.e. the decode steps
    if text_scheme is not None and text_scheme.decode_compute == "int8":
        prompt = _prompt_flag(text)
        _int8_inputs(quantized["text"], lambda: not prompt())


def _int8_row_layers(scheme, quantized) -> set:
    """The layers that take int8 inputs per row under backend.compute: int8 (int8 weights with one scale per row;
    compile.quantize.set_compute); the others take bf16 inputs."""
    per_row = scheme.compute == "int8" and scheme.weights == "int8" and scheme.group is None
    return {id(m) for m in quantized} if per_row else set()


def _prompt_flag(text):
    """A function telling whether the text model's current forward is over more than one token."""
    state = {"prompt": False}

    def hook(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs.get("input_ids") if x is None else x
        x = args[0] if x is None and args else x
        state["prompt"] = x is not None and x.shape[1] > 1

    text.register_forward_pre_hook(hook, with_kwargs=True)
    return lambda: state["prompt"]


def _int8_inputs(modules, active) -> None:
    """Each of `modules` quantizes its input as vlmc::qmatmul_a8 does (compile.quantize.int8_inputs) while
    `active()`."""
    from ....compile.quantize import int8_inputs

    for module in modules:
        def forward(x, *args, _forward=module.forward, **kwargs):
            return _forward(int8_inputs(x) if active() else x, *args, **kwargs)

        module.forward = forward


def _gemm_inputs(root, active, int8_rows: set) -> None:
    """Every linear / patch-convolution layer under `root` computes as vlmc's GEMMs with reduced inputs do while
    `active()` (in fp32 otherwise): those in `int8_rows` (ids) quantize their input per row as vlmc::qmatmul_i8 does
    (a patch convolution: per patch), the others round input and weight to bf16 as vlmc::qmatmul_bf16 does."""
    import torch.nn as nn

    from ....compile.quantize import bf16_round, int8_rows as int8_row_inputs

    def per_patch(x, conv):  # a patchifying convolution (kernel == stride): each patch is a row of the deploy GEMM
        dims = x.shape[2:]
        split = [s for d, k in zip(dims, conv.kernel_size) for s in (d // k, k)]
        patches = x.reshape(x.shape[0], x.shape[1], *split)
        order = [0, *range(2, patches.dim(), 2), 1, *range(3, patches.dim(), 2)]
        rows = patches.permute(order)
        flat = rows.reshape(*rows.shape[:1 + len(dims)], -1)
        return int8_row_inputs(flat).reshape(rows.shape).permute(
            [order.index(i) for i in range(len(order))]).reshape(x.shape)

    for module in root.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            continue
        if id(module) in int8_rows:
            if isinstance(module, nn.Linear):
                def forward(x, *args, _forward=module.forward, **kwargs):
                    return _forward(int8_row_inputs(x) if active() else x, *args, **kwargs)
            else:
                unpadded = module.padding == "valid" or not any(module.padding)
                if tuple(module.kernel_size) != tuple(module.stride) or not unpadded:
                    raise ValueError(f"{type(module).__name__} with kernel {module.kernel_size} and stride "
                                     f"{module.stride} is not a patch embedding; vlmc has no int8-input form of it")

                def forward(x, *args, _module=module, _forward=module.forward, **kwargs):
                    return _forward(per_patch(x, _module) if active() else x, *args, **kwargs)
        else:
            def forward(x, *args, _module=module, _forward=module.forward, **kwargs):
                if not active():
                    return _forward(x, *args, **kwargs)
                weight = _module.weight.data
                _module.weight.data = bf16_round(weight)
                try:
                    return _forward(bf16_round(x), *args, **kwargs)
                finally:
                    _module.weight.data = weight

        module.forward = forward
