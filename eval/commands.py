"""`vlmc eval parity|accuracy|perf` and `vlmc bench`: is the compiled model the same model, how accurate and how
fast is it."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from .parity import THRESHOLDS


def register(sub) -> None:
    p = sub.add_parser("eval", help="parity with transformers; evalscope accuracy and perf runs against vlmc serve",
                       description="Evaluation tools. parity: stage-by-stage comparison with transformers. "
                                   "accuracy, perf: evalscope runs against a `vlmc serve` daemon (needs the eval "
                                   "extra: pip install -e '.[eval]').")
    kinds = p.add_subparsers(dest="eval_kind", required=True, metavar="KIND")
    limits = ", ".join(f"{d}: image embedding relative error <= {t['embedding_rel']}, prefill/decode logits max "
                       f"abs diff <= {t['logits_rel']} x the largest reference logit, all greedy tokens identical"
                       for d, t in THRESHOLDS.items())
    par = kinds.add_parser(
        "parity", help="compare vlmc with transformers stage by stage",
        description="Run transformers and vlmc on the same inputs and report host preprocessing differences, "
                    "image-embedding relative error per image, prefill logits (max abs diff, cosine, top-1), "
                    "decode logits per step and the identical greedy tokens before the first divergence (tier A: for "
                    "a reduced-precision artifact the reference computes with the artifact's own effective weights, "
                    "and with its KV cache rounding through vlmc's deploy model in PyTorch). Also reports tier B, "
                    "unquantized transformers teacher-forced along its greedy tokens: KL divergence mean and p99, "
                    "top-1 agreement, top-5 containment, first greedy divergence (`quality` in parity.json). Writes "
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
    par.add_argument("--backend", choices=["tvm", "onnxruntime"], default="tvm",
                     help="onnxruntime: also run the visual artifact's ONNX export (compile with --onnx) and check "
                          "its image embeddings against transformers and TVM, same threshold (default: tvm only)")
    par.set_defaults(func=run_parity_command)
    _register_accuracy(kinds)
    _register_perf(kinds)

    b = sub.add_parser(
        "bench", help="time transformers eager and vlmc side by side",
        description="Time, in one run on this machine, transformers eager and vlmc on the same image and prompt: "
                    "vision encode, time to first token, decode tokens/s, decode step at a short and a long "
                    "context (one sequence), for an LLM artifact compiled with --batch-size N > 1 one decode step "
                    "of N sequences (and its aggregate tokens/s), peak memory. Also measures memory read bandwidth (the fastest of a few all-core "
                    "reads, taken between the decode steps) and the decode floor (weight bytes per token / "
                    "bandwidth), and lists each artifact's compile time by stage. Each side runs in its own "
                    "process, transformers with its default thread settings; both stay loaded and take turns (a "
                    "warm-up call, then the timed calls; the order alternates), so that the machine's slow spells "
                    "fall on both; medians of the repeats (decode steps: 10 timed calls per turn). Prints a table "
                    "with vlmc/transformers ratios (below 1 is faster for times).")
    b.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint (the transformers side)")
    b.add_argument("--model", required=True, help="LLM artifact compiled from it")
    b.add_argument("--vit_model", "--vit-model", dest="vit_model", required=True, help="visual artifact")
    b.add_argument("--image-size", default="448x448", help="WIDTHxHEIGHT of the generated image (default 448x448)")
    b.add_argument("--prompt-tokens", type=int, default=32, help="text tokens besides the image (default 32)")
    b.add_argument("--new-tokens", type=int, default=32, help="generated tokens timed for decode (default 32)")
    b.add_argument("--short-context", type=int, default=64, help="cache length of the short decode step")
    b.add_argument("--long-context", type=int, help="cache length of the long decode step (default: context-1)")
    b.add_argument("--repeats", type=int, default=3,
                   help="turns per figure; each side is timed once per turn (default 3)")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where both sides run; must match the "
                                                   "artifacts' target (default: cpu)")
    b.add_argument("--peers", default="",
                   help="also time these runtimes in the same run, comma-separated RUNTIME[:VARIANT]: openvino "
                        "(fp32 with exact f32 hints), openvino:default (the CPU plugin's default precision: bf16 "
                        "where the CPU has it), openvino:int8 (int8 weights), llamacpp (f32 GGUF, f32 KV cache), "
                        "llamacpp:f16, llamacpp:q8_0, llamacpp:q4_0. Each converts the checkpoint with "
                        "its own tool once (kept under --peers-workspace) and runs in its own Python; warm-ups use "
                        "another image. Reports vision encode, time to first token, decode tokens/s, peak memory, "
                        "load time and how many greedy tokens equal transformers', with ranges")
    b.add_argument("--openvino-python", default=sys.executable,
                   help="Python with openvino-genai and optimum-intel (default: this one)")
    b.add_argument("--llamacpp-python", default=sys.executable,
                   help="Python with llama-cpp-python (built with its mtmd vision support) and gguf "
                        "(default: this one)")
    b.add_argument("--llamacpp-converter", metavar="convert_hf_to_gguf.py",
                   help="llama.cpp's converter, from the same source as the runtime (llamacpp peers)")
    b.add_argument("--peers-workspace", default="vlmc-peers",
                   help="folder for the peers' converted models and their log (default: ./vlmc-peers)")
    b.add_argument("--plot", metavar="PNG", help="also draw each figure's medians and ranges, one bar per side")
    b.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    b.set_defaults(func=run_bench_command)


def _register_accuracy(kinds) -> None:
    from .evalscope_runs import LOCAL_KINDS, VENDOR

    mapping = "; ".join(f"{k} -> {b.evalscope}" + (f" subset {b.subset}" if b.subset else "") for k, b in VENDOR.items())
    acc = kinds.add_parser(
        "accuracy", help="evalscope accuracy benchmarks against a running vlmc serve",
        description="Run evalscope's accuracy benchmarks against a running `vlmc serve` (its OpenAI API), greedy. "
                    f"Vendor names map onto evalscope benchmarks: {mapping}. Also takes your own data as "
                    f"{' / '.join(LOCAL_KINDS)} (evalscope's custom formats; needs --local-path). Without "
                    "--local-path a built-in benchmark is downloaded from the dataset hub; offline that fails at once "
                    "with how to provide a local copy (docs/eval.md). Prints a score table and where the full "
                    "report is; writes vlmc_accuracy.json in the work dir.")
    acc.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:9900 (or .../v1)")
    acc.add_argument("--model", required=True, help="model name to send (the server's --served-model-name)")
    acc.add_argument("--datasets", nargs="+", required=True, metavar="NAME",
                     help=f"any of {', '.join([*VENDOR, *LOCAL_KINDS])}")
    acc.add_argument("--local-path", action="append", default=[], metavar="NAME=DIR",
                     help="local copy of a dataset (repeatable); NAME is a dataset name above (mm_bench=DIR covers "
                          "both MMBench names)")
    acc.add_argument("--limit", type=int, help="at most N samples per subset (MMMU has 30 subsets)")
    acc.add_argument("--max-tokens", type=int,
                     help="generated-token cap per answer (default: up to the server's compiled context)")
    acc.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    acc.add_argument("--timeout", type=float, help="per-request timeout in seconds (default: evalscope's)")
    acc.add_argument("--dataset-hub", choices=["modelscope", "huggingface"], default="modelscope",
                     help="where missing built-in datasets are downloaded from (default modelscope)")
    acc.add_argument("--work-dir", default="vlmc-eval/accuracy",
                     help="output folder: reports/, predictions/, evalscope.log (default ./vlmc-eval/accuracy)")
    acc.add_argument("--api-key", help="the server's --api-key, if it has one")
    acc.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    acc.set_defaults(func=_run_accuracy)


def _register_perf(kinds) -> None:
    perf = kinds.add_parser(
        "perf", help="evalscope perf (random image + text requests) against a running vlmc serve",
        description="Drive `evalscope perf --api openai --dataset random_vl` against a running `vlmc serve`: "
                    "streamed requests with one random image of --image-size and --prompt-tokens text tokens, "
                    "exactly --output-tokens generated (min_tokens + ignore_eos), at each --parallel concurrency. "
                    "Prints TTFT, TPOT, latency and throughput per concurrency and saves perf.png (throughput and "
                    "TTFT against concurrency). Exits 1 if any request failed.")
    perf.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:9900")
    perf.add_argument("--model", required=True, help="model name to send (the server's --served-model-name)")
    perf.add_argument("--tokenizer-path", required=True,
                      help="local checkpoint folder with the tokenizer (evalscope sizes the random prompts with it)")
    perf.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4], help="concurrency levels (default 1 2 4)")
    perf.add_argument("--number", type=int, nargs="+",
                      help="requests per concurrency level, one per --parallel value (default: 2 x parallel)")
    perf.add_argument("--image-size", default="448x448", help="WIDTHxHEIGHT of the random images (default 448x448)")
    perf.add_argument("--image-num", type=int, default=1, help="images per request (default 1)")
    perf.add_argument("--prompt-tokens", type=int, default=64,
                      help="text tokens per request including the chat template, which takes about 20 (default 64)")
    perf.add_argument("--output-tokens", type=int, default=32, help="generated tokens per request (default 32)")
    perf.add_argument("--name", default="perf", help="run name: results go to WORK_DIR/NAME (default perf)")
    perf.add_argument("--work-dir", default="vlmc-eval", help="output folder (default ./vlmc-eval)")
    perf.add_argument("--api-key", help="the server's --api-key, if it has one")
    perf.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    perf.set_defaults(func=_run_perf)


def _run_accuracy(args) -> int:
    from .evalscope_runs import run_accuracy

    return run_accuracy(args)


def _run_perf(args) -> int:
    from .evalscope_runs import run_perf

    return run_perf(args)


def run_parity_command(args) -> int:
    from ..runtime.artifact import check_device, read_manifest
    from .parity import failures, run_parity, write_report

    device = check_device(read_manifest(args.model, kind="llm", verify=False), args.model, args.device)
    report = run_parity(args.checkpoint, args.model, args.vit_model, args.image, args.prompt, args.max_new_tokens,
                        args.backend, device)
    path = write_report(report, Path(args.report))
    failed = failures(report)
    summary = {"pass": not failed, "failures": failed, "report": str(path),
               "prefill_max_abs_diff": report["prefill_logits"]["max_abs_diff"],
               "identical_tokens": report["greedy"]["identical_tokens"],
               "quality": {k: v for k, v in report["quality"].items() if k != "kl_per_step"}}
    if "onnxruntime" in report:
        summary["onnxruntime_embedding_rel_error"] = report["onnxruntime"]["image_embedding_rel_error"]
    print(json.dumps(summary))
    for line in failed:
        print(f"vlmc eval parity: FAIL {line}", file=sys.stderr)
    return 1 if failed else 0


def run_bench_command(args) -> int:
    import tempfile

    import numpy as np
    from PIL import Image

    from ..runtime.artifact import read_manifest
    from ..errors import VlmcError
    from .bench import _prompt, format_table, run_bench
    from .peers import chat_prompts, check_python, parse_peers

    peers = parse_peers(args.peers)
    if peers and args.device != "cpu":
        raise VlmcError("--peers runs the peers on the CPU: use it with --device cpu")
    pythons = {"openvino": args.openvino_python, "llamacpp": args.llamacpp_python}
    for runtime in sorted({peer.runtime for peer in peers}):
        check_python(runtime, pythons[runtime])
    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        raise VlmcError(f"--image-size must look like 448x448, got {args.image_size!r}") from None
    from ..runtime.artifact import check_device

    manifest = read_manifest(args.model, kind="llm", verify=False)
    context, device = manifest["context"], check_device(manifest, args.model, args.device)
    long_context = args.long_context or context - args.new_tokens - 1
    if not 0 < args.short_context < long_context < context:
        raise VlmcError(f"need 0 < --short-context < --long-context < the compiled context {context}")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        image, warmup_image = f"{tmp}/bench.png", f"{tmp}/warmup.png"
        for seed, path in ((0, image), (1, warmup_image)):  # warm-ups on other pixels: no cache can be reused
            pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        extra = {}
        if peers:
            from transformers import AutoTokenizer

            workspace = Path(args.peers_workspace)
            workspace.mkdir(parents=True, exist_ok=True)
            tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
            prompts = chat_prompts(args.checkpoint, _prompt(tokenizer, args.prompt_tokens), tokenizer)
            extra = {"peers": [(peer, pythons[peer.runtime]) for peer in peers], "peers_workspace": str(workspace),
                     "peers_log": stack.enter_context(open(workspace / "peers.log", "a")), "prompts": prompts,
                     "threads": len(os.sched_getaffinity(0)), "context": int(context),
                     "llamacpp_converter": args.llamacpp_converter}
        report = run_bench({"checkpoint": args.checkpoint, "model": args.model, "vit_model": args.vit_model,
                            "image": image, "warmup_image": warmup_image, "prompt_tokens": args.prompt_tokens,
                            "new_tokens": args.new_tokens, "short_context": args.short_context,
                            "long_context": long_context, "repeats": args.repeats, "device": device,
                            "streams": int(manifest["batch_size"]), **extra})
    if args.plot:
        from .bench import write_plot

        write_plot(report, args.plot)
    print(json.dumps(report) if args.json else format_table(report))
    return 0
