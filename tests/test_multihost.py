"""Tensor parallelism over two "hosts": two process trees with different node ranks, meeting over 127.0.0.1, run a
tp-4 artifact as 2 x 2 and give the greedy tokens of tp 4 on one host; a killed rank on the other host is reported
and recovered from like a local one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compiled import generate_json, vlmc
from conftest import random_image
from test_serve import client, free_port, get_json, start_server, stop_server, wait_for


def node(*args, log):
    """`vlmc ARGS` as another host's process tree (its own process group), output to `log`."""
    return subprocess.Popen([sys.executable, "-m", "vlmc", *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def rank_processes(pid):
    """The rank processes `pid` spawned (multiprocessing's spawned children, not its resource tracker), from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == pid and b"spawn_main" in Path(f"/proc/{entry}/cmdline").read_bytes():
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("multihost") / "img.png"
    random_image(56, 84, seed=11).save(path)
    return path


def generate_args(qwen_artifacts, image):
    return ("--model", qwen_artifacts["tiny", 4], "--vit_model", qwen_artifacts["tiny", "visual"], "--image", image,
            "--prompt", "Describe it.", "--max-new-tokens", 12)


@pytest.fixture(scope="module")
def alone(qwen_artifacts, image):
    """`vlmc generate` on one host: tp 4 as four local ranks."""
    return generate_json(*generate_args(qwen_artifacts, image))


def test_generate_on_two_nodes_matches_one(qwen_artifacts, image, alone, tmp_path):
    llm = qwen_artifacts["tiny", 4]
    args = generate_args(qwen_artifacts, image)
    port = free_port()
    cluster = ("--nnodes", 2, "--master-addr", "127.0.0.1", "--master-port", port)
    with open(tmp_path / "node1.log", "w+") as log:
        other = node("generate", "--model", llm, *cluster, "--node-rank", 1, log=log)
        try:
            together = generate_json(*args, *cluster, "--node-rank", 0)
            assert other.wait(timeout=120) == 0, log.seek(0) or log.read()
        finally:
            if other.poll() is None:
                os.killpg(other.pid, signal.SIGKILL)
    assert together["token_ids"] == alone["token_ids"] and together["text"] == alone["text"]


def test_cluster_flags_are_validated(qwen_artifacts):
    llm = qwen_artifacts["tiny", 4]
    for flags, says in ((("--nnodes", 3, "--master-port", 1234), "does not divide over --nnodes 3"),
                        (("--nnodes", 2), "needs --master-port"),
                        (("--nnodes", 2, "--node-rank", 2, "--master-port", 1234), "--node-rank must be in")):
        proc = vlmc("generate", "--model", llm, "--prompt", "hi", *flags, check=False)
        assert proc.returncode != 0 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_serve_on_two_nodes_and_a_remote_rank_dies(qwen_artifacts, image, alone, tmp_path):
    llm, visual = qwen_artifacts["tiny", 4], qwen_artifacts["tiny", "visual"]
    port = free_port()
    cluster = ("--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port))
    log = open(tmp_path / "node1.log", "w+")
    # node 1 first: its ranks wait for node 0's rank 0
    other = node("serve", "--model", llm, *cluster, "--node-rank", "1", log=log)
    base, proc = start_server(str(llm), str(visual), *cluster, "--node-rank", "0")
    try:
        import base64

        url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "Describe it."}]}]

        def ask():
            return client(base).chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)

        assert ask().choices[0].message.content == alone["text"]
        # Kill one of node 1's ranks: node 0 notices (its next collective fails), restarts its LLM worker, and
        # node 1's ranks rejoin the new group.
        ranks = rank_processes(other.pid)
        assert len(ranks) == 2, (ranks, log.seek(0) or log.read())
        restarts = get_json(base + "/health")[1]["workers"]["llm"]["restarts"]
        os.kill(ranks[0], signal.SIGKILL)
        wait_for(lambda: get_json(base + "/health")[1]["workers"]["llm"]["restarts"] > restarts, 60,
                 "the LLM worker to be restarted")
        wait_for(lambda: get_json(base + "/health")[0] == 200, 120, "/health to report 200 again")
        deadline = time.monotonic() + 120
        while True:  # the new group forms once node 1's ranks have rejoined
            try:
                out = ask()
                break
            except Exception:
                assert time.monotonic() < deadline, log.seek(0) or log.read()
                time.sleep(1)
        assert out.choices[0].message.content == alone["text"]
        assert other.poll() is None  # node 1 stays up
    finally:
        stop_server(proc, clean_log=False)
        # node 0's clean stop tells every rank to stop: node 1 exits 0
        try:
            assert other.wait(timeout=60) == 0, log.seek(0) or log.read()
        finally:
            if other.poll() is None:
                os.killpg(other.pid, signal.SIGKILL)
            log.close()
