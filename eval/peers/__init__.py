"""Peer runtimes for `vlmc bench --peers`: the same checkpoint, image, prompt and token count through OpenVINO or
llama.cpp, timed in the same run as vlmc. Each peer lives in its own Python environment (their pins conflict with
vlmc's), converts the checkpoint with its own tool, and runs as a side process that speaks JSON lines
(`<peer>_side.py`). docs/benchmarks.md ("Peers") says how to install them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ...errors import VlmcError

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Peer:
    runtime: str  # openvino | llamacpp
    variant: str  # what the runtime is asked for: weights and precision

    @property
    def name(self) -> str:
        return f"{self.runtime}:{self.variant}"


# runtime -> {variant: what it means}; the first variant is the one a bare runtime name asks for
VARIANTS = {
    "openvino": {"fp32": "fp32 IR, exact f32 inference and KV cache hints",
                 "default": "fp32 IR, the CPU plugin's default precision (bf16 on CPUs with AVX512-BF16/AMX)",
                 "int8": "int8 weights (NNCF data-free, per channel), the plugin's default precision"},
}
IMPORTS = {"openvino": "import openvino_genai, optimum.intel"}


def parse_peers(text: str) -> list[Peer]:
    peers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        runtime, _, variant = item.partition(":")
        if runtime not in VARIANTS:
            raise VlmcError(f"--peers: unknown runtime {runtime!r} (known: {', '.join(VARIANTS)})")
        variant = variant or next(iter(VARIANTS[runtime]))
        if variant not in VARIANTS[runtime]:
            raise VlmcError(f"--peers: {runtime} has no variant {variant!r} (known: {', '.join(VARIANTS[runtime])})")
        peers.append(Peer(runtime, variant))
    if len(set(peers)) != len(peers):
        raise VlmcError("--peers lists a runtime twice")
    return peers


def check_python(runtime: str, python: str) -> None:
    """A one-line error when the peer's packages are not importable from `python`."""
    try:
        probe = subprocess.run([python, "-c", IMPORTS[runtime]], capture_output=True, text=True, timeout=300)
    except OSError as exc:
        raise VlmcError(f"--{runtime}-python {python}: {exc.strerror}") from None
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise VlmcError(f"--peers {runtime}: {python} cannot import its packages ({last}); docs/benchmarks.md "
                        f"(Peers) shows how to install them")


def _tool(python: str, name: str) -> str:
    beside = Path(python).parent / name  # a virtual environment's console script
    return str(beside) if beside.exists() else shutil.which(name) or name


def convert(peer: Peer, checkpoint: str, python: str, workspace: Path, log) -> Path:
    """The peer's model, converted from the checkpoint by the peer's own tool once (kept in the workspace, keyed by
    the checkpoint's config and weights' sizes and times)."""
    ck = Path(checkpoint)
    stamp = json.dumps(sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in ck.iterdir()
                              if p.is_file()))
    out = workspace / ck.name / f"{peer.runtime}-{'int8' if peer.variant == 'int8' else 'fp32'}"
    marker = out / ".vlmc-converted"
    if marker.exists() and marker.read_text() == stamp:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if peer.runtime == "openvino":
        command = [_tool(python, "optimum-cli"), "export", "openvino", "--model", str(ck), "--task",
                   "image-text-to-text", "--weight-format", "int8" if peer.variant == "int8" else "fp32", str(out)]
    print(f"bench: converting {ck.name} for {peer.name} ({' '.join(command[:3])} ...)", file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise VlmcError(f"bench: converting for {peer.name} failed (exit {done.returncode}); see {log.name}")
    marker.write_text(stamp)
    return out


class PeerSide:
    """The parent's handle on a peer's side process: the same ask/finish/kill as bench's own sides."""

    def __init__(self, peer: Peer, python: str, settings: dict, log):
        self.name, self.peer = peer.name, peer
        script = HERE / f"{peer.runtime}_side.py"
        self.proc = subprocess.Popen([python, str(script), json.dumps(settings)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log, text=True)
        self.log = log
        self.load_s = self._read()["load_s"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            raise VlmcError(f"bench: the {self.name} side exited (code {self.proc.returncode}); see {self.log.name}")
        return json.loads(line)

    def ask(self, request):
        figure, count = request
        self.proc.stdin.write(json.dumps({"figure": figure, "count": count}) + "\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def finish(self) -> dict:
        self.proc.stdin.write(json.dumps({"final": True}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait(60)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
