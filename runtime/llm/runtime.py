"""LLM runtime: load an LLM artifact and run its graphs on one rank, or on tp rank processes.

Rank 0 drives: it runs the host ops, computes every step's inputs and broadcasts them; each rank runs the same
compiled graph on its parameter shard and keeps the KV cache of its own heads; the graph's all-reduce goes
through torch.distributed. With tp = 1 there are no other processes.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
from pathlib import Path

from ..artifact import check_device, load_library, load_params, read_manifest
from ..cpu_ops.embedding import EmbeddingTable
from ..cpu_ops.pipeline import HostSpec
from .engine import CacheShape, LLMEngine


def load_rank_steps(artifact: Path, manifest: dict, rank: int, device: str = "cpu"):
    """The artifact's prefill graphs {length: step} and decode graphs {batch: step} bound to `rank`'s
    parameters (an artifact from before decode buckets has one `decode` graph of the compiled batch)."""
    from .collective import register_packed_all_reduce

    register_packed_all_reduce()
    params = load_params(artifact / f"rank_{rank}" / "params.safetensors", manifest["param_names"],
                                     device)
    steps = {name: load_library(artifact / f"{name}.so", params, device)
             for name in manifest["graphs"]}
    prefill = {int(name.split("_")[1]): fn for name, fn in steps.items() if name.startswith("prefill_")}
    decode = {int(name.split("_")[1]): fn for name, fn in steps.items() if name.startswith("decode_")}
    if "decode" in steps:
        decode[int(manifest["batch_size"])] = steps["decode"]
    return prefill, decode


class LLMArtifact:
    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, kind="llm", verify=verify)
        self.spec = HostSpec.from_dict(self.manifest["host"])
        self.tp = int(self.manifest["tp"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer"

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_path))

    def cache_shape(self) -> CacheShape:
        m = self.manifest
        return CacheShape(m["layers"], m["kv_heads_per_rank"], m["context"], m["head_dim"],
                          m.get("quantize", {}).get("kv_cache", "fp32"))

    def embedding(self) -> EmbeddingTable:
        return EmbeddingTable.load(self.path / self.manifest["embed_tokens"]["file"])

    def engine(self, rank: int = 0, device: str = "cpu", slots: int | None = None) -> LLMEngine:
        device = check_device(self.manifest, self.path, device)
        prefill, decode = load_rank_steps(self.path, self.manifest, rank, device)
        return LLMEngine(prefill, decode, self.spec.text, self.embedding(), self.cache_shape(),
                         slots=slots or int(self.manifest["batch_size"]),
                         prefill_extras=self.manifest.get("prefill_extras", []))

    def check_visual(self, visual_manifest: dict, visual_path, same_checkpoint: bool = True) -> None:
        """Refuse a visual artifact that does not belong to this LLM artifact (`same_checkpoint=False` lets a
        parity check measure a visual artifact from another checkpoint of the same shape)."""
        from ...errors import VlmcError

        problems = []
        if visual_manifest.get("hidden_size") != self.manifest["hidden_size"]:
            problems.append(f"visual hidden size {visual_manifest.get('hidden_size')} != LLM hidden size "
                            f"{self.manifest['hidden_size']}")
        if visual_manifest.get("arch") != self.manifest["arch"]:
            problems.append(f"visual arch {visual_manifest.get('arch')} != LLM arch {self.manifest['arch']}")
        groups = {g["name"]: g["count"] for g in visual_manifest.get("output_groups", [])}
        for extra in self.manifest.get("prefill_extras", []):
            if groups.get(extra["name"]) != extra["count"]:
                problems.append(f"the LLM takes {extra['count']} {extra['name']!r} features per token, the visual "
                                f"graph gives {groups.get(extra['name'], 0)}")
        if same_checkpoint and visual_manifest.get("weights_fingerprint") != self.manifest.get("weights_fingerprint"):
            problems.append("they were compiled from different checkpoints")
        if problems:
            raise VlmcError(f"visual artifact {visual_path} does not belong to LLM artifact {self.path}: "
                            + "; ".join(problems))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    # A dead rank must surface as an error, not as a wait on gloo's 30-minute default.
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))


class DistributedEngine:
    """Rank 0's view of a tensor-parallel engine: each call is broadcast to the worker ranks, which run the
    same engine operation on their shard (their own graphs and KV cache), then rank 0 runs it locally."""

    def __init__(self, artifact: LLMArtifact, device: str = "cpu", slots: int | None = None):
        self.artifact = artifact
        self.world = artifact.tp
        self.workers = []
        if self.world > 1 and device != "cpu":
            from ...errors import VlmcError

            # The packed all-reduce is torch.distributed over gloo on host memory (no GPU collective yet).
            raise VlmcError(f"{artifact.path} has tp={self.world}; tensor parallelism runs on the CPU only")
        if self.world > 1:
            port = free_port()
            ctx = multiprocessing.get_context("spawn")
            for rank in range(1, self.world):
                proc = ctx.Process(target=_worker_main, args=(str(artifact.path), rank, self.world, port, device,
                                                               slots), daemon=True)
                proc.start()
                self.workers.append(proc)
            init_process_group(0, self.world, port)
        self.local = artifact.engine(0, device, slots)

    def __getattr__(self, name):  # read-only properties (context, max_prefill, check_budget, cache, ...)
        return getattr(self.local, name)

    def _broadcast(self, op: str, *args) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list([(op, args)], src=0)

    def prefill(self, seq, inputs_embeds, position_ids, extras=None):
        self._broadcast("prefill", seq.slot, seq.rope_delta, inputs_embeds, position_ids, extras)
        return self.local.prefill(seq, inputs_embeds, position_ids, extras)

    def decode(self, seqs, tokens):
        self._broadcast("decode", [(s.slot, s.rope_delta) for s in seqs], list(tokens))
        return self.local.decode(seqs, tokens)

    def release(self, seq):
        self._broadcast("release", seq.slot, seq.rope_delta)
        self.local.release(seq)

    def move(self, seq, slot):
        self._broadcast("move", seq.slot, slot)
        self.local.move(seq, slot)

    def keepalive(self) -> None:
        """Wake the ranks: an idle rank waits in a collective, which fails after the group timeout (120 s)."""
        self._broadcast("ping")

    def close(self) -> None:
        if self.world > 1 and self.workers:
            import torch.distributed as dist

            self._broadcast("stop")
            for proc in self.workers:
                proc.join(timeout=30)
            self.workers = []
            dist.destroy_process_group()


def _worker_main(path: str, rank: int, world: int, port: int, device: str, slots) -> None:
    import signal

    import torch.distributed as dist

    # Ctrl-C reaches the whole process group; rank 0 decides when to stop (a server drains its requests first).
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from .engine import Sequence

    init_process_group(rank, world, port)
    engine = LLMArtifact(path, verify=False).engine(rank, device, slots)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        op, args = box[0]
        if op == "stop":
            break
        if op == "prefill":
            slot, delta, embeds, positions, extras = args
            engine.prefill(Sequence(slot, delta), embeds, positions, extras)
        elif op == "decode":
            pairs, tokens = args
            engine.decode([Sequence(slot, delta) for slot, delta in pairs], tokens)
        elif op == "release":
            engine.release(Sequence(*args))
        elif op == "move":
            source, target = args
            engine.move(Sequence(source, 0), target)
        # "ping" (keepalive) needs nothing done
    dist.destroy_process_group()
