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
    "llamacpp": {"f32": "f32 text and vision GGUF, f32 KV cache, no flash attention",
                 "f16": "f16 text and vision GGUF, llama-cpp-python's defaults (f16 KV cache)",
                 "q8_0": "q8_0 text GGUF, f16 vision GGUF, defaults",
                 "q4_0": "q4_0 text GGUF (llama.cpp's quantizer on the f16 file), f16 vision GGUF, defaults"},
}
IMPORTS = {"openvino": "import openvino_genai, optimum.intel", "llamacpp": "import llama_cpp.mtmd_cpp, gguf"}
EXACT = {"openvino:fp32", "llamacpp:f32"}  # the variants asked for fp32 arithmetic


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


def _commands(peer: Peer, ck: Path, python: str, out: Path, converter: str | None) -> list[list[str]]:
    """The peer's own conversion tools, as a user would call them."""
    if peer.runtime == "openvino":
        return [[_tool(python, "optimum-cli"), "export", "openvino", "--model", str(ck), "--task",
                 "image-text-to-text", "--weight-format", "int8" if peer.variant == "int8" else "fp32", str(out)]]
    if not converter:
        raise VlmcError("--peers llamacpp needs --llamacpp-converter: convert_hf_to_gguf.py from the llama.cpp "
                        "source that built the runtime (llama-cpp-python's source package has it under vendor/)")
    convert = [python, str(HERE / "llamacpp_convert.py"), converter, str(ck)]
    text_type = "f16" if peer.variant == "q4_0" else peer.variant
    vision_type = "f32" if peer.variant == "f32" else "f16"
    commands = [convert + ["--outtype", text_type, "--outfile", str(out / f"text-{text_type}.gguf")],
                convert + ["--mmproj", "--outtype", vision_type, "--outfile", str(out / "mmproj.gguf")]]
    if peer.variant == "q4_0":  # the converter writes up to q8_0; llama.cpp's quantizer makes q4_0
        commands.append([python, "-c", "import sys, llama_cpp as l; p = l.llama_model_quantize_default_params(); "
                         "p.ftype = l.LLAMA_FTYPE_MOSTLY_Q4_0; "
                         "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))",
                         str(out / "text-f16.gguf"), str(out / "text-q4_0.gguf")])
    return commands


def convert(peer: Peer, checkpoint: str, python: str, workspace: Path, log, converter: str | None = None) -> Path:
    """The peer's model, converted from the checkpoint by the peer's own tool once (kept in the workspace, keyed by
    the checkpoint's files' names, sizes and times)."""
    ck = Path(checkpoint)
    stamp = json.dumps(sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in ck.iterdir()
                              if p.is_file()))
    kind = "int8" if peer.variant == "int8" else "fp32" if peer.runtime == "openvino" else peer.variant
    out = workspace / ck.name / f"{peer.runtime}-{kind}"
    marker = out / ".vlmc-converted"
    if marker.exists() and marker.read_text() == stamp:
        return out
    commands = _commands(peer, ck, python, out, converter)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(f"bench: converting {ck.name} for {peer.name} (log: {log.name})", file=sys.stderr, flush=True)
    for command in commands:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise VlmcError(f"bench: converting for {peer.name} failed (exit {done.returncode}); see {log.name}")
    marker.write_text(stamp)
    return out


def side_settings(peer: Peer, model_dir: Path, common: dict, prompts: dict) -> dict:
    """What a peer's side process is told: its files, the prompt, and the inputs every side gets. GenAI applies the
    chat template it exported to the prompt text; llama.cpp is given transformers' rendering of the whole chat, with
    the text its image part became (`prompts`: see chat_prompts)."""
    settings = {**common, "exact": peer.name in EXACT}
    if peer.runtime == "openvino":
        return {**settings, "model_dir": str(model_dir), "prompt": prompts["text"]}
    return {**settings, "model": str(model_dir / f"text-{peer.variant}.gguf"), "mmproj": str(model_dir / "mmproj.gguf"),
            "prompt": prompts["chat"], "image_placeholder": prompts["image_placeholder"]}


def chat_prompts(checkpoint: str, text: str, tokenizer) -> dict:
    """The prompt text, the chat transformers renders for one image and that text, and the text an image part
    became in it (llama.cpp's mtmd wants its own marker there): the image token, with the vision start and end
    tokens around it when the model has them."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    ids = [getattr(config, name, None) for name in ("vision_start_token_id", "image_token_id", "vision_end_token_id")]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return {"text": text, "chat": chat, "image_placeholder": tokenizer.decode([i for i in ids if i is not None])}


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
