"""`vlmc serve` end to end: a real server subprocess on a loopback port, driven by the official openai client."""

import base64
import io
import json
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from compiled import compile_artifact, generate_json
from conftest import random_image

openai = pytest.importorskip("openai")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def artifacts(checkpoints, tmp_path_factory):
    ws = tmp_path_factory.mktemp("serve_ws")
    ck = checkpoints["tiny"]
    visual = compile_artifact("qwen2_5_vl_visual.yaml", ck, ws, "--max-patches", "512")
    llm = compile_artifact("qwen2_5_vl_llm.yaml", ck, ws, "--max-prefill", "256", "--max-context", "320",
                           "--batch-size", "4")
    return {"visual": visual, "llm": llm, "ws": ws}


@pytest.fixture(scope="module")
def server(artifacts):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vlmc", "serve", "--model", artifacts["llm"], "--vit_model",
                             artifacts["visual"], "--port", str(port), "--api-key", "k",
                             "--allowed-local-media-path", str(artifacts["ws"])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
    yield base
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def client(base, key="k"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def test_greedy_text_matches_generate(server, artifacts):
    image = random_image(56, 84, seed=1)
    path = artifacts["ws"] / "img.png"
    image.save(path)
    # `vlmc generate` runs on the same batch-4 artifact: it decodes in row 0 and pads the other rows.
    ref = generate_json("--model", artifacts["llm"], "--vit_model", artifacts["visual"], "--image", path,
                        "--prompt", "Describe it.", "--max-new-tokens", "12")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                             {"type": "text", "text": "Describe it."}]}]
    c = client(server)
    out = c.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == ref["text"]
    assert out.usage.prompt_tokens == ref["prompt_tokens"]
    assert out.usage.completion_tokens == len(ref["token_ids"])
    chunks = list(c.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref["text"]
    assert chunks[-1].usage.completion_tokens == len(ref["token_ids"])


def test_concurrent_requests_batch_together(server):
    c = client(server)

    def ask(i):
        url = data_uri(random_image(28 * (1 + i % 3), 56, seed=i))
        return c.chat.completions.create(model="m", max_tokens=24, extra_body={"ignore_eos": True}, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": f"picture {i}"}]}])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert all(r.usage.completion_tokens == 24 for r in results)
    metrics = urllib.request.urlopen(server + "/metrics").read().decode()
    peak = [line for line in metrics.splitlines() if line.startswith("vlmc_max_running_batch_size ")]
    assert float(peak[0].split()[1]) > 1


def post(base, body, key="k"):
    req = urllib.request.Request(base + "/v1/chat/completions", data=body if isinstance(body, bytes) else
                                 json.dumps(body).encode(), headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def image_msg(url):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "hi"}]}]}


@pytest.mark.parametrize("body,key,status", [
    (b"{not json", "k", 400),
    ({"messages": []}, "k", 400),
    ({"model": "m"}, "k", 400),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, "k", 400),
    (image_msg("data:image/png;base64,aGVsbG8="), "k", 400),
    (image_msg("https://example.com/a.png"), "k", 400),
    (image_msg("/etc/hostname"), "k", 400),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "k", 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10000}, "k", 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}, "k", 400),
    ({"messages": [{"role": "user", "content": "hi"}]}, "wrong", 401),
])
def test_bad_input_gets_4xx_and_server_keeps_serving(server, body, key, status):
    code, out = post(server, body, key)
    assert code == status, out
    assert set(out["error"]) >= {"message", "type", "code"}
    code, out = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert code == 200 and out["usage"]["completion_tokens"] <= 3
