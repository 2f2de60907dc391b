"""The visual and LLM worker processes.

visual worker: PULL requests from HTTP -> encode images -> PUSH (bounded by HWM: a flood of images blocks here
instead of filling memory) to the LLM worker.
LLM worker: a scheduler loop. Between decode steps it admits waiting requests into free cache slots and prefills
them; then one decode step runs for ALL slots together (idle slots get a dummy token and are reset afterwards),
and every token is PUSHed back to HTTP. Encoding in the visual process overlaps this loop.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import zmq

QUEUE_HWM = 64  # messages queued per socket before senders block (back-pressure)
log = logging.getLogger("vlmc.serve")


def _socket(ctx, kind, address, bind=False):
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.SNDHWM, QUEUE_HWM)
    sock.setsockopt(zmq.RCVHWM, QUEUE_HWM)
    sock.setsockopt(zmq.LINGER, 0)
    (sock.bind if bind else sock.connect)(address)
    return sock


def visual_main(vit_model: str, requests_addr: str, llm_addr: str, results_addr: str, min_pixels, max_pixels,
                ready) -> None:
    from ..visual.runtime import VisualRuntime

    visual = VisualRuntime(vit_model, verify=False)  # the HTTP process checked the artifact's hashes
    cfg = visual.image_config(min_pixels, max_pixels)
    ctx = zmq.Context()
    inbox = _socket(ctx, zmq.PULL, requests_addr)
    to_llm = _socket(ctx, zmq.PUSH, llm_addr)
    results = _socket(ctx, zmq.PUSH, results_addr)
    ready.set()
    while True:
        req = inbox.recv_pyobj()
        if req is None:
            break
        try:
            t0 = time.perf_counter()
            embeds, grids = [], []
            for image in req["images"]:
                pixels, grid, _ = visual.patches(image, cfg)
                embeds.append(visual.encode_patches(pixels, grid))
                grids.append([int(g) for g in grid])
            req.update(images=None, image_embeds=embeds, grids=grids, visual_s=time.perf_counter() - t0)
            to_llm.send_pyobj(req)
        except Exception as exc:  # one bad image must not stop the worker
            results.send_pyobj({"id": req["id"], "error": f"image could not be encoded: {exc}", "status": 400})


@dataclass
class Running:
    id: str
    seq: object
    sampler: object
    max_tokens: int
    prompt_tokens: int
    tokens: list = field(default_factory=list)
    logits: np.ndarray | None = None


def llm_main(model: str, llm_addr: str, results_addr: str, batch_size, ready) -> None:
    from ..cpu_ops.prompt import tokenize_prompt
    from ..cpu_ops.rope import get_rope_index
    from ..cpu_ops.sampling import Sampler, SamplingParams
    from ..llm.engine import BudgetError, Sequence, splice_image_embeddings
    from ..llm.runtime import DistributedEngine, LLMArtifact

    artifact = LLMArtifact(model, verify=False)  # the HTTP process checked the artifact's hashes
    tokenizer = artifact.tokenizer()
    spec = artifact.spec
    engine = DistributedEngine(artifact)  # one cache slot per row of the compiled decode batch
    slots = int(artifact.manifest["batch_size"])
    usable = min(batch_size or slots, slots)
    ctx = zmq.Context()
    inbox = _socket(ctx, zmq.PULL, llm_addr, bind=True)
    results = _socket(ctx, zmq.PUSH, results_addr)
    image_id, merge = spec.text.image_token_id, spec.image.merge_size
    running: dict[int, Running] = {}
    ready.set()

    def admit(req) -> None:
        slot = next(s for s in range(usable) if s not in running)
        try:
            ids = tokenize_prompt(tokenizer, "", req["grids"], image_id, merge, req["messages"])
            max_tokens = req["max_tokens"] if req["max_tokens"] is not None else engine.context - len(ids)
            engine.check_budget(len(ids), max(max_tokens, 1))
        except (BudgetError, ValueError) as exc:
            results.send_pyobj({"id": req["id"], "error": str(exc), "status": 400})
            return
        positions, delta = get_rope_index(ids, np.asarray(req["grids"], np.int64).reshape(-1, 3), image_id, merge)
        embeds = splice_image_embeddings(engine.embed.lookup(ids), ids, image_id, req["image_embeds"])
        params = SamplingParams(**req["sampling"], eos_token_ids=spec.text.eos_token_ids)
        run = Running(req["id"], Sequence(slot, delta), Sampler(params), max_tokens, len(ids))
        run.logits = engine.prefill(run.seq, embeds, positions)
        running[slot] = run
        results.send_pyobj({"id": run.id, "started": True, "prompt_tokens": run.prompt_tokens})

    def finish(slot: int, reason: str) -> None:
        run = running.pop(slot)
        engine.release(run.seq)
        results.send_pyobj({"id": run.id, "done": True, "finish_reason": reason,
                            "prompt_tokens": run.prompt_tokens, "completion_tokens": len(run.tokens)})

    while True:
        # Block for work only when nothing is decoding; otherwise just drain what is already waiting.
        while len(running) < usable and (inbox.poll(0 if running else None)):
            req = inbox.recv_pyobj()
            if req is None:
                engine.close()
                return
            if req.get("cancel"):
                for slot, run in list(running.items()):
                    if run.id == req["cancel"]:
                        finish(slot, "abort")
                continue
            try:
                admit(req)
            except Exception as exc:
                log.error("prefill failed: %s", traceback.format_exc())
                results.send_pyobj({"id": req["id"], "error": f"prefill failed: {exc}", "status": 500})
        if not running:
            continue
        # Sample each sequence's next token from its last logits; retire those that are finished.
        for slot, run in list(running.items()):
            token = run.sampler(run.logits, len(run.tokens))
            if run.sampler.is_eos(token):
                finish(slot, "stop")
                continue
            run.tokens.append(token)
            results.send_pyobj({"id": run.id, "token": token})
            if len(run.tokens) >= run.max_tokens:
                finish(slot, "length")
        if not running:
            continue
        # One decode step over every compiled batch row; idle rows decode a dummy token and are reset after.
        seqs = [running[s].seq if s in running else Sequence(s, 0) for s in range(slots)]
        tokens = [running[s].tokens[-1] if s in running else 0 for s in range(slots)]
        results.send_pyobj({"batch": len(running)})
        logits = engine.decode(seqs, tokens)
        for s in range(slots):
            if s in running:
                running[s].logits = logits[s]
            else:
                engine.release(seqs[s])
