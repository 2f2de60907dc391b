"""`vlmc eval parity` and `vlmc bench`: is the compiled model the same model, and how fast is it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .parity import THRESHOLDS


def register(sub) -> None:
    p = sub.add_parser("eval", help="check compiled artifacts against Hugging Face transformers",
                       description="Evaluation tools. parity: stage-by-stage comparison with transformers.")
    kinds = p.add_subparsers(dest="eval_kind", required=True, metavar="KIND")
    limits = ", ".join(f"{d}: image embedding relative error <= {t['embedding_rel']}, prefill/decode logits max "
                       f"abs diff <= {t['logits_abs']}, all greedy tokens identical" for d, t in THRESHOLDS.items())
    par = kinds.add_parser(
        "parity", help="compare vlmc with transformers stage by stage",
        description="Run transformers and vlmc on the same inputs and report host preprocessing differences, "
                    "image-embedding relative error per image, prefill logits (max abs diff, cosine, top-1), "
                    "decode logits per step and the identical greedy tokens before the first divergence. Writes "
                    f"parity.json, report.md and logits_error.png. Exits 1 when a stage exceeds its threshold ({limits}).")
    par.add_argument("--checkpoint", required=True, help="the Hugging Face checkpoint the artifacts came from")
    par.add_argument("--model", required=True, help="LLM artifact folder")
    par.add_argument("--vit_model", "--vit-model", dest="vit_model", help="visual artifact folder")
    par.add_argument("--image", action="append", default=[], help="image path; repeatable")
    par.add_argument("--prompt", default="Describe the image.", help="user text (default: Describe the image.)")
    par.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens to compare (default: 16)")
    par.add_argument("--report", default="parity-report", help="output folder (default: ./parity-report)")
    par.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where vlmc and transformers both run; "
                                                     "must match the artifacts' target (default: cpu)")
    par.set_defaults(func=run_parity_command)

    b = sub.add_parser(
        "bench", help="time transformers eager and vlmc side by side",
        description="Time, in one run on this machine, transformers eager and vlmc on the same image and prompt: "
                    "vision encode, time to first token, decode tokens/s, decode step at a short and a long "
                    "context, peak memory. Also measures memory read bandwidth and the decode floor (weight bytes "
                    "per token / bandwidth). Each side runs in its own process; warm-up excluded, medians of "
                    "repeats. Prints a table with vlmc/transformers ratios (below 1 is faster for times).")
    b.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint (the transformers side)")
    b.add_argument("--model", required=True, help="LLM artifact compiled from it")
    b.add_argument("--vit_model", "--vit-model", dest="vit_model", required=True, help="visual artifact")
    b.add_argument("--image-size", default="448x448", help="WIDTHxHEIGHT of the generated image (default 448x448)")
    b.add_argument("--prompt-tokens", type=int, default=32, help="text tokens besides the image (default 32)")
    b.add_argument("--new-tokens", type=int, default=32, help="generated tokens timed for decode (default 32)")
    b.add_argument("--short-context", type=int, default=64, help="cache length of the short decode step")
    b.add_argument("--long-context", type=int, help="cache length of the long decode step (default: context-1)")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (default 3)")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where both sides run; must match the "
                                                   "artifacts' target (default: cpu)")
    b.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    b.set_defaults(func=run_bench_command)


def run_parity_command(args) -> int:
    from ..compile.artifact import check_device, read_manifest
    from .parity import failures, run_parity, write_report

    device = check_device(read_manifest(args.model, kind="llm", verify=False), args.model, args.device)
    report = run_parity(args.checkpoint, args.model, args.vit_model, args.image, args.prompt, args.max_new_tokens,
                        device)
    path = write_report(report, Path(args.report))
    failed = failures(report)
    summary = {"pass": not failed, "failures": failed, "report": str(path),
               "prefill_max_abs_diff": report["prefill_logits"]["max_abs_diff"],
               "identical_tokens": report["greedy"]["identical_tokens"]}
    print(json.dumps(summary))
    for line in failed:
        print(f"vlmc eval parity: FAIL {line}", file=sys.stderr)
    return 1 if failed else 0


def run_bench_command(args) -> int:
    import tempfile

    import numpy as np
    from PIL import Image

    from ..compile.artifact import read_manifest
    from ..errors import VlmcError
    from .bench import format_table, run_bench

    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        raise VlmcError(f"--image-size must look like 448x448, got {args.image_size!r}") from None
    from ..compile.artifact import check_device

    manifest = read_manifest(args.model, kind="llm", verify=False)
    context, device = manifest["context"], check_device(manifest, args.model, args.device)
    long_context = args.long_context or context - args.new_tokens - 1
    if not 0 < args.short_context < long_context < context:
        raise VlmcError(f"need 0 < --short-context < --long-context < the compiled context {context}")
    with tempfile.TemporaryDirectory() as tmp:
        image = f"{tmp}/bench.png"
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image)
        report = run_bench({"checkpoint": args.checkpoint, "model": args.model, "vit_model": args.vit_model,
                            "image": image, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                            "short_context": args.short_context, "long_context": long_context,
                            "repeats": args.repeats, "device": device})
    print(json.dumps(report) if args.json else format_table(report))
    return 0
