"""`vlmc serve` end to end: a real server subprocess on a loopback port, driven by the official openai client."""

import base64
import contextlib
import functools
import http.client
import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from compiled import compile_artifact, generate_json, llm_shape, visual_budget
from conftest import random_image, write_video

openai = pytest.importorskip("openai")


def free_port():
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
    visual = compile_artifact("qwen2_5_vl_visual.yaml", ck, ws, *visual_budget())
    # Two TP ranks, so that serving runs its rank processes and the fault tests can kill one.
    llm = compile_artifact("qwen2_5_vl_llm.yaml", ck, ws, *llm_shape(),
                           "--batch-size", "4", "--tp", "2")
    return {"visual": visual, "llm": llm, "ws": ws}


def start_server(llm, visual, *flags):
    """A `vlmc serve` subprocess on a free loopback port, once /health answers 200; (base URL, process)."""
    port = free_port()
    # The server's log goes to a file: a pipe nobody reads would fill up and block the server.
    log = open(Path(str(llm)).parent / f"serve-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vlmc", "serve", "--model", llm, "--vit_model", visual,
                             "--port", str(port), *flags], stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    base = f"http://127.0.0.1:{port}"
    for _ in range(480):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return base, proc
        except OSError:
            assert proc.poll() is None, server_log(proc)
            time.sleep(0.5)
    raise AssertionError("the server did not come up:\n" + server_log(proc))


def server_log(proc):
    proc.log.seek(0)
    return proc.log.read()[-5000:]


def stop_server(proc, clean_log=True):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, server_log(proc)
    if clean_log:  # bad input is answered, never logged as a crash
        assert "Traceback" not in server_log(proc), server_log(proc)


@pytest.fixture(scope="module")
def server(artifacts):
    base, proc = start_server(artifacts["llm"], artifacts["visual"], "--api-key", "k", "--allowed-local-media-path",
                              str(artifacts["ws"]), "--llm_devices", "[3,4]", "--vit_devices", "[1]",
                              "--video-min-pixels", "3136", "--video-max-pixels", "12544")
    yield base
    stop_server(proc)


def client(base, key="k"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def assert_serves_like_generate(llm, visual, image_path, max_tokens=12, video_path=None):
    """`vlmc serve` on (llm, visual) answers the openai client with `vlmc generate`'s greedy text for one image
    (and, given `video_path`, for that image and a video in one prompt)."""
    from PIL import Image

    cases = [([{"type": "image_url", "image_url": {"url": data_uri(Image.open(image_path))}}], ["--image", image_path])]
    if video_path is not None:
        video_url = "data:video/mp4;base64," + base64.b64encode(Path(video_path).read_bytes()).decode()
        cases.append((cases[0][0] + [{"type": "video_url", "video_url": {"url": video_url, "num_frames": 4}}],
                      ["--image", image_path, "--video", video_path, "--num-frames", "4"]))
    refs = [generate_json("--model", llm, "--vit_model", visual, *flags, "--prompt", "Describe.", "--max-new-tokens",
                          max_tokens) for _, flags in cases]
    base, proc = start_server(llm, visual)
    try:
        for (parts, _), ref in zip(cases, refs):
            messages = [{"role": "user", "content": parts + [{"type": "text", "text": "Describe."}]}]
            out = client(base, key="unused").chat.completions.create(model="m", messages=messages,
                                                                     max_tokens=max_tokens, temperature=0)
            assert out.choices[0].message.content == ref["text"]
            assert out.usage.prompt_tokens == ref["prompt_tokens"]
    finally:
        stop_server(proc)


def test_video_url_matches_generate(server, artifacts):
    """A video_url (vLLM's form, with an fps next to the URL) gets `vlmc generate --video`'s text; sent again
    it comes from the embedding cache."""
    path = write_video(artifacts["ws"] / "clip.mp4", 12, 60, 90, fps=6)
    ref = generate_json("--model", artifacts["llm"], "--vit_model", artifacts["visual"], "--video", path,
                        "--fps", "4", "--video-min-pixels", "3136", "--video-max-pixels", "12544",
                        "--prompt", "What moves?", "--max-new-tokens", "12")
    hits = metric(server, "vlmc_image_cache_hits_total")
    for url in (str(path), "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()):
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, "fps": 4}},
                                                 {"type": "text", "text": "What moves?"}]}]
        out = client(server).chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
        assert out.choices[0].message.content == ref["text"]
        assert out.usage.prompt_tokens == ref["prompt_tokens"]
    assert metric(server, "vlmc_image_cache_hits_total") == hits + 1  # same bytes, same sampling


