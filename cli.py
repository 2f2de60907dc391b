"""The `vlmc` command: one entry point, one subcommand per job.

Each area owns its subcommands (compile/, runtime/, eval/) and registers them here; a subcommand is a function
taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from . import __version__
from .build_in.source_code import ARCHITECTURES
from .errors import VlmcError


def _add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="write a built-in random-weight checkpoint (for tests and demos)",
                       description="Write a random-weight checkpoint that loads offline through transformers: "
                                   "config, safetensors weights, tokenizer with the model's special tokens, chat "
                                   "template, generation and preprocessor configs. Same preset and seed, same bytes.")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    tiny = kinds.add_parser("tiny", help="a small random-weight model",
                            description="Write a small random-weight model of the given architecture.")
    tiny.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the checkpoint into")
    tiny.add_argument("--arch", default="qwen2_5_vl", choices=sorted(ARCHITECTURES),
                      help="architecture (default: qwen2_5_vl)")
    tiny.add_argument("--preset", default="tiny",
                      help="tiny: runs the pipeline in seconds; small: the real model's per-head shapes with few "
                           "layers (every architecture); qwen2_5_vl also: 3b-width: Qwen2.5-VL-3B's real widths "
                           "and vocabulary at reduced depth, for benchmarks (2.3 GB); 7b: Qwen2.5-VL-7B's real "
                           "shapes, depth and vocabulary in bf16, written a tensor at a time (16.6 GB; compile it "
                           "at int8 to run it on a 24 GB host) (default: tiny)")
    tiny.add_argument("--text", help="language model of families that take several (internvl: qwen2, the default, "
                                     "or qwen3)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    tiny.add_argument("--init-std", type=float,
                      help="standard deviation of the random weights (the config's initializer_range; default 0.1, "
                           "which keeps random logits well separated; real models declare 0.02, where precision "
                           "losses measure as they would on trained weights)")
    tiny.add_argument("--text-layers", type=int,
                      help="decoder layers instead of the preset's (Qwen families), e.g. 12 or 36 on 3b-width for "
                           "benchmarks at real depth")
    tiny.add_argument("--vision-depth", type=int,
                      help="vision blocks instead of the preset's (Qwen families); full-attention and deepstack "
                           "blocks keep their places relative to the depth")
    tiny.set_defaults(func=_run_checkpoint)


def _run_checkpoint(args) -> int:
    import inspect

    from .build_in.source_code import get_architecture

    arch = get_architecture(args.arch)
    if args.preset not in arch.PRESETS:
        raise VlmcError(f"unknown preset {args.preset!r} for {args.arch}; choose one of {', '.join(arch.PRESETS)}")
    if args.init_std is not None and not args.init_std > 0:
        raise VlmcError(f"--init-std must be positive, got {args.init_std}")
    choices = getattr(arch, "TEXT_MODELS", ())
    if args.text is not None and args.text not in choices:
        raise VlmcError(f"--text {args.text!r} is not available for {args.arch}; "
                        + (f"choose one of {', '.join(choices)}" if choices else "it has one language model"))
    text = {"text": args.text} if args.text is not None else {}
    for flag in ("text_layers", "vision_depth"):
        value = getattr(args, flag)
        if value is None:
            continue
        if flag not in inspect.signature(arch.write_checkpoint).parameters:
            raise VlmcError(f"--{flag.replace('_', '-')} is not available for {args.arch} (Qwen families only)")
        if value <= 0:
            raise VlmcError(f"--{flag.replace('_', '-')} must be positive, got {value}")
        text[flag] = value
    out = arch.write_checkpoint(args.out_dir, preset=args.preset, seed=args.seed, init_std=args.init_std, **text)
    print(out)
    return 0


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="build a tiny model, compile both graphs and answer a question",
                       description="The whole flow on the built-in tiny model: write a random-weight checkpoint, "
                                   "compile the visual and LLM graphs from the shipped YAMLs, and answer a question "
                                   "about the bundled demo image. The answer is random-weight gibberish; the point "
                                   "is that every stage runs.")
    p.add_argument("--workdir", default="vlmc-quickstart", help="folder for the checkpoint and artifacts "
                                                                 "(default: ./vlmc-quickstart)")
    p.add_argument("--arch", default="qwen2_5_vl", choices=sorted(ARCHITECTURES),
                   help="architecture of the tiny model, compiled with build_in/build/ARCH_{visual,llm}.yaml "
                        "(default: qwen2_5_vl)")
    p.set_defaults(func=_run_quickstart)


def _run_quickstart(args) -> int:
    from pathlib import Path

    root = Path(__file__).resolve().parent / "build_in"
    work = Path(args.workdir)
    arch = args.arch
    checkpoint, workspace = work / f"tiny-{arch}", work / "workspace"
    steps = [
        ["checkpoint", "tiny", "--arch", arch, str(checkpoint), "--preset", "tiny"],
        ["compile", str(root / "build" / f"{arch}_visual.yaml"), "--checkpoint", str(checkpoint),
         "--workspace", str(workspace)],
        ["compile", str(root / "build" / f"{arch}_llm.yaml"), "--checkpoint", str(checkpoint),
         "--workspace", str(workspace)],
        ["generate", "--model", str(workspace / f"{arch}_llm"), "--vit_model",
         str(workspace / f"{arch}_visual"), "--image", str(root / "assets" / "demo.png"),
         "--prompt", "What is in this picture?", "--max-new-tokens", "24", "--json"],
    ]
    for step in steps:
        print("$ vlmc " + " ".join(step), file=sys.stderr, flush=True)
        code = main(step)
        if code:
            return code
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .compile import commands as compile_commands
    from .eval import commands as eval_commands
    from .runtime import commands as runtime_commands
    from .runtime import serve as serve_commands

    parser = argparse.ArgumentParser(
        prog="vlmc",
        description="Compile vision-language models through TVM, run and serve them, and check them against "
                    "Hugging Face transformers.",
    )
    parser.add_argument("--version", action="version", version=f"vlmc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_checkpoint(sub)
    _add_quickstart(sub)
    compile_commands.register(sub)
    runtime_commands.register(sub)
    serve_commands.register(sub)
    eval_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # torch.export's pytree pickling warns about its own deprecated API on every export; not actionable here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (VlmcError, FileNotFoundError, ValueError) as exc:
        if args.verbose or os.environ.get("VLMC_TRACEBACK"):
            raise
        print(f"vlmc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlmc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
