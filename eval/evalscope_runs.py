"""`vlmc eval accuracy` and `vlmc eval perf`: evalscope runs against a `vlmc serve` daemon's OpenAI API.

evalscope runs in a subprocess (its CLI), not in-process: it configures logging, event loops and dataset caches
globally, and a subprocess lets us set its environment (offline switches, caches) before it imports anything and
keep its log apart. We check what it needs before launching it (evalscope installed, server reachable, local data
present or the hub reachable), so that mistakes fail in seconds instead of inside its retry loops.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import VlmcError


@dataclass(frozen=True)
class Benchmark:
    evalscope: str  # evalscope benchmark name
    subset: str | None  # evalscope subset, or None for all of the benchmark's subsets
    dataset_id: str  # where evalscope downloads it from (ModelScope id; Hugging Face id in `hf_id`)
    hf_id: str


# The vendor's benchmark names (VLMEvalKit spelling) -> evalscope benchmarks (evalscope 1.14).
VENDOR = {
    "MMBench_DEV_EN": Benchmark("mm_bench", "en", "lmms-lab/MMBench", "lmms-lab/MMBench"),
    "MMBench_DEV_CN": Benchmark("mm_bench", "cn", "lmms-lab/MMBench", "lmms-lab/MMBench"),
    "MMMU_DEV_VAL": Benchmark("mmmu", None, "AI-ModelScope/MMMU", "MMMU/MMMU"),
    "OCRBench": Benchmark("ocr_bench", None, "evalscope/OCRBench", "echo840/OCRBench"),
}
# Your own data in evalscope's custom formats; always local. Value: the split evalscope reads.
LOCAL_KINDS = {"general_vmcq": "val", "general_vqa": "test"}
DATA_SUFFIXES = (".jsonl", ".tsv", ".csv", ".parquet")
HUB_HOSTS = {"modelscope": "www.modelscope.cn", "huggingface": "huggingface.co"}


def api_base(url: str) -> str:
    """`http://host:port` from any of http://host:port, .../v1, .../v1/chat/completions."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise VlmcError(f"--url must look like http://127.0.0.1:9900, got {url!r}")
    path = parsed.path.rstrip("/")
    for tail in ("/chat/completions", "/v1"):
        if path.endswith(tail):
            path = path[: -len(tail)]
    return f"{parsed.scheme}://{parsed.netloc}{path}"