def test_greedy_text_matches_generate(server, artifacts):
    image = random_image(56, 84, seed=1)
    path = artifacts["ws"] / "img.png"
    image.save(path)
    # `vlmc generate` runs on the same batch-4 artifact, in its batch-1 decode graph (as a lone request does).
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


def test_several_images_and_multi_turn_history_match_transformers(server, checkpoints):
    from transformers import AutoTokenizer
    from vlmc.build_in.source_code.qwen2_5_vl.reference import generate_reference, load_model, reference_inputs

    images = [random_image(56, 84, seed=21), random_image(84, 56, seed=22), random_image(56, 56, seed=23)]

    def image_part(image):
        return {"type": "image_url", "image_url": {"url": data_uri(image)}}

    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [image_part(images[0]), image_part(images[1]),
                                         {"type": "text", "text": "Compare them."}]},
            {"role": "assistant", "content": "They differ."},
            {"role": "user", "content": [image_part(images[2]), {"type": "text", "text": "And this one?"}]}]
    out = client(server).chat.completions.create(model="m", messages=chat, max_tokens=8, temperature=0,
                                                 extra_body={"min_tokens": 8})
    # transformers on the same conversation (images as the chat template's image parts), greedy, EOS suppressed.
    template = [dict(m, content=m["content"] if isinstance(m["content"], str) else
                     [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]) for m in chat]
    model = load_model(checkpoints["tiny"])
    ref = reference_inputs(checkpoints["tiny"], images, None, model=model, messages=template)
    tokens = generate_reference(model, ref, 8)
    assert out.usage.prompt_tokens == ref["input_ids"].shape[1]
    text = AutoTokenizer.from_pretrained(checkpoints["tiny"]).decode(tokens, skip_special_tokens=True)
    assert out.choices[0].message.content == text


def test_concurrent_requests_batch_together(server):
    c = client(server)

    def ask(i):
        url = data_uri(random_image(28 * (1 + i % 3), 56, seed=i))
        return c.chat.completions.create(model="m", max_tokens=24, extra_body={"ignore_eos": True}, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": f"picture {i}"}]}])

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16)))
    assert len(results) == 16 and all(r.usage.completion_tokens == 24 for r in results)
    metrics = urllib.request.urlopen(server + "/metrics").read().decode()
    peak = [line for line in metrics.splitlines() if line.startswith("vlmc_max_running_batch_size ")]
    assert float(peak[0].split()[1]) > 1


def test_requests_finishing_apart_decode_as_alone(server):
    """Requests that finish at different times (the last running one moves into a finished one's slot) get the
    text each gets alone, and a lone request's steps all run the batch-1 decode graph."""
    c = client(server)

    def ask(i):
        return c.chat.completions.create(model="m", max_tokens=3 + 6 * i, temperature=0, extra_body={
            "ignore_eos": True}, messages=[{"role": "user", "content": f"Tell story number {i}."}]).choices[0] \
            .message.content

    def graph_steps(le):
        return metric(server, f'vlmc_decode_graph_batch_bucket{{le="{le}"}}')

    steps, batch1 = metric(server, "vlmc_decode_graph_batch_count"), graph_steps("1.0")
    alone = [ask(i) for i in range(4)]
    assert metric(server, "vlmc_decode_graph_batch_count") - steps == sum(2 + 6 * i for i in range(4))
    assert graph_steps("1.0") - batch1 == sum(2 + 6 * i for i in range(4))
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, range(4)))
    assert together == alone


def server_tree_rss_mib(base):
    """Resident memory of the server's processes (HTTP, workers, TP ranks), from /proc."""
    health = get_json(base + "/health")[1]["workers"]
    pids = [w["pid"] for w in health.values()] + health["llm"].get("rank_pids", [])
    port = base.rsplit(":", 1)[1]
    http = [p for p in os.listdir("/proc") if p.isdigit() and port in Path(f"/proc/{p}/cmdline").read_bytes()
            .decode(errors="replace").replace("\0", " ").split()]
    total = 0
    for pid in {*map(str, pids), *http}:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total / 2**20


