"""`vlmc bench`: time transformers eager and vlmc side by side in one run, on the same machine and inputs.

Each side runs in its own process (their thread pools would otherwise fight over the cores); both stay loaded and
take turns, a warm-up call and then the timed calls, and the median of the repeats is reported. The machine's memory
read bandwidth is measured in the same run and gives the decode floor: bytes of weights read per token / bandwidth.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import numpy as np

from . import peers as peers_mod
from .peers.side_protocol import peak_rss_mib

METRICS = [("vision_encode_s", "vision encode (s)"), ("ttft_s", "time to first token (s)"),
           ("decode_tokens_per_s", "decode tokens/s"), ("decode_step_short_s", "decode step, short context (s)"),
           ("decode_step_long_s", "decode step, long context (s)"),
           # with the artifact's compiled batch > 1: one decode step of that many sequences at the short context
           ("decode_step_streams_s", "decode step, all streams (s)"),
           ("decode_tokens_per_s_streams", "decode tokens/s, all streams"), ("peak_rss_mib", "peak memory (MiB)")]


# What a peer runtime times (no decode step at a set cache length: their APIs have none), and what is compared
PEER_FIGURES = ("vision_encode_s", "ttft_s", "decode_s")
PEER_METRICS = ("vision_encode_s", "ttft_s", "decode_tokens_per_s", "peak_rss_mib", "load_s")

PAUSE_S = 0.02  # between turns
# Timed decode steps per turn: a step is short (a millisecond on small models) and the first ones after the other
# side's turn run on cold caches and sleeping threads (measured: 3.6 ms instead of 1.5 after a 0.2 s pause).
STEPS_PER_TURN = 10


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(megabytes: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Memory read bandwidth in bytes/s: the fastest of a few all-core reads of an array larger than the caches."""
    if device != "cpu":  # the GPU's memory: that is where the weights are read from
        import torch

        big = torch.ones(megabytes * 4 * (1 << 20) // 4, device=device)
        seconds = _median_time(lambda: (big.sum(), torch.cuda.synchronize(device)), repeats)
        return big.numel() * 4 / seconds
    import torch

    # numpy's sum runs on one core, which does not saturate the memory bus; torch's sum and BLAS matrix-vector
    # products (both layouts: what decode steps run) use every core. The best of them is the floor's bandwidth.
    data = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    matrix = data.reshape(-1, 4096)
    reads = [lambda: torch.from_numpy(data).sum(), lambda: matrix @ np.ones(matrix.shape[1], np.float32),
             lambda: np.ones(matrix.shape[0], np.float32) @ matrix]
    return max(data.nbytes / _median_time(read, repeats) for read in reads)


def _prompt(tokenizer, tokens: int) -> str:
    words, text = ["describe", "the", "picture", "in", "detail"], []
    while len(tokenizer(" ".join(text), add_special_tokens=False)["input_ids"]) < tokens:
        text.append(words[len(text) % len(words)])
    return " ".join(text)


# What each side times, in this order. "decode_s" is the part of a generate call after its first token (n - 1 decode
# steps), timed inside the call: the difference of two whole-call medians drowned it in the prefill's noise.
TIMED = ["vision_encode_s", "ttft_s", "decode_s", "decode_step_short_s", "decode_step_long_s"]


def _timers_hf(args: dict):
    """transformers eager: ({figure: a callable that runs it once}, a callable for the final figures, cleanup)."""
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, DynamicCache
    from transformers.generation.streamers import BaseStreamer

    from ..build_in.source_code import detect_architecture, get_architecture

    reference = get_architecture(detect_architecture(args["checkpoint"])).reference
    device = args.get("device", "cpu")
    torch.set_grad_enabled(False)  # inference, as vlmc's: no autograd records (this process only times this model)
    t0 = time.perf_counter()
    model = reference.load_model(args["checkpoint"]).to(device)
    load_s = time.perf_counter() - t0
    greedy = []
    # GPU kernels run asynchronously: a timed call ends only when the device is done.
    sync = (lambda: torch.cuda.synchronize(device)) if device != "cpu" else (lambda: None)
    image = Image.open(args["image"])  # for the untimed inputs; timed calls open the file, as vlmc's do
    prompt = _prompt(AutoTokenizer.from_pretrained(args["checkpoint"]), args["prompt_tokens"])
    ref = reference.reference_inputs(args["checkpoint"], [image], prompt, model=model)
    kwargs = dict(input_ids=ref["input_ids"], attention_mask=torch.ones_like(ref["input_ids"]),
                  mm_token_type_ids=ref["mm_token_type_ids"], pixel_values=ref["pixel_values"],
                  image_grid_thw=ref["image_grid_thw"])
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    n = args["new_tokens"]

    def vision():  # the file's decoding and the processor's host work count, as vlmc's do
        r = reference.reference_inputs(args["checkpoint"], [Image.open(args["image"])], prompt, model=model)
        reference.vision_outputs(model, r["pixel_values"], r["image_grid_thw"])
        sync()

    def ttft():
        r = reference.reference_inputs(args["checkpoint"], [Image.open(args["image"])], prompt, model=model)
        model(**dict(kwargs, pixel_values=r["pixel_values"].to(device)), logits_to_keep=1)
        sync()

    class TokenTimes(BaseStreamer):  # generate() hands it the prompt, then each new token as it is chosen
        def __init__(self):
            self.times = []

        def put(self, value):
            sync()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def decode() -> float:
        tokens = TokenTimes()
        out = model.generate(**kwargs, do_sample=False, max_new_tokens=n, min_new_tokens=n, streamer=tokens)
        greedy[:] = out[0, kwargs["input_ids"].shape[1]:].tolist()
        return tokens.times[-1] - tokens.times[1]  # first new token -> last: n - 1 decode steps

    def decode_step(length: int, batch: int = 1):
        cache = DynamicCache(config=model.config)
        for layer in range(text.num_hidden_layers):
            kv = torch.randn(batch, text.num_key_value_heads, length, head_dim, device=device)
            cache.update(kv, kv.clone(), layer)
        token = torch.ones((batch, 1), dtype=torch.long, device=device)
        mask = torch.ones(batch, length + 1, dtype=torch.long, device=device)
        position_ids = torch.full((3, batch, 1), length, device=device)

        def step():
            model(input_ids=token, cache=cache, attention_mask=mask, position_ids=position_ids,
                  use_cache=True)
            cache.crop(-1)  # drop the token again so every step sees `length` cached positions
            sync()

        return step

    def final() -> dict:
        out = {"peak_rss_mib": peak_rss_mib(), "load_s": load_s,
               "tokens": greedy}
        if device != "cpu":
            out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / (1 << 20)
        return out

    timers = {"vision_encode_s": vision, "ttft_s": ttft, "decode_s": decode,
              "decode_step_short_s": decode_step(args["short_context"]),
              "decode_step_long_s": decode_step(args["long_context"])}
    if args["streams"] > 1:
        timers["decode_step_streams_s"] = decode_step(args["short_context"], args["streams"])
    return timers, final, lambda: None


def _timers_vlmc(args: dict):
    from ..runtime.cpu_ops.sampling import SamplingParams
    from ..runtime.llm.engine import Sequence
    from ..runtime.llm.pipeline import Pipeline

    import tvm  # noqa: F401  the libraries are imported before the load is timed, as on every side
    from transformers import AutoTokenizer  # noqa: F401

    t0 = time.perf_counter()
    pipe = Pipeline(args["model"], args["vit_model"], args.get("device", "cpu"))
    load_s = time.perf_counter() - t0
    prompt = _prompt(pipe.tokenizer, args["prompt_tokens"])
    n = args["new_tokens"]
    greedy = []

    def vision():
        pipe.encode_images([args["image"]])

    def ttft():
        pipe.generate([args["image"]], prompt, 1, SamplingParams(min_tokens=1))

    def decode() -> float:
        result = pipe.generate([args["image"]], prompt, n, SamplingParams(min_tokens=n))
        greedy[:] = result.token_ids
        return result.timings["decode_s"]

    def decode_step(length: int, batch: int = 1):
        def step():
            seqs = [Sequence(slot, 0) for slot in range(batch)]
            for seq in seqs:  # on every rank; the cache contents do not change the cost
                pipe.engine.reserve(seq, length)
            pipe.engine.decode(seqs, [1] * batch)
            for seq in seqs:
                pipe.engine.release(seq)

        return step

    def final() -> dict:
        from ..runtime.artifact import bf16_gemm_path, int8_gemm_path

        computes = {pipe.llm.manifest.get("compute", "fp32"), pipe.visual.manifest.get("compute", "fp32")}
        library = next(pipe.llm.path.glob("*.so"))
        return {"weight_bytes_per_token": _weight_bytes(pipe.llm),
                "peak_rss_mib": peak_rss_mib(), "load_s": load_s,
                "tokens": greedy,
                # how this process ran the reduced-input GEMMs (bf16: mkl or fp32; int8: amx or fp32), if any; int8
                # compute runs its other layers with bf16 inputs
                "bf16_gemm_path": bf16_gemm_path(library) if computes & {"bf16", "int8"} else None,
                "int8_gemm_path": int8_gemm_path(library) if "int8" in computes else None}

    timers = {"vision_encode_s": vision, "ttft_s": ttft, "decode_s": decode,
              "decode_step_short_s": decode_step(args["short_context"]),
              "decode_step_long_s": decode_step(args["long_context"])}
    if args["streams"] > 1:
        timers["decode_step_streams_s"] = decode_step(args["short_context"], args["streams"])
    return timers, final, pipe.close


def _weight_bytes(llm) -> int:
    """Bytes of LLM weights a decode step reads (all ranks; the embedding table is only looked up): the stored bytes
    of every tensor, whatever its dtype, from each parameter file's header."""
    from ..runtime.safetensors_io import read_header

    return sum(end - begin for rank in range(llm.tp)
               for info in read_header(llm.path / f"rank_{rank}" / "params.safetensors")[0].values()
               for begin, end in [info["data_offsets"]])


def _serve_side(side: str, args: dict, conn) -> None:
    """A side's process: set up, then time a figure as the parent asks (a warm-up call, then `count` timed calls)
    until told to stop."""
    close = None
    try:
        timers, final, close = (_timers_hf if side == "transformers" else _timers_vlmc)(args)
        conn.send(("ready", None))
        while (request := conn.recv()) is not None:
            figure, count = request
            timers[figure]()  # warm-up: caches and thread pools, after the other side's turn
            times = []
            for _ in range(count):
                t0 = time.perf_counter()
                inner = timers[figure]()  # a timer may return the seconds of the part of its call that counts
                times.append(time.perf_counter() - t0 if inner is None else float(inner))
            conn.send(("ok", times))
        conn.send(("ok", final()))
    except Exception as exc:  # reported by the parent as a one-line error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if close is not None:
            close()


class _Side:
    """The parent's handle on one side's process."""

    def __init__(self, name: str, args: dict, ctx):
        self.name = name
        self.conn, child = ctx.Pipe()
        # Not a daemon: a tp > 1 artifact's side spawns its rank processes. It ends when the parent's pipe closes.
        self.proc = ctx.Process(target=_serve_side, args=(name, args, child))
        with _reference_thread_env(name == "transformers"):
            self.proc.start()
        child.close()

    def ask(self, request):
        from ..errors import VlmcError

        if request is not None:
            self.conn.send(request)
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise VlmcError(f"bench: the {self.name} side exited unexpectedly (exit code {self.proc.exitcode})") \
                from None
        if status == "error":
            raise VlmcError(f"bench: the {self.name} side failed: {value}")
        return value

    def finish(self) -> dict:
        self.conn.send(None)
        out = self.ask(None)
        self.proc.join()
        return out

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()


@contextlib.contextmanager
def _reference_thread_env(reference: bool):
    """Start transformers' side with the thread settings it would have on its own, not vlmc's (see vlmc/__init__)."""
    from .. import THREAD_ENV_SET_HERE

    saved = dict(os.environ)
    if reference:
        os.environ["VLMC_THREAD_ENV"] = "0"
        for name in THREAD_ENV_SET_HERE:
            os.environ.pop(name, None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_bench(args: dict) -> dict:
    """Both sides stay loaded in their own processes and take turns (the order alternating between rounds), so
    that a slow spell on this shared machine falls on both sides alike. A turn is a warm-up call and then the timed
    calls: one, or STEPS_PER_TURN for the decode steps. Medians are reported."""
    ctx = multiprocessing.get_context("spawn")
    peers = args.get("peers") or []
    peer_models = [peers_mod.convert(peer, args["checkpoint"], python, Path(args["peers_workspace"]),
                                     args["peers_log"], args.get("llamacpp_converter"))
                   for peer, python in peers]  # before any side starts: conversions take the whole machine
    inputs = {k: v for k, v in args.items() if k not in ("peers", "peers_log")}
    sides = []
    try:
        for name in ("transformers", "vlmc"):  # one at a time: their start-ups would otherwise compete
            sides.append(_Side(name, inputs, ctx))
            sides[-1].ask(None)
        for (peer, python), model_dir in zip(peers, peer_models):
            common = {"image": args["image"], "warmup_image": args["warmup_image"], "new_tokens": args["new_tokens"],
                      "threads": args["threads"], "context": args["context"]}
            settings = peers_mod.side_settings(peer, model_dir, common, args["prompts"])
            sides.append(peers_mod.PeerSide(peer, python, settings, args["peers_log"]))
        timed = TIMED + (["decode_step_streams_s"] if args["streams"] > 1 else [])
        samples = {side.name: {figure: [] for figure in timed} for side in sides}
        bandwidths = []
        for figure in timed:
            per_turn = STEPS_PER_TURN if figure.startswith("decode_step") else 1
            turn = [side for side in sides if figure in PEER_FIGURES or not isinstance(side, peers_mod.PeerSide)]
            for r in range(args["repeats"]):
                for side in turn if r % 2 == 0 else turn[::-1]:
                    time.sleep(PAUSE_S)  # the other side's idle threads stop spinning
                    samples[side.name][figure] += side.ask((figure, per_turn))
                if figure == "decode_step_short_s":
                    # The floor's bandwidth, read between the steps it judges: it moved between 30 and 60 GB/s
                    # within an hour here.
                    time.sleep(PAUSE_S)
                    bandwidths.append(read_bandwidth(repeats=3, device=args.get("device", "cpu")))
        results, ranges = {}, {}
        for side in sides:
            taken = {figure: times for figure, times in samples[side.name].items() if times}
            out = {figure: statistics.median(times) for figure, times in taken.items()}
            out["decode_tokens_per_s"] = (args["new_tokens"] - 1) / max(out.pop("decode_s"), 1e-9)
            ranges[side.name] = {figure: [min(times), max(times)] for figure, times in taken.items()}
            ranges[side.name]["decode_tokens_per_s"] = [(args["new_tokens"] - 1) / max(t, 1e-9)
                                                        for t in ranges[side.name].pop("decode_s")[::-1]]
            if "decode_step_streams_s" in out:
                out["decode_tokens_per_s_streams"] = args["streams"] / out["decode_step_streams_s"]
            results[side.name] = {**out, **side.finish()}
    finally:
        for side in sides:
            side.kill()
    from ..runtime.artifact import read_manifest

    # Compile time per artifact and stage, from the manifests (weights are parameters: only load, import and save
    # move weight bytes; export, optimize and build depend on the graph alone).
    compile_seconds = {}
    for name, kind in ((args["vit_model"], "visual"), (args["model"], "llm")):
        manifest = read_manifest(name, kind=kind, verify=False)
        graphs = len(manifest["graphs"] if kind == "llm" else
                     manifest["tile_buckets"] if "tile_buckets" in manifest else manifest["patch_buckets"])
        compile_seconds[kind] = {"graphs": graphs, **manifest["compile_seconds"]}
    bandwidth = statistics.median(bandwidths)
    floor = results["vlmc"]["weight_bytes_per_token"] / bandwidth
    llm_manifest = read_manifest(args["model"], kind="llm", verify=False)
    visual_manifest = read_manifest(args["vit_model"], kind="visual", verify=False)
    precision = {"llm": llm_manifest.get("quantize", {}), "visual": visual_manifest.get("quantize", {}),
                 "llm_weight_bytes": results["vlmc"]["weight_bytes_per_token"],
                 "visual_weight_bytes": visual_manifest.get("weight_bytes"),
                 "kv_cache_bytes_per_token": llm_manifest.get("kv_cache_bytes_per_token"),
                 "compute": {"llm": llm_manifest.get("compute", "fp32"), "visual": visual_manifest.get("compute", "fp32"),
                             "llm_decode": llm_manifest.get("decode_compute", "fp32")},
                 "bf16_gemm_path": results["vlmc"].pop("bf16_gemm_path", None),
                 "int8_gemm_path": results["vlmc"].pop("int8_gemm_path", None)}
    ratios = {k: results["vlmc"][k] / results["transformers"][k] for k, _ in METRICS
              if results["transformers"].get(k)}
    reference = results["transformers"]["tokens"]
    agreement = {name: _leading_equal(result.pop("tokens"), reference) for name, result in results.items()}
    report_peers = {peer.name: {**results[peer.name], "ratio_vlmc_over_peer": {
        k: results["vlmc"][k] / results[peer.name][k] for k in PEER_METRICS if results[peer.name].get(k)}}
        for peer, _ in peers}
    return {"inputs": {**inputs, "peers": [peer.name for peer, _ in peers]}, "device": args.get("device", "cpu"),
            "transformers": results["transformers"],
            "vlmc": results["vlmc"], "peers": report_peers, "ranges": ranges,
            "tokens_equal_to_transformers": agreement,
            "ratio_vlmc_over_transformers": ratios, "memory_read_bandwidth_gb_s": bandwidth / 1e9,
            "decode_floor_s": floor, "vlmc_decode_step_over_floor": results["vlmc"]["decode_step_short_s"] / floor,
            "compile_seconds": compile_seconds, "precision": precision}


def _leading_equal(tokens: list, reference: list) -> int:
    """How many generated tokens agree with transformers' greedy ones before the first difference."""
    count = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        count += 1
    return count


def format_table(report: dict) -> str:
    rows = ["| metric | transformers | vlmc | vlmc / transformers |", "|---|---|---|---|"]
    for key, label in METRICS:
        hf, ours = report["transformers"].get(key), report["vlmc"].get(key)
        ratio = report["ratio_vlmc_over_transformers"].get(key)
        if ours is None:  # e.g. the all-streams rows of a batch-1 artifact
            continue
        if key.endswith("_streams"):
            label = label.replace("all streams", f"{report['inputs']['streams']} streams")
        rows.append(f"| {label} | {hf:.4g} | {ours:.4g} | {ratio:.3g} |")
    if "peak_gpu_mib" in report["transformers"]:  # TVM's GPU allocations are not visible to torch's counter
        rows.append(f"| peak GPU memory, torch allocator (MiB) | {report['transformers']['peak_gpu_mib']:.4g} | | |")
    where = "GPU" if report.get("device", "cpu") != "cpu" else "host"
    rows.append(f"| {where} memory read bandwidth (GB/s) | | {report['memory_read_bandwidth_gb_s']:.3g} | |")
    p = report.get("precision", {})
    if p:
        llm = p["llm"]
        rows.append(f"| weights (LLM / visual), KV cache | | {llm.get('weights', 'fp32')} / "
                    f"{p['visual'].get('weights', 'fp32')}, {llm.get('kv_cache', 'fp32')} | |")
        rows.append(f"| LLM weight bytes (MB) | | {p['llm_weight_bytes'] / 1e6:.4g} | |")
        compute = p.get("compute", {})
        if {"bf16", "int8"} & {compute.get("llm"), compute.get("visual")}:
            paths = ", ".join(f"{kind} {p[f'{kind}_gemm_path']}" for kind in ("int8", "bf16")
                              if p.get(f"{kind}_gemm_path"))
            rows.append(f"| GEMM inputs (LLM prompt / visual) | | {compute['llm']} / {compute['visual']} "
                        f"({paths} kernels) | |")
        if compute.get("llm_decode", "fp32") != "fp32":
            rows.append(f"| decode GEMV inputs | | {compute['llm_decode']} | |")
        if p.get("kv_cache_bytes_per_token"):
            rows.append(f"| KV cache bytes per token | | {p['kv_cache_bytes_per_token']} | |")
    rows.append(f"| greedy tokens equal to transformers' (leading) | | "
                f"{report['tokens_equal_to_transformers']['vlmc']}/{report['inputs']['new_tokens']} | |")
    rows.append(f"| decode floor: weight bytes / bandwidth (s) | | {report['decode_floor_s']:.3g} | |")
    rows.append(f"| vlmc decode step / floor | | {report['vlmc_decode_step_over_floor']:.3g} | |")
    for kind, stages in report.get("compile_seconds", {}).items():
        times = ", ".join(f"{k} {v:.1f}" for k, v in stages.items() if k != "graphs")
        rows.append(f"| compile {kind} ({stages['graphs']} graph{'s' * (stages['graphs'] > 1)}), s | | {times} | |")
    if report.get("peers"):
        rows += ["", _peer_table(report)]
    return "\n".join(rows)


PEER_ROWS = [("vision_encode_s", "vision encode (s)"), ("ttft_s", "time to first token (s)"),
             ("decode_tokens_per_s", "decode tokens/s"), ("peak_rss_mib", "peak memory (MiB)"), ("load_s", "load (s)")]


def _peer_table(report: dict) -> str:
    """vlmc against each peer: medians [min-max] over the turns, and vlmc / peer (below 1 is faster for times)."""
    names = ["transformers", "vlmc", *report["peers"]]
    figures = {"transformers": report["transformers"], "vlmc": report["vlmc"], **report["peers"]}
    rows = ["| metric | " + " | ".join(names) + " | " + " | ".join(f"vlmc / {p}" for p in report["peers"]) + " |",
            "|---" * (len(names) + len(report["peers"]) + 1) + "|"]
    for key, label in PEER_ROWS:
        cells = []
        for name in names:
            value, span = figures[name].get(key), report["ranges"].get(name, {}).get(key)
            cells.append("" if value is None else f"{value:.4g}" + (f" [{span[0]:.4g}-{span[1]:.4g}]" if span else ""))
        ratios = [report["peers"][p]["ratio_vlmc_over_peer"].get(key) for p in report["peers"]]
        rows.append(f"| {label} | " + " | ".join(cells) + " | " +
                    " | ".join("" if r is None else f"{r:.3g}" for r in ratios) + " |")
    n = report["inputs"]["new_tokens"]
    rows.append("| greedy tokens equal to transformers' (leading) | " + " | ".join(
        "(reference)" if name == "transformers" else f"{report['tokens_equal_to_transformers'][name]}/{n}"
        for name in names) + " |" + " |" * len(report["peers"]))
    rows += [f"- {name}: {'; '.join(peer['notes'])}" for name, peer in report["peers"].items() if peer.get("notes")]
    return "\n".join(rows)


def write_plot(report: dict, path: str | os.PathLike) -> None:
    """One panel per figure: each side's median with its range over the turns (the peers' table, as a picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["transformers", "vlmc", *report.get("peers", {})]
    figures = {"transformers": report["transformers"], "vlmc": report["vlmc"], **report.get("peers", {})}
    rows = [(key, label) for key, label in PEER_ROWS if key != "load_s"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4))
    for ax, (key, label) in zip(axes, rows):
        values = [figures[name].get(key) or 0 for name in names]
        spans = [report["ranges"].get(name, {}).get(key) for name in names]
        low = [v - s[0] if s else 0 for v, s in zip(values, spans)]
        high = [s[1] - v if s else 0 for v, s in zip(values, spans)]
        ax.bar(range(len(names)), values, yerr=[low, high], capsize=3,
               color=["#999999" if n == "transformers" else "#d62728" if n == "vlmc" else "#1f77b4" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"vlmc bench: {report['inputs']['new_tokens']} new tokens; medians and ranges over the turns",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
