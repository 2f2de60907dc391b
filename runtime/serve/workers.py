"""The visual and LLM worker processes.

visual worker: PULL requests from HTTP -> decode and encode images and videos (or take them from the embedding
cache) -> PUSH (bounded
by HWM: a flood of images blocks here instead of filling memory) to the LLM worker.
LLM worker: a scheduler loop. Between decode steps it admits waiting requests into free cache slots and prefills
them; then one decode step runs for all running sequences together, through the smallest compiled decode batch
that holds them (running sequences are kept in slots 0..n-1: when one finishes, the last moves into its slot),
and every token is PUSHed back to HTTP. Encoding in the visual process overlaps this loop. Cancellations arrive
on a separate control socket so that they are read even when every slot is busy.

Both workers report their pids (and the LLM worker its TP ranks' pids) through `info` once ready; the HTTP
process supervises them (see server.Engine) and restarts a dead one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import zmq

QUEUE_HWM = 64  # messages queued per socket before senders block (back-pressure)
POLL_MS = 1000  # idle workers wake this often to notice that the HTTP process is gone
KEEPALIVE_S = 20  # an idle LLM worker pings its TP ranks this often (well inside their 120 s collective timeout)
log = logging.getLogger("vlmc.serve")


def _socket(ctx, kind, address, bind=False):
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.SNDHWM, QUEUE_HWM)
    sock.setsockopt(zmq.RCVHWM, QUEUE_HWM)
    sock.setsockopt(zmq.LINGER, 0)
    (sock.bind if bind else sock.connect)(address)
    return sock


def _worker_signals() -> None:
    # Ctrl-C reaches the whole process group; the HTTP process drains requests first and then stops us itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class EmbeddingCache:
    """LRU of an image's visual outputs (embeddings and any other output groups) keyed by the decoded pixels plus
    the resize settings (a video's by its bytes plus its sampling), bounded by bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[str, tuple[dict[str, np.ndarray], object]] = OrderedDict()

    @staticmethod
    def key(image, settings: tuple) -> str:
        h = hashlib.blake2b(digest_size=20)
        h.update(repr((image.mode, image.size, settings)).encode())
        h.update(image.tobytes())
        return h.hexdigest()

    @staticmethod
    def video_key(data: bytes, request, settings: tuple) -> str:
        h = hashlib.blake2b(digest_size=20)
        h.update(repr(("video", request, settings)).encode())
        h.update(data)
        return h.hexdigest()

    def get(self, key: str):
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
        return hit

    @staticmethod
    def _size(outputs: dict[str, np.ndarray]) -> int:
        return sum(a.nbytes for a in outputs.values())

    def put(self, key: str, outputs: dict[str, np.ndarray], grid) -> None:
        """`grid`: what the LLM needs besides the outputs (an image's grid; a video's VideoLayout)."""
        if self._size(outputs) > self.max_bytes:
            return  # also covers max_bytes == 0 (cache disabled)
        self.entries[key] = (outputs, grid)
        self.bytes += self._size(outputs)
        while self.bytes > self.max_bytes:
            _, (old, _) = self.entries.popitem(last=False)
            self.bytes -= self._size(old)


def visual_main(vit_model: str, requests_addr: str, llm_addr: str, results_addr: str, min_pixels, max_pixels,
                cache_mb: int, info) -> None:
    from ..cpu_ops.video import VideoInputError
    from ..visual.runtime import VisualRuntime

    _worker_signals()
    parent = os.getppid()
    visual = VisualRuntime(vit_model, verify=False)  # quick checks: the HTTP process checked it (in full with --verify)
    cfg = visual.image_config(min_pixels, max_pixels)
    settings = (repr(cfg.to_dict()), visual.budget)  # what the resize depends on besides the pixels
    cache = EmbeddingCache(int(cache_mb) * 2**20)
    ctx = zmq.Context()
    inbox = _socket(ctx, zmq.PULL, requests_addr)
    to_llm = _socket(ctx, zmq.PUSH, llm_addr)
    results = _socket(ctx, zmq.PUSH, results_addr)
    def encode_image(image):
        pixels, grid, _ = visual.prepare(image, cfg)
        return visual.encode_outputs(pixels, grid), [int(g) for g in grid]

    def encode_video(video):
        prepared = visual.prepare_video(video["data"], video["request"])
        outputs, _ = visual.encode_video(prepared)
        return outputs, prepared.layout

    def encode_cached(items, key_of, encode):
        """Each item's embeddings, other output groups and what the LLM needs besides (grid, timing), from the
        cache or `encode`; and how many came from the cache."""
        embeds, extras, metas, hits = [], [], [], 0
        for item in items:
            key = key_of(item)
            cached = cache.get(key)
            if cached is None:
                cached = encode(item)
                cache.put(key, *cached)
            else:
                hits += 1
            embeds.append(cached[0]["embeddings"])
            extras.append({k: v for k, v in cached[0].items() if k != "embeddings"})
            metas.append(cached[1])
        return embeds, extras, metas, hits

    info.send({"pid": os.getpid()})
    while True:
        if not inbox.poll(POLL_MS):
            if os.getppid() != parent:
                return  # orphaned: the HTTP process is gone
            continue
        req = inbox.recv_pyobj()
        if req is None:
            break
        try:
            t0 = time.perf_counter()
            embeds, extras, grids, image_hits = encode_cached(
                req["images"], lambda image: EmbeddingCache.key(image, settings), encode_image)
            video_embeds, video_extras, videos, video_hits = encode_cached(
                req.get("videos") or (), lambda v: EmbeddingCache.video_key(v["data"], v["request"], settings),
                encode_video)
            hits = image_hits + video_hits
            seconds = time.perf_counter() - t0
            req.update(images=None, image_embeds=embeds, image_extras=extras, grids=grids, visual_s=seconds,
                       videos=videos, video_embeds=video_embeds, video_extras=video_extras)
            if embeds or videos:
                results.send_pyobj({"stats": "visual", "seconds": seconds, "hits": hits,
                                    "misses": len(embeds) + len(videos) - hits, "cache_bytes": cache.bytes})
            to_llm.send_pyobj(req)
        except VideoInputError as exc:
            results.send_pyobj({"id": req["id"], "error": str(exc), "status": 400, "code": "invalid_video"})
        except Exception as exc:  # one bad image must not stop the worker
            results.send_pyobj({"id": req["id"], "error": f"image could not be encoded: {exc}", "status": 400,
                                "code": "invalid_image"})


@dataclass
class Running:
    id: str
    seq: object
    sampler: object
    max_tokens: int
    prompt_tokens: int
    tokens: list = field(default_factory=list)
    logits: np.ndarray | None = None


def llm_main(model: str, llm_addr: str, control_addr: str, results_addr: str, batch_size, max_prompt_tokens,
             cluster, epoch: int, info) -> None:
    from ..cpu_ops.sampling import Sampler, SamplingParams
    from ..llm.engine import BudgetError, Sequence, splice_image_embeddings
    from ..llm.pipeline import prompt_extras
    from ..llm.runtime import DistributedEngine, LLMArtifact

    _worker_signals()
    parent = os.getppid()
    artifact = LLMArtifact(model, verify=False)  # quick checks: the HTTP process checked it (in full with --verify)
    tokenizer = artifact.tokenizer()
    spec = artifact.spec
    engine = DistributedEngine(artifact, cluster=cluster)  # a cache slot per row of the largest decode batch
    # Idle ranks wait in a collective: pinged well inside its timeout, and often with ranks on other hosts, so that
    # one that died there is noticed (and the LLM worker restarted) within seconds.
    keepalive_s = KEEPALIVE_S if cluster.nnodes == 1 else 2.0
    slots = int(artifact.manifest["batch_size"])
    usable = min(batch_size or slots, slots)
    ctx = zmq.Context()
    inbox = _socket(ctx, zmq.PULL, llm_addr, bind=True)
    control = _socket(ctx, zmq.PULL, control_addr, bind=True)
    results = _socket(ctx, zmq.PUSH, results_addr)
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    poller.register(control, zmq.POLLIN)
    image_id = spec.text.image_token_id
    running: dict[int, Running] = {}  # by cache slot: always slots 0..len(running)-1
    # Ids cancelled before their request got here (client gone while its image was encoding, or failed by the
    # HTTP process after the visual worker died): dropped on arrival. Bounded; old entries fall off.
    cancelled: OrderedDict[str, bool] = OrderedDict()
    info.send({"pid": os.getpid(), "ranks": [p.pid for p in engine.workers]})

    def admit(req) -> None:
        slot = len(running)
        try:
            videos = req.get("videos") or []  # VideoLayouts, from the visual worker
            ids, positions, delta = spec.prompt(tokenizer, "", req["grids"], req["messages"], videos)
            if max_prompt_tokens and len(ids) > max_prompt_tokens:
                raise BudgetError(f"the prompt has {len(ids)} tokens (text, images and videos), more than the "
                                  f"limit of {max_prompt_tokens} (--max-prompt-tokens)")
            max_tokens = req["max_tokens"] if req["max_tokens"] is not None else engine.context - len(ids)
            engine.check_budget(len(ids), max(max_tokens, 1))
        except (BudgetError, ValueError) as exc:
            code = "context_length_exceeded" if isinstance(exc, BudgetError) else "invalid_request"
            results.send_pyobj({"id": req["id"], "error": str(exc), "status": 400, "code": code})
            return
        embeds = splice_image_embeddings(engine.embed.lookup(ids), ids, image_id, req["image_embeds"])
        if videos:
            embeds = splice_image_embeddings(embeds, ids, spec.text.video_token_id, req["video_embeds"])
        params = SamplingParams(**req["sampling"], eos_token_ids=spec.text.eos_token_ids)
        run = Running(req["id"], Sequence(slot, delta), Sampler(params), max_tokens, len(ids))
        extras = prompt_extras(engine.prefill_extras, ids, image_id, req.get("image_extras", []),
                               spec.text.hidden_size, spec.text.video_token_id, req.get("video_extras", []))
        run.logits = engine.prefill(run.seq, embeds, positions, extras)
        running[slot] = run
        results.send_pyobj({"id": run.id, "started": True, "prompt_tokens": run.prompt_tokens})

    def finish(run: Running, reason: str, cancel_reason: str | None = None) -> None:
        slot = run.seq.slot
        del running[slot]
        engine.release(run.seq)
        last = len(running)
        if slot < last:  # keep the running sequences in consecutive slots
            moved = running.pop(last)
            engine.move(moved.seq, slot)
            running[slot] = moved
        results.send_pyobj({"id": run.id, "done": True, "finish_reason": reason, "cancel_reason": cancel_reason,
                            "prompt_tokens": run.prompt_tokens, "completion_tokens": len(run.tokens)})

    def read_control() -> bool:
        """Apply pending cancellations; False when told to stop."""
        while control.poll(0):
            msg = control.recv_pyobj()
            if msg.get("stop"):
                return False
            run = next((run for run in running.values() if run.id == msg["cancel"]), None)
            if run is not None:
                finish(run, "abort", msg.get("reason"))
            else:
                cancelled[msg["cancel"]] = True
                while len(cancelled) > 4096:
                    cancelled.popitem(last=False)
        return True

    busy = False  # whether the last report said sequences were running (so an idle 0 is sent once)
    last_step = time.monotonic()
    while True:
        if not running:
            # Block for work only when nothing is decoding; wake now and then to notice an orphaned worker.
            if busy:
                results.send_pyobj({"batch": 0})
                busy = False
            if not poller.poll(POLL_MS):
                if os.getppid() != parent:
                    engine.close()
                    return
                if time.monotonic() - last_step > keepalive_s:
                    engine.keepalive()
                    last_step = time.monotonic()
                continue
        if not read_control():
            break
        while len(running) < usable and inbox.poll(0):
            req = inbox.recv_pyobj()
            if req is None:
                engine.close()
                return
            if req.get("epoch", epoch) < epoch or cancelled.pop(req["id"], None):
                continue  # already failed or cancelled on the HTTP side
            try:
                admit(req)
            except Exception as exc:
                log.error("prefill failed: %s", traceback.format_exc())
                results.send_pyobj({"id": req["id"], "error": f"prefill failed: {exc}", "status": 500,
                                    "code": "internal_error"})
                if engine.world > 1:
                    raise  # the ranks may be out of step now; let the HTTP process restart us cleanly
        if not running:
            continue
        # Sample each sequence's next token from its last logits; retire those that are finished.
        for run in list(running.values()):
            token = run.sampler(run.logits, len(run.tokens))
            if run.sampler.is_eos(token):
                finish(run, "stop")
                continue
            run.tokens.append(token)
            results.send_pyobj({"id": run.id, "token": token})
            if len(run.tokens) >= run.max_tokens:
                finish(run, "length")
        if not running:
            continue
        # One decode step over the running sequences (slots 0..n-1), in the smallest decode graph that holds them.
        batch = [running[s] for s in range(len(running))]
        results.send_pyobj({"batch": len(batch), "graph_batch": engine.decode_batch(len(batch))})
        busy = True
        last_step = time.monotonic()
        logits = engine.decode([run.seq for run in batch], [run.tokens[-1] for run in batch])
        for run, row in zip(batch, logits):
            run.logits = row
    engine.close()
