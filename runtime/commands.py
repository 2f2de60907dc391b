"""Runtime subcommands: preprocess (host ops only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import VlmcError


def register(sub) -> None:
    p = sub.add_parser(
        "preprocess", help="run the host ops on images and a prompt and save what the graphs would get",
        description="Run vlmc's host ops (image loading, smart_resize, normalisation, patches, chat template, "
                    "image token expansion, M-RoPE positions) and write pixel_values, image_grid_thw, input_ids, "
                    "position_ids [3, seq] and rope_deltas to an .npz file. Uses only the checkpoint's tokenizer "
                    "and configs, never transformers' processor.")
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--image", action="append", default=[],
                   help="image path, file:// URL or data: URI; repeat for several images (in prompt order)")
    p.add_argument("--prompt", required=True, help="user text, placed after the images")
    p.add_argument("--out", required=True, help="output .npz path")
    p.add_argument("--min-pixels", type=int, help="lower bound on resized pixels (default: the checkpoint's)")
    p.add_argument("--max-pixels", type=int, help="upper bound on resized pixels (default: the checkpoint's)")
    p.set_defaults(func=run_preprocess)


def run_preprocess(args) -> int:
    from transformers import AutoTokenizer

    from ..build_in.source_code import detect_architecture, get_architecture
    from .cpu_ops.pipeline import prepare_prompt

    arch = get_architecture(detect_architecture(args.checkpoint))
    spec = arch.host_spec(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    image_cfg = spec.image.with_pixels(args.min_pixels, args.max_pixels)
    prepared = prepare_prompt(tokenizer, spec, args.image, args.prompt, image_config=image_cfg)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise VlmcError(f"output folder {out.parent} does not exist")
    np.savez(out, pixel_values=prepared.pixel_values, image_grid_thw=prepared.image_grid_thw,
             input_ids=prepared.input_ids, position_ids=prepared.position_ids,
             rope_deltas=np.asarray(prepared.rope_deltas, dtype=np.int64))
    print(f"{len(args.image)} image(s), {prepared.num_tokens} tokens, "
          f"{prepared.pixel_values.shape[0]} patches -> {out}")
    return 0
