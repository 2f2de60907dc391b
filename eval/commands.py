"""`vlmc eval ...`: evidence that the compiled model is the same model."""

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
    par.set_defaults(func=run_parity_command)


def run_parity_command(args) -> int:
    from .parity import failures, run_parity, write_report

    report = run_parity(args.checkpoint, args.model, args.vit_model, args.image, args.prompt, args.max_new_tokens)
    path = write_report(report, Path(args.report))
    failed = failures(report)
    summary = {"pass": not failed, "failures": failed, "report": str(path),
               "prefill_max_abs_diff": report["prefill_logits"]["max_abs_diff"],
               "identical_tokens": report["greedy"]["identical_tokens"]}
    print(json.dumps(summary))
    for line in failed:
        print(f"vlmc eval parity: FAIL {line}", file=sys.stderr)
    return 1 if failed else 0
