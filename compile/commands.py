"""`vlmc compile`: one command for every compile YAML; the YAML's `kind` picks the visual or the LLM graph."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import VlmcError


def register(sub) -> None:
    p = sub.add_parser(
        "compile", help="compile a model graph from a build YAML through TVM",
        description="Compile the graph a build YAML describes (kind: visual or llm) into an artifact folder "
                    "<workspace>/<name>: compiled library, parameters and manifest.json. Flags override the YAML. "
                    "Compiling again with the same inputs reuses the artifact unless --force. The last line "
                    "printed is the artifact's path.")
    p.add_argument("config", metavar="CONFIG.yaml", help="build config, e.g. build_in/build/qwen2_5_vl_visual.yaml")
    p.add_argument("--checkpoint", help="Hugging Face checkpoint folder (frontend.checkpoint)")
    p.add_argument("--workspace", help="folder the artifact is written under (workspace.path)")
    p.add_argument("--target", help="TVM target: a name such as llvm, or a JSON dict (backend.target)")
    p.add_argument("--dtype", help="backend.dtype: fp32 (activations); the vendor's fp16, bf16 and int8 are accepted "
                                   "and set the weight format (quantize.weights)")
    p.add_argument("--compute", help="GEMM input precision of the prompt and vision graphs: fp32; bf16 (inputs "
                                     "rounded to bf16, fp32 accumulation; fast on Intel CPUs with AMX or AVX512-BF16); "
                                     "or int8 (int8 per-channel weights take inputs quantized per token, int8 x int8 "
                                     "GEMMs on AMX; other layers bf16; not exact, opt-in, tp 1) (backend.compute)")
    p.add_argument("--decode-compute", help="LLM decode GEMV input precision: fp32, or int8 (int8/int4 layers "
                                            "quantize their input per block of 32 and take integer dot products, "
                                            "AVX512-VNNI; not exact, opt-in) (backend.decode_compute)")
    q = p.add_argument_group("reduced precision (quantize:)")
    q.add_argument("--weights", help="weight storage: fp32, bf16, fp16, int8 or int4 (quantize.weights)")
    q.add_argument("--group-size", type=_group_size,
                   help="int8/int4 inputs per scale: channel, 32, 64 or 128 (quantize.group_size; defaults: int8 "
                        "channel, int4 64)")
    q.add_argument("--kv-cache", help="LLM KV cache storage: fp32, bf16 or int8 (quantize.kv_cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if the artifact is up to date")
    v = p.add_argument_group("visual graph")
    v.add_argument("--max-patches", type=int, help="patch budget N, a multiple of 16 (frontend.max_patches)")
    v.add_argument("--patch-buckets", type=_int_list, metavar="N,N,...",
                   help="smaller patch budgets compiled too, so small images do not pay for the budget (default: a "
                        "quarter, half and three quarters of it) (frontend.patch_buckets)")
    v.add_argument("--max-tiles", type=int,
                   help="tiling models: the most tiles an image is cut into, its thumbnail not counted "
                        "(frontend.max_tiles)")
    v.add_argument("--onnx", action="store_true", default=None,
                   help="also export model.onnx, checked with onnxruntime (frontend.onnx: true)")
    llm = p.add_argument_group("LLM graph")
    llm.add_argument("--tp", type=int, help="tensor-parallel ranks (frontend.model_kwargs.tp)")
    llm.add_argument("--max-prefill", type=int, help="maximum prefill length P, a multiple of 16")
    llm.add_argument("--max-context", type=int, help="total context T (prompt + generated), a multiple of 16")
    llm.add_argument("--prefill-buckets", type=_int_list, metavar="N,N,...",
                     help="shorter prompt lengths compiled too, so short prompts do not pay for P (default: every 64 "
                          "up to 512, then coarser) (frontend.model_kwargs.prefill_buckets)")
    llm.add_argument("--batch-size", type=int, help="decode batch size (frontend.model_kwargs.batch_size)")
    p.set_defaults(func=run_compile)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _group_size(text: str):
    return int(text) if text.isdigit() else text


def check_architecture(expected: str | None, checkpoint: Path, config_path: Path):
    """Refuse a checkpoint of another architecture than the YAML's (or of none vlmc supports) before any work;
    the checkpoint's architecture module."""
    from ..build_in.source_code import ARCHITECTURES, detect_architecture, get_architecture

    if expected is not None and expected not in ARCHITECTURES:
        raise VlmcError(f"{config_path}: frontend.arch {expected!r} is not supported; supported: "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    found = detect_architecture(checkpoint)
    if expected is not None and found != expected:
        raise VlmcError(f"{config_path} builds {expected}, but {checkpoint} is a {found} checkpoint; use "
                        f"build_in/build/{found}_*.yaml or a {expected} checkpoint")
    return get_architecture(found)


def run_compile(args) -> int:
    from .artifact import is_up_to_date, weights_fingerprint
    from .config import apply_overrides, config_hash, load_config, resolve_checkpoint

    path = Path(args.config)
    cfg = load_config(path)
    common = {"frontend.checkpoint": args.checkpoint, "workspace.path": args.workspace,
              "backend.target": args.target, "backend.dtype": args.dtype, "backend.compute": args.compute,
              "quantize.weights": args.weights,
              "quantize.group_size": args.group_size}
    if cfg.kind == "visual":
        for flag in ("tp", "max_prefill", "max_context", "prefill_buckets", "batch_size", "kv_cache",
                     "decode_compute"):
            if getattr(args, flag) is not None:
                raise VlmcError(f"--{flag.replace('_', '-')} applies to LLM configs; {path} is a visual config")
        if args.max_tiles is not None and args.max_patches is not None:
            raise VlmcError("--max-tiles and --max-patches are two kinds of budget; give the one the model takes")
        cfg = apply_overrides(cfg, path, **common, **{"frontend.max_patches": args.max_patches,
                                                      "frontend.patch_buckets": args.patch_buckets,
                                                      "frontend.max_tiles": args.max_tiles,
                                                      "frontend.onnx": args.onnx})
        if args.max_patches is not None and cfg.frontend.shape is not None:
            cfg = apply_overrides(cfg, path, **{"frontend.shape": None, "frontend.max_patches": args.max_patches})
        build = "visual"
    else:
        given = [f for f in ("max_patches", "patch_buckets", "max_tiles", "onnx") if getattr(args, f)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise VlmcError(f"{flag} applies to visual configs; {path} is an LLM config")
        shape = cfg.frontend.shape.input_ids
        overrides = dict(common)
        if args.max_prefill is not None or args.max_context is not None:
            overrides["frontend.shape.input_ids"] = [[args.max_prefill or shape[0][0]],
                                                     [args.max_context or shape[1][0]]]
        overrides["frontend.model_kwargs.tp"] = args.tp
        overrides["frontend.model_kwargs.prefill_buckets"] = args.prefill_buckets
        overrides["frontend.model_kwargs.batch_size"] = args.batch_size
        overrides["quantize.kv_cache"] = args.kv_cache
        overrides["backend.decode_compute"] = args.decode_compute
        cfg = apply_overrides(cfg, path, **overrides)
        build = "llm"
    # Decide reuse before importing torch/TVM, so an up-to-date artifact is reported in about a second.
    checkpoint = resolve_checkpoint(cfg.frontend.checkpoint, path)
    arch = check_architecture(cfg.frontend.arch, checkpoint, path)
    out = Path(cfg.workspace.path) / cfg.name
    if not args.force and is_up_to_date(out, config_hash(cfg), weights_fingerprint(checkpoint),
                                        arch.host_spec(checkpoint).to_dict()):
        print(f"artifact is up to date (use --force to rebuild): {out}", file=sys.stderr)
    elif build == "visual":
        from .visual import compile_visual

        out = compile_visual(cfg, path)
    else:
        from .llm import compile_llm

        out = compile_llm(cfg, path)
    print(out)
    return 0