def test_load_64_concurrent_streams_with_images(server):
    """64 clients streaming image requests at once, 2 each: every request completes with all its tokens, the
    server's memory stays bounded (requests wait in bounded queues, not in growing buffers); p99 TTFT printed."""
    c = client(server)
    images = [data_uri(random_image(28 * (1 + i % 3), 28 * (1 + i % 2), seed=100 + i)) for i in range(8)]

    def one(i):
        t0 = time.perf_counter()
        first, usage = None, None
        stream = c.chat.completions.create(model="m", max_tokens=6, temperature=0, stream=True, timeout=600,
                                           extra_body={"ignore_eos": True}, stream_options={"include_usage": True},
                                           messages=[{"role": "user", "content": [
                                               {"type": "image_url", "image_url": {"url": images[i % 8]}},
                                               {"type": "text", "text": f"request {i}"}]}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - t0
            usage = chunk.usage or usage
        # (a random model's tokens may all be special ones and give no text: then the whole request's time)
        return first if first is not None else time.perf_counter() - t0, usage.completion_tokens

    def client_loop(k):
        return [one(2 * k + j) for j in range(2)]

    one(0)  # warm
    before = server_tree_rss_mib(server)
    with ThreadPoolExecutor(64) as pool:
        results = [r for rs in pool.map(client_loop, range(64)) for r in rs]
    after = server_tree_rss_mib(server)
    assert len(results) == 128 and all(tokens == 6 for _, tokens in results)
    ttfts = sorted(t for t, _ in results)
    print(f"load: 128 requests from 64 streams, TTFT p50 {ttfts[64]:.2f} s, p99 {ttfts[126]:.2f} s; server RSS "
          f"{before:.0f} -> {after:.0f} MiB")
    assert after - before < 300, (before, after)
    wait_for(lambda: metric(server, "vlmc_running_batch_size") == 0, 30, "an empty decode batch")


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


def video_msg(url, **options):
    return {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, **options}},
                                                      {"type": "text", "text": "hi"}]}]}


@pytest.mark.parametrize("body,key,status,says", [
    (b"{not json", "k", 400, "not valid JSON"),
    ({"messages": []}, "k", 400, "non-empty"),
    ({"model": "m"}, "k", 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, "k", 400, "'audio'"),
    (image_msg("data:image/png;base64,aGVsbG8="), "k", 400, "decoded"),
    (image_msg("https://example.com/a.png"), "k", 400, "--allow-remote-media"),
    (image_msg("/etc/hostname"), "k", 400, "--allowed-local-media-path"),
    (video_msg("data:video/mp4;base64,aGVsbG8="), "k", 400, "not a readable video"),
    (video_msg("data:video/mp4;base64,aGVsbG8=", fps=-1), "k", 400, "fps must be a positive number"),
    (video_msg("data:video/mp4;base64,aGVsbG8=", max_frames=10000), "k", 400, "--max-video-frames"),
    (video_msg("/etc/hostname"), "k", 400, "--allowed-local-media-path"),
    # Over the compiled prefill length: the message gives the prompt's token count and the limit.
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "k", 400, "compiled prefill length of 256"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10000}, "k", 400, "context of 320"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}, "k", 400, "context of 320"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "wrong", 401, "API key"),
])
def test_bad_input_gets_4xx_and_server_keeps_serving(server, body, key, status, says):
    code, out = post(server, body, key)
    assert code == status, out
    assert set(out["error"]) >= {"message", "type", "code"}
    assert says in out["error"]["message"], out
    if "prefill length" in says:
        assert "tokens" in out["error"]["message"] and out["error"]["code"] == "context_length_exceeded"
    code, out = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert code == 200 and out["usage"]["completion_tokens"] <= 3