def check_server(base: str, api_key: str | None) -> dict:
    """GET /v1/models: fail fast when the daemon is down or the key is wrong, instead of in evalscope's retries."""
    req = urllib.request.Request(base + "/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        hint = " (pass the server's key with --api-key)" if exc.code == 401 else ""
        raise VlmcError(f"the server at {base} answered GET /v1/models with HTTP {exc.code}{hint}") from None
    except (OSError, ValueError) as exc:
        raise VlmcError(f"cannot reach an OpenAI-compatible server at {base} ({exc}); start one with "
                        f"`vlmc serve --model LLM_ARTIFACT --vit_model VISUAL_ARTIFACT`") from None


def require_evalscope() -> None:
    import importlib.util

    if importlib.util.find_spec("evalscope") is None:
        raise VlmcError("evalscope is not installed; install it with: pip install -e '.[eval]' "
                        "(or pip install 'evalscope[perf]>=1.14.1,<1.15')")


def hub_reachable(hub: str, timeout: float = 3.0) -> bool:
    """One TCP connect to the dataset hub (no retries): offline machines answer this in at most `timeout`."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("VLMC_OFFLINE"):
        return False
    try:
        socket.create_connection((HUB_HOSTS[hub], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def parse_local_paths(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise VlmcError(f"--local-path takes NAME=DIR, got {item!r}")
        if name not in VENDOR and name not in LOCAL_KINDS and name not in {b.evalscope for b in VENDOR.values()}:
            raise VlmcError(f"--local-path names an unknown dataset {name!r}; use one of "
                            f"{', '.join([*VENDOR, *LOCAL_KINDS])}")
        p = Path(path).expanduser().resolve()
        if not p.exists():
            raise VlmcError(f"--local-path {name}={path}: no such file or folder")
        out[name] = p
    return out


def download_hint(*names: str) -> str:
    # The CLIs that evalscope's own dependencies install (modelscope 1.40, huggingface_hub 1.x's `hf`).
    where = "; ".join(f"{n}: `modelscope download --repo-type dataset {VENDOR[n].dataset_id} --local-dir DIR` (or "
                      f"`hf download {VENDOR[n].hf_id} --repo-type dataset --local-dir DIR`)"
                      for n in dict.fromkeys(names))
    return f"download where there is network ({where}), copy DIR here and pass --local-path NAME=DIR (docs/eval.md)"


def local_subsets(kind: str, path: Path) -> tuple[str, list[str]]:
    """(local_path, subset_list) for general_vmcq/general_vqa data: a data file, or a folder of them where
    `NAME.jsonl` or `NAME_<split>.jsonl` is subset NAME (evalscope's own lookup rule)."""
    split = LOCAL_KINDS[kind]
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise VlmcError(f"{kind} data must be one of {', '.join(DATA_SUFFIXES)} files, got {path.name}")
        return str(path), ["default"]
    subsets = sorted({f.stem[: -len(split) - 1] if f.stem.endswith("_" + split) else f.stem
                      for f in path.iterdir() if f.suffix in DATA_SUFFIXES})
    if not subsets:
        raise VlmcError(f"{path} holds no {kind} data: expected SUBSET.jsonl (or SUBSET_{split}.jsonl, .tsv, .csv, "
                        f".parquet) files")
    return str(path), subsets


def plan_accuracy(datasets: list[str], local: dict[str, Path], hub: str) -> tuple[list[str], dict, dict]:
    """evalscope --datasets and --dataset-args for the requested names, and evalscope name -> requested names.

    A built-in benchmark without a local copy needs the hub; offline that fails here, in seconds."""
    names, args, requested = [], {}, {}
    missing = []
    for name in dict.fromkeys(datasets):  # each once, in the order given
        if name in LOCAL_KINDS:
            if name not in local:
                raise VlmcError(f"{name} is your own data: pass --local-path {name}=DIR (a folder of SUBSET.jsonl "
                                f"files or one file; formats in docs/eval.md)")
            path, subsets = local_subsets(name, local[name])
            entry = {"local_path": path, "subset_list": subsets}
            if name == "general_vqa":
                entry["metric_list"] = ["Rouge"]  # BLEU needs nltk data that offline machines lack
            args[name] = entry
            names.append(name)
            requested.setdefault(name, []).append(name)
            continue
        if name not in VENDOR:
            raise VlmcError(f"unknown dataset {name!r}; choose from {', '.join([*VENDOR, *LOCAL_KINDS])}")
        b = VENDOR[name]
        path = local.get(name) or local.get(b.evalscope)
        entry = args.setdefault(b.evalscope, {})
        if b.evalscope not in names:
            names.append(b.evalscope)
        requested.setdefault(b.evalscope, []).append(name)
        if path is not None:
            if not path.is_dir() or not any(f.suffix in (*DATA_SUFFIXES, ".arrow") for f in path.rglob("*")):
                raise VlmcError(f"--local-path {name}={path} holds no dataset files (.parquet, .jsonl, .arrow); "
                                + download_hint(name))
            if entry.get("local_path", str(path)) != str(path):
                raise VlmcError(f"{name} and another {b.evalscope} dataset were given different --local-path "
                                f"folders; both are subsets of one download: pass the same folder")
            entry["local_path"] = str(path)
        else:
            missing.append(name)
        if b.subset is not None:
            entry.setdefault("subset_list", [])
            entry["subset_list"].append(b.subset)
    if missing and not hub_reachable(hub):
        raise VlmcError(f"offline and no local copy of {', '.join(missing)} ({HUB_HOSTS[hub]} is not "
                        f"reachable); " + download_hint(*missing))
    return names, args, requested


def run_logged(cmd: list[str], env: dict, log_path: Path, echo: bool) -> int:
    """Run `cmd` with its output in `log_path` (and on stderr with -v); returns the exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        try:
            for line in proc.stdout:
                log.write(line)
                if echo:
                    sys.stderr.write(line)
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=30)
            raise


def last_error(log_path: Path) -> str:
    """The most telling line of a failed evalscope log: its last exception line, else its last line."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("Error" in ln or "error" in ln) and not ln.startswith("File "):
            return ln[-300:]
    return lines[-1][-300:] if lines else "(no output)"


def evalscope_cmd(*args: str) -> list[str]:
    # The console script may not be on PATH (venv not activated); run its entry point with this interpreter.
    return [sys.executable, "-c", "import sys; from evalscope.cli.cli import run_cmd; sys.argv[0] = 'evalscope'; "
                                  "sys.exit(run_cmd())", *args]


def subprocess_env(offline: bool) -> dict:
    env = dict(os.environ)
    if offline:
        # Local data and tokenizers only: no hub calls (and no waits on them) from datasets/transformers.
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# ---------------------------------------------------------------------------------------------- accuracy


def run_accuracy(args) -> int:
    require_evalscope()
    base = api_base(args.url)
    local = parse_local_paths(args.local_path)
    names, dataset_args, requested = plan_accuracy(args.datasets, local, args.dataset_hub)
    check_server(base, args.api_key)
    work = Path(args.work_dir).resolve()
    generation = {"temperature": 0.0}  # greedy: scores are reproducible
    if args.max_tokens is not None:
        generation["max_tokens"] = args.max_tokens  # else the server generates up to its compiled context
    if args.timeout is not None:
        generation["timeout"] = args.timeout
    cmd = evalscope_cmd("eval", "--model", args.model, "--api-url", base + "/v1", "--api-key", args.api_key or "EMPTY",
                        "--eval-type", "openai_api", "--datasets", *names, "--dataset-args", json.dumps(dataset_args),
                        "--dataset-hub", args.dataset_hub, "--generation-config", json.dumps(generation),
                        "--eval-batch-size", str(args.concurrency), "--work-dir", str(work), "--no-timestamp")
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    all_local = all("local_path" in a for a in dataset_args.values())
    log = work / "evalscope.log"
    print(f"vlmc eval accuracy: evalscope on {', '.join(args.datasets)} (log: {log})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    code = run_logged(cmd, subprocess_env(offline=all_local), log, getattr(args, "verbose", False))
    if code != 0:
        raise VlmcError(f"evalscope eval failed (exit {code}): {last_error(log)}; full log: {log}")
    rows = accuracy_rows(work, args.model, names, requested)
    summary = {"model": args.model, "url": base, "seconds": round(time.perf_counter() - t0, 1), "scores": rows,
               "report": str(work / "reports" / "report.html"), "reports_dir": str(work / "reports"),
               "predictions_dir": str(work / "predictions"), "log": str(log)}
    (work / "vlmc_accuracy.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_table(["dataset", "subset", "metric", "samples", "score"],
                           [[r["dataset"], r["subset"], r["metric"], r["samples"], f"{100 * r['score']:.2f}"]
                            for r in rows]))
        print(f"\nfull report: {summary['report']}\nper-dataset JSON: {summary['reports_dir']}/\n"
              f"predictions: {summary['predictions_dir']}/\nsummary: {work / 'vlmc_accuracy.json'}")
    return 0


def report_file(work: Path, model: str, dataset: str) -> Path:
    found = sorted((work / "reports").glob(f"*/{dataset}.json"))
    exact = [p for p in found if p.parent.name == model]
    if not (exact or found):
        raise VlmcError(f"evalscope finished but wrote no report for {dataset} under {work / 'reports'}")
    return (exact or found)[0]


def metric_label(identity: dict) -> str:
    dims = ", ".join(f"{k}={v}" for k, v in identity.get("dimensions", {}).items())
    return identity["name"] + (f"[{dims}]" if dims else "")


def accuracy_rows(work: Path, model: str, names: list[str], requested: dict[str, list[str]]) -> list[dict]:
    """One row per requested dataset (MMBench EN/CN are subsets of one evalscope run), primary metric only;
    general_* data get one row per subset and an overall row."""
    rows = []
    for dataset in names:
        report = json.loads(report_file(work, model, dataset).read_text())
        primary = report.get("primary_metric_identity")
        metric = next((m for m in report["metrics"] if m["identity"] == primary), report["metrics"][0])
        label = metric_label(metric["identity"])
        subsets = {s["name"]: s for c in metric["categories"] for s in c["subsets"]}
        by_subset = {VENDOR[n].subset: n for n in requested[dataset] if n in VENDOR and VENDOR[n].subset}
        if by_subset:  # mm_bench: the vendor's EN/CN benchmarks are evalscope subsets
            for subset, name in by_subset.items():
                s = subsets.get(subset)
                if s is None:
                    raise VlmcError(f"the {dataset} report has no subset {subset!r} (for {name})")
                rows.append({"dataset": name, "subset": subset, "metric": label, "samples": s["num"],
                             "score": s["score"], "evalscope": dataset})
            continue
        name = requested[dataset][0]
        if dataset in LOCAL_KINDS and len(subsets) > 1:
            rows += [{"dataset": name, "subset": k, "metric": label, "samples": s["num"], "score": s["score"],
                      "evalscope": dataset} for k, s in subsets.items()]
        rows.append({"dataset": name, "subset": "all" if len(subsets) != 1 else next(iter(subsets)),
                     "metric": label, "samples": metric["num"], "score": metric["score"], "evalscope": dataset})
    return rows


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- perf


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise VlmcError(f"--image-size must look like 448x448, got {text!r}") from None
    if width < 1 or height < 1:
        raise VlmcError(f"--image-size: both sides must be positive, got {text!r}")
    return width, height


def run_perf(args) -> int:
    require_evalscope()
    base = api_base(args.url)
    width, height = parse_size(args.image_size)
    parallel = args.parallel
    number = args.number or [2 * p for p in parallel]  # two rounds per concurrency level by default
    if len(number) != len(parallel):
        raise VlmcError(f"--number needs one value per --parallel value ({len(parallel)}), got {len(number)}")
    if min(parallel) < 1 or min(number) < 1:
        raise VlmcError("--parallel and --number values must be positive")
    tokenizer = Path(args.tokenizer_path)
    if not (tokenizer / "tokenizer_config.json").is_file() and not (tokenizer / "tokenizer.json").is_file():
        raise VlmcError(f"--tokenizer-path {tokenizer} holds no tokenizer (tokenizer.json / tokenizer_config.json); "
                        f"pass the Hugging Face checkpoint folder the artifacts were compiled from")
    check_server(base, args.api_key)
    work = Path(args.work_dir).resolve()
    run_dir = work / args.name
    cmd = evalscope_cmd(
        "perf", "--api", "openai", "--url", base + "/v1/chat/completions", "--model", args.model,
        "--dataset", "random_vl", "--tokenizer-path", str(tokenizer.resolve()), "--image-num", str(args.image_num),
        "--image-width", str(width), "--image-height", str(height),
        "--min-prompt-length", str(args.prompt_tokens), "--max-prompt-length", str(args.prompt_tokens),
        "--min-tokens", str(args.output_tokens), "--max-tokens", str(args.output_tokens),
        # ignore_eos: a random prompt may end in EOS early; fixed output lengths make runs comparable.
        "--extra-args", json.dumps({"ignore_eos": True}),
        "--parallel", *map(str, parallel), "--number", *map(str, number), "--stream",
        "--outputs-dir", str(work), "--name", args.name, "--no-timestamp",
        # We checked the server above; evalscope's own probe would add an uncounted request to the server's tallies.
        "--no-test-connection")
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    log = work / f"{args.name}.evalscope.log"
    print(f"vlmc eval perf: evalscope perf at concurrency {' '.join(map(str, parallel))} (log: {log})",
          file=sys.stderr, flush=True)
    code = run_logged(cmd, subprocess_env(offline=True), log, getattr(args, "verbose", False))
    if code != 0:
        reason = last_error(log)
        if "max_prompt_length should be" in reason:  # evalscope's words for a prompt shorter than the template
            reason = f"--prompt-tokens {args.prompt_tokens} is shorter than the chat template; raise it"
        raise VlmcError(f"evalscope perf failed (exit {code}): {reason}; full log: {log}")
    rows = perf_rows(run_dir, parallel, number)
    plot = perf_plot(rows, run_dir / "perf.png")
    summary = {"model": args.model, "url": base, "image_size": [width, height], "image_num": args.image_num,
               "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens, "runs": rows,
               "plot": str(plot), "report": str(run_dir / "perf_report.html"), "log": str(log)}
    (run_dir / "vlmc_perf.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_table(
            ["parallel", "requests", "success %", "TTFT ms", "TTFT p99 ms", "TPOT ms", "latency s", "out tok/s",
             "req/s"],
            [[r["parallel"], r["requests"], f"{r['success_rate']:.1f}", f"{r['ttft_ms']:.1f}",
              f"{r['ttft_p99_ms']:.1f}", f"{r['tpot_ms']:.1f}", f"{r['latency_s']:.3f}",
              f"{r['output_tokens_per_s']:.2f}", f"{r['requests_per_s']:.3f}"] for r in rows]))
        print(f"\nplot: {plot}\nfull report: {summary['report']}\nsummary: {run_dir / 'vlmc_perf.json'}")
    failed = [r for r in rows if r["failed"]]
    for r in failed:
        print(f"vlmc eval perf: FAIL {r['failed']} of {r['requests']} requests failed at parallel {r['parallel']}",
              file=sys.stderr)
    return 1 if failed else 0


def perf_rows(run_dir: Path, parallel: list[int], number: list[int]) -> list[dict]:
    rows = []
    for p, n in zip(parallel, number):
        folder = run_dir / f"parallel_{p}_number_{n}"
        try:
            s = json.loads((folder / "benchmark_summary.json").read_text())
            pct = {row["Percentiles"]: row for row in json.loads((folder / "benchmark_percentile.json").read_text())}
        except (OSError, ValueError) as exc:
            raise VlmcError(f"evalscope perf wrote no readable results for parallel {p} in {folder} ({exc})") from None
        total, ok = int(s["Total Requests"]), int(s["Success Requests"])
        rows.append({
            "parallel": p, "requests": total, "succeeded": ok, "failed": int(s["Failed Requests"]),
            "success_rate": 100.0 * ok / total if total else 0.0,
            "ttft_ms": s["Avg TTFT (ms)"], "ttft_p99_ms": pct.get("99%", {}).get("TTFT (ms)", float("nan")),
            "tpot_ms": s["Avg TPOT (ms)"], "latency_s": s["Avg Latency (s)"],
            "latency_p99_s": pct.get("99%", {}).get("Latency (s)", float("nan")),
            "output_tokens_per_s": s["Output Throughput (tok/s)"], "total_tokens_per_s": s["Total Throughput (tok/s)"],
            "requests_per_s": s["Req Throughput (req/s)"], "avg_input_tokens": s["Avg Input Tokens"],
            "avg_output_tokens": s["Avg Output Tokens"], "seconds": s["Test Duration (s)"], "results": str(folder)})
    return rows


def perf_plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["parallel"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(x, [r["output_tokens_per_s"] for r in rows], marker="o", label="output")
    left.plot(x, [r["total_tokens_per_s"] for r in rows], marker="s", label="prompt + output")
    left.set_xlabel("concurrency")
    left.set_ylabel("throughput (tokens/s)")
    left.legend()
    right.plot(x, [r["ttft_ms"] for r in rows], marker="o", label="mean")
    right.plot(x, [r["ttft_p99_ms"] for r in rows], marker="^", label="p99")
    right.set_xlabel("concurrency")
    right.set_ylabel("time to first token (ms)")
    right.legend()
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.grid(alpha=0.3)
    fig.suptitle("vlmc serve under evalscope perf")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
