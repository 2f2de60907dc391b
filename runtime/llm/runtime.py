"""LLM runtime: load an LLM artifact and run its graphs on one rank, or on tp rank processes.

Rank 0 drives: it runs the host ops, computes every step's inputs and broadcasts them; each rank runs the same
compiled graph on its parameter shard and keeps the KV cache of its own heads; the graph's all-reduce goes
through torch.distributed. With tp = 1 there are no other processes.

Ranks may span hosts (a Cluster): node n runs ranks [n * tp / nnodes, (n + 1) * tp / nnodes); rank 0, on node 0,
hosts the rendezvous store at the master address and port. Each time rank 0 starts a group it names a new
generation in the store; the ranks of other nodes (host_ranks) join the generation they find there, and after a
failure wait for the next one, so a restarted rank 0 and the other nodes' restarted ranks meet again.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import socket
import time
import uuid
from pathlib import Path

from ..artifact import check_device, load_library, load_params, read_manifest
from ..cpu_ops.embedding import EmbeddingTable
from ..cpu_ops.pipeline import HostSpec
from .cluster import Cluster
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


log = logging.getLogger("vlmc.ranks")
GROUP_TIMEOUT_S = 120  # a dead rank surfaces as an error after this, not after gloo's 30-minute default
STALE_EXIT = 3  # a rank found the generation it must not join (the failed one) and should retry later


def join_group(rank: int, world: int, addr: str, port: int, generation: str | None = None, skip: str | None = None,
               backend: str = "gloo") -> str:
    """Join the process group: rank 0 hosts the store and names `generation`; the others wait for the store and
    join the generation it names (exit STALE_EXIT if it is `skip`, the one that failed). Returns the generation."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    store = dist.TCPStore(addr, port, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    if rank == 0:
        store.set("vlmc_generation", generation)
    else:
        generation = store.get("vlmc_generation").decode()
        if generation == skip:
            raise SystemExit(STALE_EXIT)
    dist.init_process_group(backend, store=dist.PrefixStore(generation, store), rank=rank, world_size=world,
                            timeout=timeout)
    return generation


class DistributedEngine:
    """Rank 0's view of a tensor-parallel engine: each call is broadcast to the worker ranks, which run the
    same engine operation on their shard (their own graphs and KV cache), then rank 0 runs it locally."""

    def __init__(self, artifact: LLMArtifact, device: str = "cpu", slots: int | None = None,
                 cluster: Cluster = Cluster()):
        from ...errors import VlmcError

        self.artifact = artifact
        self.world = artifact.tp
        self.cluster = cluster
        self.workers = []
        self.closed = False
        if cluster.node_rank != 0:
            raise VlmcError("rank 0 runs on node 0; other nodes run their ranks with host_ranks")
        if self.world > 1 and device != "cpu":
            # The packed all-reduce is torch.distributed over gloo on host memory (no GPU collective yet).
            raise VlmcError(f"{artifact.path} has tp={self.world}; tensor parallelism runs on the CPU only")
        local = cluster.ranks(self.world)
        if self.world > 1:
            port = cluster.master_port or free_port()
            generation = uuid.uuid4().hex
            ctx = multiprocessing.get_context("spawn")
            for rank in local[1:]:
                proc = ctx.Process(target=_worker_main, args=(str(artifact.path), rank, self.world,
                                                               cluster.master_addr, port, device, slots),
                                   daemon=True)
                proc.start()
                self.workers.append(proc)
            join_group(0, self.world, cluster.master_addr, port, generation)
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

    def reserve(self, seq, length):
        self._broadcast("reserve", seq.slot, length)
        self.local.reserve(seq, length)

    def move(self, seq, slot):
        self._broadcast("move", seq.slot, slot)
        self.local.move(seq, slot)

    def keepalive(self) -> None:
        """Wake the ranks: an idle rank waits in a collective, which fails after the group timeout (120 s)."""
        self._broadcast("ping")

    def close(self) -> None:
        if self.world > 1 and not self.closed:  # (rank 0 may be node 0's only rank: no local workers)
            import torch.distributed as dist

            self.closed = True
            self._broadcast("stop")
            for proc in self.workers:
                proc.join(timeout=30)
            self.workers = []
            dist.destroy_process_group()


def _worker_main(path: str, rank: int, world: int, addr: str, port: int, device: str, slots, skip=None,
                 joined=None) -> None:
    import signal

    import torch.distributed as dist

    # Ctrl-C reaches the whole process group; rank 0 decides when to stop (a server drains its requests first).
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from .engine import Sequence

    try:
        generation = join_group(rank, world, addr, port, skip=skip)
    except (RuntimeError, TimeoutError) as exc:  # no rank 0 within the group timeout (host_ranks tries again)
        log.error("rank %d: could not join the group at %s:%d: %s", rank, addr, port, str(exc).splitlines()[0])
        raise SystemExit(1) from None
    if joined is not None:
        joined.put(generation)
    engine = LLMArtifact(path, verify=False).engine(rank, device, slots)
    while True:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as exc:  # rank 0 or another rank went away: one line, not a traceback
            log.error("rank %d: the group failed: %s", rank, str(exc).splitlines()[0][:300])
            raise SystemExit(1) from None
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
        elif op == "reserve":
            slot, length = args
            engine.reserve(Sequence(slot, 0), length)
        # "ping" (keepalive) needs nothing done
    dist.destroy_process_group()


def host_ranks(path: str, cluster: Cluster, device: str = "cpu", rejoin: bool = True, verify: bool = False) -> int:
    """Run this node's ranks of the group rank 0 (on node 0) drives. They exit when rank 0 says stop (returns 0).
    When one fails (a rank died here or elsewhere, or rank 0's process went away), the others are stopped and all
    start again, waiting for rank 0's next generation (`rejoin`; a server's LLM worker is restarted) or not (returns
    1: a one-off `vlmc generate`)."""
    import queue

    artifact = LLMArtifact(path, verify=verify)
    ranks = cluster.ranks(artifact.tp)  # a layout the tp does not divide over is a one-line error
    ctx = multiprocessing.get_context("spawn")
    failed = None  # the generation that failed: not joined again
    while True:
        joined = ctx.Queue()
        procs = [ctx.Process(target=_worker_main, args=(path, rank, artifact.tp, cluster.master_addr,
                                                         cluster.master_port, device, None, failed, joined),
                             name=f"vlmc-rank-{rank}") for rank in ranks]
        for proc in procs:
            proc.start()
        log.warning("node %d: ranks %d-%d of tp=%d (pids %s), joining %s:%d", cluster.node_rank, ranks[0],
                    ranks[-1], artifact.tp, [p.pid for p in procs], cluster.master_addr, cluster.master_port)
        generation = None
        try:
            while all(p.exitcode is None for p in procs):
                time.sleep(0.2)
                with contextlib.suppress(queue.Empty):
                    generation = joined.get_nowait()
            first = next(p for p in procs if p.exitcode is not None)
            for proc in procs:  # told to stop, the others follow; after a failure they are stopped
                proc.join(timeout=10 if first.exitcode == 0 else 0.5)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return 0
        if not rejoin and STALE_EXIT not in codes:
            log.error("node %d: ranks exited with %s", cluster.node_rank, codes)
            return 1
        if STALE_EXIT not in codes:
            log.warning("node %d: ranks exited with %s; waiting for rank 0's next group", cluster.node_rank, codes)
        failed = generation or failed
        time.sleep(1.0)