def get_json(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(base, name):
    """Sum of a Prometheus sample over its labels (0 if absent)."""
    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def wait_for(check, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


LONG = {"max_tokens": 200, "extra_body": {"ignore_eos": True}}  # far longer than a kill or disconnect takes


def test_health_reports_workers_and_devices(server):
    code, health = get_json(server + "/health")
    assert code == 200 and health["status"] == "ok"
    llm, visual = health["workers"]["llm"], health["workers"]["visual"]
    assert llm["devices"] == [3, 4] and visual["devices"] == [1]
    assert llm["state"] == visual["state"] == "up" and llm["restarts"] == 0
    assert isinstance(llm["pid"], int) and isinstance(visual["pid"], int) and len(llm["rank_pids"]) == 1


def test_openapi_document_describes_the_api(server):
    from vlmc.runtime.serve.openapi import ChatCompletion, ChatCompletionRequest, ModelList

    doc = get_json(server + "/openapi.json")[1]
    assert {"/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(doc["paths"])
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    fields = set(chat["requestBody"]["content"]["application/json"]["schema"]["properties"])
    assert {"messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_tokens", "ignore_eos",
            "stream", "stream_options"} <= fields
    assert {"200", "400", "401", "503"} <= set(chat["responses"])
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs and refs <= set(doc["components"]["schemas"])  # every reference resolves
    # A real request and the server's real answers have the documented shapes.
    body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(random_image(56, 56, seed=5))}},
        {"type": "text", "text": "hi"}]}]}
    ChatCompletionRequest.model_validate(body)
    code, out = post(server, body)
    assert code == 200
    ChatCompletion.model_validate(out)
    req = urllib.request.Request(server + "/v1/models", headers={"Authorization": "Bearer k"})
    ModelList.model_validate(json.loads(urllib.request.urlopen(req).read()))


def test_device_flags_are_validated(artifacts):
    from compiled import vlmc

    for flags, says in [
        (["--llm_devices", "[0,1,2]"], "compiled for tp=2"),
        (["--llm_devices", "[0,x]"], "list of device ids"),
        (["--vit_devices", "[1,2]"], "runs on one"),
    ]:
        proc = vlmc("serve", "--model", artifacts["llm"], "--vit_model", artifacts["visual"], "--port",
                    str(free_port()), *flags, check=False, timeout=120)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_image_cache_skips_the_visual_graph(server):
    c = client(server)
    url = data_uri(random_image(56, 56, seed=99))  # an image no other test sends
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Again?"}]}]
    hits, misses = metric(server, "vlmc_image_cache_hits_total"), metric(server, "vlmc_image_cache_misses_total")
    encodes = metric(server, "vlmc_visual_encode_seconds_count")
    first = c.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
    assert metric(server, "vlmc_image_cache_misses_total") == misses + 1
    second = c.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
    assert metric(server, "vlmc_image_cache_hits_total") == hits + 1
    assert metric(server, "vlmc_image_cache_misses_total") == misses + 1
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    # The visual encode time histogram sees every request with images.
    assert metric(server, "vlmc_visual_encode_seconds_count") == encodes + 2
    assert metric(server, "vlmc_visual_encode_seconds_sum") > 0
    assert metric(server, "vlmc_image_cache_bytes") > 0


def open_stream(base, body, key="k"):
    """A raw streaming request (so the test can drop the connection); returns (connection, response)."""
    host, port = base.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.connect()
    conn.raw_sock = conn.sock  # http.client may drop its reference once the response is open
    conn.request("POST", "/v1/chat/completions", json.dumps(dict(body, stream=True)),
                 {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def test_client_disconnect_frees_its_slot(server):
    cancelled = metric(server, "vlmc_cancelled_requests_total")
    conn, resp = open_stream(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 250,
                                      "ignore_eos": True})
    chunks = [resp.readline() for _ in range(6)]  # role chunk and a couple of tokens (with blank separators)
    assert all(c.startswith(b"data: ") or c == b"\n" for c in chunks)
    conn.raw_sock.shutdown(2)  # the client goes away mid-stream
    conn.raw_sock.close()
    wait_for(lambda: metric(server, "vlmc_cancelled_requests_total") == cancelled + 1, 30, "the cancel")
    assert 'reason="client_disconnect"' in urllib.request.urlopen(server + "/metrics").read().decode()
    wait_for(lambda: metric(server, "vlmc_running_batch_size") == 0, 30, "an empty decode batch")
    # A non-streaming client that hangs up is noticed too.
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 250, "ignore_eos": True})
    host, port = server.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer k\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        wait_for(lambda: metric(server, "vlmc_running_batch_size") > 0, 30, "decoding to start")
    wait_for(lambda: metric(server, "vlmc_cancelled_requests_total") == cancelled + 2, 30, "the second cancel")
    wait_for(lambda: metric(server, "vlmc_running_batch_size") == 0, 30, "an empty decode batch")
    code, out = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert code == 200 and out["usage"]["completion_tokens"] <= 3


FUZZ_CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"


