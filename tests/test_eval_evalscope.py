"""`vlmc eval accuracy` and `vlmc eval perf` through real evalscope against a real `vlmc serve` subprocess.

The numbers evalscope reports are checked against what the server itself logged (one line per request with its
id and token counts) and counted in /metrics.
"""

import io
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from compiled import compile_artifact, llm_shape, visual_budget, vlmc

pytest.importorskip("evalscope")

LOG_LINE = re.compile(r"request (chatcmpl-\w+): (\d+) tokens in, (\d+) out, .* status (\d+)")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def hub_caches(tmp_path_factory, monkeypatch_module):
    # ModelScope has no offline switch: keep its and Hugging Face's caches out of the home folder.
    cache = tmp_path_factory.mktemp("hub_cache")
    monkeypatch_module.setenv("MODELSCOPE_CACHE", str(cache / "modelscope"))
    monkeypatch_module.setenv("HF_HOME", str(cache / "hf"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


class Server:
    def __init__(self, base, log_path):
        self.base, self.log_path = base, log_path

    def requests(self) -> dict[str, tuple[int, int, int]]:
        """id -> (tokens in, tokens out, status), from the server's per-request log lines."""
        return {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in LOG_LINE.finditer(self.log_path.read_text())}

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.base + "/metrics").read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(("vlmc_requests_total", "vlmc_prompt_tokens_total", "vlmc_generation_tokens_total")):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def settle(self, expect_requests: int, before: dict) -> dict:
        """/metrics once the server has logged `expect_requests` more requests (a stream's tally lands just after
        its last chunk)."""
        key = 'vlmc_requests_total{status="200"}'
        for _ in range(50):
            now = self.metrics()
            if now.get(key, 0) - before.get(key, 0) >= expect_requests:
                return now
            time.sleep(0.1)
        return now


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    ws = tmp_path_factory.mktemp("evalscope_ws")
    ck = checkpoints["tiny"]
    visual = compile_artifact("qwen2_5_vl_visual.yaml", ck, ws, *visual_budget())
    llm = compile_artifact("qwen2_5_vl_llm.yaml", ck, ws, *llm_shape(),
                           "--batch-size", "8")
    port = free_port()
    log_path = ws / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "vlmc", "serve", "--model", llm, "--vit_model", visual, "--port",
                             str(port), "--served-model-name", "tiny", "--api-key", "sk-test"],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.5)
    yield Server(base, log_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    log.close()


def write_local_sets(root):
    """Three tiny local datasets with generated images: general_vmcq, general_vqa and an MMBench-layout folder."""
    import datasets
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    images = {}
    for name, rgb in colours.items():
        images[name] = root / "images" / f"{name}.png"
        images[name].parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (84, 56), rgb).save(images[name])
    vmcq, vqa = root / "vmcq", root / "vqa"
    vmcq.mkdir()
    vqa.mkdir()
    (vmcq / "colours_val.jsonl").write_text("".join(json.dumps(
        {"question": "<image 1> Which colour fills this picture?", "options": list(colours), "image_1": str(path),
         "answer": "ABC"[i]}) + "\n" for i, path in enumerate(images.values())))
    (vqa / "default.jsonl").write_text("".join(json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                                   {"type": "text", "text": "Name the colour."}]}],
         "answer": name}) + "\n" for name, path in images.items()))
    # The layout of the lmms-lab/MMBench download: a README declaring configs, CONFIG/SPLIT-*.parquet files.
    mmb = root / "MMBench"
    rows = {k: [] for k in ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image")}
    for i, (name, path) in enumerate(images.items()):
        buf = io.BytesIO()
        Image.open(path).save(buf, format="JPEG")
        for k, v in dict(index=i, question="What colour is the picture?", hint="nan", A="red", B="green",
                         C="blue", D="nan", answer="ABC"[i], category="colour",
                         image={"bytes": buf.getvalue(), "path": None}).items():
            rows[k].append(v)
    features = datasets.Features({k: datasets.Value("int64") if k == "index" else datasets.Image() if k == "image"
                                  else datasets.Value("string") for k in rows})
    (mmb / "en").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(mmb / "en" / "dev-00000-of-00001.parquet")
    (mmb / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files:\n  - split: dev\n"
                                   "    path: en/dev-*\n---\n")
    return {"general_vmcq": vmcq, "general_vqa": vqa, "MMBench_DEV_EN": mmb}


def test_accuracy_on_local_sets_matches_the_server_log(server, tmp_path):
    sets = write_local_sets(tmp_path / "data")
    work = tmp_path / "acc"
    before = server.metrics()
    proc = vlmc("eval", "accuracy", "--url", server.base, "--model", "tiny", "--api-key", "sk-test",
                "--datasets", "general_vmcq", "general_vqa", "MMBench_DEV_EN",
                *[a for name, path in sets.items() for a in ("--local-path", f"{name}={path}")],
                "--limit", 3, "--max-tokens", 8, "--work-dir", work, "--json", timeout=300)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {(r["dataset"], r["subset"]): r for r in summary["scores"]}
    assert set(rows) == {("general_vmcq", "colours"), ("general_vqa", "default"), ("MMBench_DEV_EN", "en")}
    assert all(r["samples"] == 3 and 0 <= r["score"] <= 1 for r in rows.values())
    assert rows[("general_vqa", "default")]["metric"].startswith("rouge")  # Rouge, not BLEU
    for name in ("general_vmcq", "general_vqa", "mm_bench"):
        assert (work / "reports" / "tiny" / f"{name}.json").is_file()
    assert (work / "reports" / "report.html").is_file()

    # Every prediction evalscope recorded is a request the server logged, with the same token counts.
    logged = server.requests()
    predictions = [json.loads(line) for f in (work / "predictions" / "tiny").glob("*.jsonl")
                   for line in f.read_text().splitlines()]
    assert len(predictions) == 9
    for p in predictions:
        out = p["model_output"]
        assert logged[out["id"]] == (out["usage"]["input_tokens"], out["usage"]["output_tokens"], 200)
        assert out["usage"]["output_tokens"] <= 8
    after = server.settle(9, before)
    key = 'vlmc_requests_total{status="200"}'
    assert after[key] - before.get(key, 0) == 9
    assert after["vlmc_generation_tokens_total"] - before.get("vlmc_generation_tokens_total", 0) == sum(
        p["model_output"]["usage"]["output_tokens"] for p in predictions)


def test_perf_reports_full_success_at_1_4_8_and_matches_server_counts(server, checkpoints, tmp_path):
    parallel, number, out_tokens = [1, 4, 8], [2, 4, 8], 8
    before = server.metrics()
    seen = set(server.requests())
    proc = vlmc("eval", "perf", "--url", server.base, "--model", "tiny", "--api-key", "sk-test",
                "--tokenizer-path", checkpoints["tiny"], "--parallel", *parallel, "--number", *number,
                "--image-size", "112x84", "--prompt-tokens", 48, "--output-tokens", out_tokens,
                "--work-dir", tmp_path, "--name", "run", "--json", timeout=400)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = summary["runs"]
    assert [r["parallel"] for r in runs] == parallel and [r["requests"] for r in runs] == number
    assert all(r["success_rate"] == 100.0 and r["failed"] == 0 for r in runs)
    assert all(r["ttft_ms"] > 0 and r["latency_s"] > 0 and r["output_tokens_per_s"] > 0 for r in runs)
    assert all(r["avg_output_tokens"] == out_tokens for r in runs)  # usage-based counts, honoured min_tokens
    run_dir = tmp_path / "run"
    assert (run_dir / "perf.png").stat().st_size > 0 and (run_dir / "perf_report.html").is_file()
    for p, n in zip(parallel, number):
        assert (run_dir / f"parallel_{p}_number_{n}" / "benchmark_summary.json").is_file()

    total = sum(number)
    after = server.settle(total, before)
    key = 'vlmc_requests_total{status="200"}'
    assert after[key] - before.get(key, 0) == total
    assert after["vlmc_generation_tokens_total"] - before.get("vlmc_generation_tokens_total", 0) == total * out_tokens
    new = {k: v for k, v in server.requests().items() if k not in seen}
    assert len(new) == total and all(v[1] == out_tokens and v[2] == 200 for v in new.values())
    # evalscope's prompt sizes are the server's usage numbers: its averages times counts give the server's sum.
    assert sum(v[0] for v in new.values()) == round(sum(r["avg_input_tokens"] * r["requests"] for r in runs))


def test_offline_benchmark_without_local_copy_fails_fast(tmp_path):
    t0 = time.perf_counter()
    # No server is needed: the data check comes before anything is sent.
    proc = vlmc("eval", "accuracy", "--url", "http://127.0.0.1:9", "--model", "m", "--datasets", "MMBench_DEV_EN",
                "--work-dir", tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmc eval: error: offline and no local copy of MMBench_DEV_EN")
    assert "--local-path NAME=DIR" in lines[0] and "lmms-lab/MMBench" in lines[0]
    assert time.perf_counter() - t0 < 30
    proc = vlmc("eval", "accuracy", "--url", "http://127.0.0.1:9", "--model", "m", "--datasets", "general_vqa",
                check=False)
    assert proc.returncode == 2 and "--local-path general_vqa=DIR" in proc.stderr