def test_fuzz_against_the_openapi_document(server, tmp_path):
    """schemathesis generates requests from the served OpenAPI document (a short run; docs/serve.md has the long
    one): no 5xx, every status, content type and body as documented; then a good request still works."""
    proc = subprocess.run(["schemathesis", "run", server + "/openapi.json", "-H", "Authorization: Bearer k",
                           "--checks", FUZZ_CHECKS, "--max-examples", "5", "--seed", "1", "--no-color",
                           "--request-timeout", "60", "--report", "junit", "--report-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    generated = int(re.search(r"(\d+) generated", proc.stdout).group(1))
    assert generated >= 80, proc.stdout[-3000:]
    print(f"schemathesis: {generated} requests, no failures")
    code, out = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert code == 200


# --- request limits: a server with small ones; after each refusal it still answers a good request ---

@pytest.fixture(scope="module")
def limited_server(artifacts):
    base, proc = start_server(artifacts["llm"], artifacts["visual"], "--api-key", "k", "--max-request-mb", "1",
                              "--max-images-per-request", "2", "--max-image-pixels", "1000000",
                              "--max-prompt-tokens", "100", "--body-timeout", "2", "--header-timeout", "2",
                              "--send-timeout", "2",
                              "--allowed-origins", "http://app.example")
    yield base
    stop_server(proc)


def bomb_png(width, height):
    """A valid 1-bit PNG of width x height zeros: a few KB of file, width * height pixels once decoded."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, idat = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8), b""
    for _ in range(height):
        idat += packer.compress(row)
    idat += packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb_png_is_a_valid_png():
    from PIL import Image

    data = bomb_png(64, 48)
    assert len(data) < 200
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size == (64, 48) and image.mode == "1"


def chunked_post(base, parts):
    """POST with Transfer-Encoding: chunked (no Content-Length for the server to check first)."""
    host, port = base.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=iter(parts), encode_chunked=True,
                 headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


@pytest.mark.parametrize("case", ["body_length", "body_chunked", "images", "bomb", "prompt_tokens"])
def test_request_limits_refuse_with_the_limit_named(limited_server, case):
    image = data_uri(random_image(28, 28, seed=3))
    t0 = time.monotonic()
    if case == "body_length":  # refused from the header: the client has sent only a part of its body yet
        reply = raw_request(limited_server, f"Content-Length: {2 * 2**20}\r\n\r\n" + "x" * 2**16)
        assert reply.startswith("HTTP/1.1 413") and "request_too_large" in reply and "--max-request-mb" in reply
    elif case == "body_chunked":
        code, out = chunked_post(limited_server, [b'{"messages": [{"role": "user", "content": "'] +
                                 [b"x" * 2**16] * 24 + [b'"}]}'])
        assert (code, out["error"]["code"]) == (413, "request_too_large") and "--max-request-mb" in str(out)
    elif case == "images":
        parts = [{"type": "image_url", "image_url": {"url": image}}] * 3 + [{"type": "text", "text": "hi"}]
        code, out = post(limited_server, {"messages": [{"role": "user", "content": parts}]})
        assert (code, out["error"]["code"]) == (400, "too_many_images")
        assert "3 images" in out["error"]["message"] and "--max-images-per-request" in out["error"]["message"]
    elif case == "bomb":
        data = bomb_png(20000, 20000)
        assert len(data) < 100_000  # a few tens of KB on the wire, 400 million pixels decoded
        code, out = post(limited_server, image_msg("data:image/png;base64," + base64.b64encode(data).decode()))
        assert (code, out["error"]["code"]) == (413, "image_too_large")
        assert "20000x20000" in out["error"]["message"] and "--max-image-pixels" in out["error"]["message"]
        assert time.monotonic() - t0 < 10  # refused from the header, not after decoding 400 Mpixels
    else:
        code, out = post(limited_server, {"messages": [{"role": "user", "content": "word " * 150}]})
        assert (code, out["error"]["code"]) == (400, "context_length_exceeded")
        assert "--max-prompt-tokens" in out["error"]["message"] and "limit of 100" in out["error"]["message"]
    parts = [{"type": "image_url", "image_url": {"url": image}}] * 2 + [{"type": "text", "text": "hi"}]
    code, out = post(limited_server, {"messages": [{"role": "user", "content": parts}], "max_tokens": 3})
    assert code == 200 and out["usage"]["completion_tokens"] <= 3


def raw_request(base, rest):
    """POST over a plain socket: the request line and headers, then `rest` (more headers and a body, maybe a
    part of it); returns what the server answers (before the client would have sent everything)."""
    host, port = base.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer k\r\n"
                     f"Content-Type: application/json\r\n{rest}".encode())
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"content-length: (\d+)", reply, re.I).group(1)):
            if not (data := sock.recv(65536)):
                break
            reply += data
        return reply.decode()


def test_stalled_body_times_out(limited_server):
    t0 = time.monotonic()
    reply = raw_request(limited_server, 'Content-Length: 1000\r\n\r\n{"messa')
    assert reply.startswith("HTTP/1.1 408") and "--body-timeout" in reply
    assert 1.5 < time.monotonic() - t0 < 15
    code, out = post(limited_server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert code == 200


def test_stalled_headers_time_out(limited_server):
    host, port = limited_server.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bea".encode())
        t0 = time.monotonic()
        reply = sock.recv(65536).decode()
        assert sock.recv(65536) == b""  # and closed
    assert reply.startswith("HTTP/1.1 408") and 1.5 < time.monotonic() - t0 < 15
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # an idle connection too
        assert sock.recv(65536).startswith(b"HTTP/1.1 408")
    code, out = post(limited_server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert code == 200


def test_client_that_stops_reading_a_stream_is_dropped(limited_server):
    """A client that reads nothing: once the socket and the transport's buffer are full, --send-timeout drops the
    connection (the stream's handler then sees the client gone and cancels its sequence)."""
    host, port = limited_server.rsplit("/", 1)[1].split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 280, "ignore_eos": True,
                       "stream": True})
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connecting: a small receive window
        sock.settimeout(30)
        sock.connect((host, int(port)))
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer k\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        time.sleep(4)  # reads nothing past the 2 s timeout
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                received += data
    assert received.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" not in received and received.count(b"data: ") < 281  # cut off before the end
    code, out = post(limited_server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert code == 200


def preflight(base, origin):
    req = urllib.request.Request(base + "/v1/chat/completions", method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def test_cors_only_for_allowed_origins(limited_server, server):
    status, headers = preflight(limited_server, "http://app.example")
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://app.example"
    status, headers = preflight(limited_server, "http://evil.example")
    assert headers.get("Access-Control-Allow-Origin") is None
    status, headers = preflight(server, "http://app.example")  # no --allowed-origins: CORS off
    assert headers.get("Access-Control-Allow-Origin") is None


def test_limit_flags_are_validated(artifacts):
    for flag, value in (("--max-request-mb", "0"), ("--max-image-pixels", "-1"), ("--body-timeout", "0"),
                        ("--max-images-per-request", "-2")):
        proc = subprocess.run([sys.executable, "-m", "vlmc", "serve", "--model", artifacts["llm"], "--vit_model",
                               artifacts["visual"], flag, value], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and flag in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# --- faults: a separate server (remote media on), so that killing workers disturbs nobody else ---

@pytest.fixture(scope="module")
def fault_server(artifacts):
    base, proc = start_server(artifacts["llm"], artifacts["visual"], "--llm_devices", "[0,1]",
                              "--vit_devices", "[2]", "--allow-remote-media", "--remote-media-max-mb", "1")
    yield base, proc
    stop_server(proc, clean_log=False)  # killed workers leave their tracebacks in the log


def wait_healthy(base, timeout=120):
    wait_for(lambda: get_json(base + "/health")[0] == 200, timeout, "/health to report 200")


def assert_serves(base, with_image=False):
    content = [{"type": "text", "text": "hi"}]
    if with_image:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_uri(random_image(28, 56, seed=5))}})
    out = client(base).chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                               max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens <= 4


def kill_mid_request(base, pid_of, stream=True):
    """Start a long request, kill the worker `pid_of(health)` names while it decodes; returns the client error."""
    c = client(base)
    pid = pid_of(get_json(base + "/health")[1]["workers"])
    messages = [{"role": "user", "content": "tell me everything"}]
    t0 = time.monotonic()
    with pytest.raises(openai.APIError) as err:
        if stream:
            chunks = iter(c.chat.completions.create(model="m", messages=messages, stream=True, **LONG))
            next(chunks), next(chunks)  # decoding has started
            os.kill(pid, signal.SIGKILL)
            list(chunks)
        else:
            with ThreadPoolExecutor(1) as pool:
                fut = pool.submit(c.chat.completions.create, model="m", messages=messages, **LONG)
                wait_for(lambda: metric(base, "vlmc_running_batch_size") > 0, 30, "decoding to start")
                os.kill(pid, signal.SIGKILL)
                fut.result(timeout=60)
    assert time.monotonic() - t0 < 60  # an error, not a hang
    return err.value


def test_llm_worker_death_fails_in_flight_and_restarts(fault_server):
    base, _ = fault_server
    err = kill_mid_request(base, lambda w: w["llm"]["pid"])
    assert "llm worker" in str(err)
    code, health = get_json(base + "/health")
    assert code == 503 and health["workers"]["llm"]["state"] != "up"
    wait_healthy(base)
    assert get_json(base + "/health")[1]["workers"]["llm"]["restarts"] == 1
    assert_serves(base, with_image=True)


def test_tp_rank_death_fails_in_flight_and_restarts(fault_server):
    base, _ = fault_server
    restarts = get_json(base + "/health")[1]["workers"]["llm"]["restarts"]
    err = kill_mid_request(base, lambda w: w["llm"]["rank_pids"][0], stream=False)
    assert isinstance(err, openai.APIStatusError) and err.status_code == 503
    assert err.body["code"] == "worker_died" or "worker" in err.body["message"]
    wait_healthy(base)
    assert get_json(base + "/health")[1]["workers"]["llm"]["restarts"] == restarts + 1
    assert_serves(base)


def test_visual_worker_death_restarts_without_hurting_running_requests(fault_server):
    base, _ = fault_server
    c = client(base)
    pid = get_json(base + "/health")[1]["workers"]["visual"]["pid"]
    chunks = iter(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}], stream=True,
                                            stream_options={"include_usage": True}, **LONG))
    next(chunks), next(chunks)
    os.kill(pid, signal.SIGKILL)
    # An image request now finds the visual worker dead or restarting: a quick 503, never a hang.
    with pytest.raises(openai.APIStatusError) as err:
        assert_serves(base, with_image=True)
    assert err.value.status_code == 503
    wait_for(lambda: get_json(base + "/health")[0] == 503 or
             get_json(base + "/health")[1]["workers"]["visual"]["restarts"] == 1, 10, "the death to be noticed")
    # The sequence already decoding in the LLM worker does not depend on the visual worker.
    assert list(chunks)[-1].usage.completion_tokens == LONG["max_tokens"]
    wait_healthy(base)
    assert get_json(base + "/health")[1]["workers"]["visual"]["restarts"] == 1
    assert_serves(base, with_image=True)


@pytest.fixture
def media_site(tmp_path):
    """A loopback http server with a small PNG and a 2 MB file (over the fault server's 1 MiB cap)."""
    random_image(56, 56, seed=7).save(tmp_path / "a.png")
    (tmp_path / "big.png").write_bytes(b"\0" * (2 << 20))
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_remote_media_when_enabled(fault_server, media_site):
    base, _ = fault_server
    local = post(base, dict(image_msg(data_uri(random_image(56, 56, seed=7))), max_tokens=8))
    remote = post(base, dict(image_msg(media_site + "/a.png"), max_tokens=8))
    assert remote[0] == local[0] == 200
    assert remote[1]["choices"][0]["message"]["content"] == local[1]["choices"][0]["message"]["content"]
    for path, says in [("/missing.png", "HTTP 404"), ("/big.png", "larger than 1 MiB")]:
        code, out = post(base, image_msg(media_site + path))
        assert code == 400 and says in out["error"]["message"], out
    code, out = post(base, image_msg(f"http://127.0.0.1:{free_port()}/a.png"))  # nobody listens there
    assert code == 400 and out["error"]["code"] == "image_fetch_failed"
    assert_serves(base)


def test_sigterm_finishes_in_flight_and_exits_0(fault_server):
    """Last test of the fault server: SIGTERM stops accepting, lets the running stream finish, exits 0."""
    base, proc = fault_server
    pids = [p for w in get_json(base + "/health")[1]["workers"].values() for p in [w["pid"], *w.get("rank_pids", [])]]
    chunks = iter(client(base).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "go"}], stream=True, stream_options={"include_usage": True},
        **LONG))
    next(chunks), next(chunks)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):  # no longer accepting
        urllib.request.urlopen(base + "/health", timeout=5)
    rest = list(chunks)
    assert rest[-1].usage.completion_tokens == LONG["max_tokens"]
    assert [ch.choices[0].finish_reason for ch in rest if ch.choices][-1] == "length"
    assert proc.wait(timeout=60) == 0
    for pid in pids:  # no worker or TP rank outlives the server
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                 open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", 10, f"pid {pid} to exit")
