"""The HTTP process: FastAPI app, worker processes, and the dispatcher that routes worker results to requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import signal
import tempfile
import time
import uuid
from pathlib import Path

import zmq
import zmq.asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .protocol import ApiError, convert_messages, sampling_params, stop_strings
from .workers import QUEUE_HWM, llm_main, visual_main

log = logging.getLogger("vlmc.serve")


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("vlmc_requests", "finished requests by HTTP status", ["status"],
                                registry=self.registry)
        self.ttft = Histogram("vlmc_time_to_first_token_seconds", "time to first token", registry=self.registry)
        self.per_token = Histogram("vlmc_time_per_output_token_seconds", "decode time per output token",
                                   buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=self.registry)
        self.queue_depth = Gauge("vlmc_queue_depth", "requests accepted and not yet prefilled", registry=self.registry)
        self.batch = Gauge("vlmc_running_batch_size", "sequences in the last decode step", registry=self.registry)
        self.max_batch = Gauge("vlmc_max_running_batch_size", "largest decode batch so far", registry=self.registry)
        self.visual_s = Histogram("vlmc_visual_encode_seconds", "visual encode time per request",
                                  registry=self.registry)
        self.tokens_in = Counter("vlmc_prompt_tokens", "prompt tokens", registry=self.registry)
        self.tokens_out = Counter("vlmc_generation_tokens", "generated tokens", registry=self.registry)


class Engine:
    """HTTP-side handle on the workers: submit a request, get an asyncio queue of its events."""

    def __init__(self, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="vlmc-serve-")
        addr = {n: f"ipc://{self.dir}/{n}" for n in ("visual", "llm", "results")}
        self.addr = addr
        self.zctx = zmq.asyncio.Context()
        self.results = self.zctx.socket(zmq.PULL)
        self.results.bind(addr["results"])
        self.to_visual = self.zctx.socket(zmq.PUSH)
        self.to_visual.setsockopt(zmq.SNDHWM, QUEUE_HWM)
        self.to_visual.bind(addr["visual"])
        mp = multiprocessing.get_context("spawn")
        ready_v, ready_l = mp.Event(), mp.Event()
        self.procs = [
            mp.Process(target=llm_main, args=(args.model, addr["llm"], addr["results"], args.batch_size, ready_l),
                       daemon=True, name="vlmc-llm"),
            mp.Process(target=visual_main, args=(args.vit_model, addr["visual"], addr["llm"], addr["results"],
                                                 args.min_pixels, args.max_pixels, ready_v),
                       daemon=True, name="vlmc-visual"),
        ]
        for p in self.procs:
            p.start()
        for ev, p in ((ready_l, self.procs[0]), (ready_v, self.procs[1])):
            while not ev.wait(1):
                if not p.is_alive():
                    raise RuntimeError(f"the {p.name} worker failed to start (exit {p.exitcode})")
        self.to_llm = self.zctx.socket(zmq.PUSH)  # cancellations go straight to the scheduler
        self.to_llm.connect(addr["llm"])
        self.queues: dict[str, asyncio.Queue] = {}
        self.metrics = Metrics()

    def healthy(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    async def dispatch(self) -> None:
        while True:
            msg = await self.results.recv_pyobj()
            if "batch" in msg:
                self.metrics.batch.set(msg["batch"])
                if msg["batch"] > self.metrics.max_batch._value.get():
                    self.metrics.max_batch.set(msg["batch"])
                continue
            queue = self.queues.get(msg["id"])
            if queue is not None:
                queue.put_nowait(msg)

    async def submit(self, request_id: str, messages, images, max_tokens, sampling) -> asyncio.Queue:
        queue = asyncio.Queue()
        self.queues[request_id] = queue
        await self.to_visual.send_pyobj({"id": request_id, "messages": messages, "images": images,
                                         "max_tokens": max_tokens, "sampling": sampling})
        return queue

    async def cancel(self, request_id: str) -> None:
        self.queues.pop(request_id, None)
        await self.to_llm.send_pyobj({"cancel": request_id})

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(timeout=10)
        self.zctx.destroy(linger=0)


def error_response(exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)


def build_app(args, tokenizer, context: int):
    from prometheus_client import generate_latest

    model_name = args.served_model_name or Path(args.model).name
    state = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Workers start with the app (not at import) so that uvicorn's port is bound by a process that is ready.
        state["engine"] = engine = Engine(args)
        state["dispatcher"] = asyncio.create_task(engine.dispatch())
        try:
            yield
        finally:
            state["dispatcher"].cancel()
            engine.close()

    app = FastAPI(title="vlmc", version="0.1.0", lifespan=lifespan)

    def check_key(request: Request):
        if args.api_key and request.headers.get("authorization") != f"Bearer {args.api_key}":
            raise ApiError("invalid API key", 401, "invalid_api_key", "authentication_error")

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return error_response(exc)

    @app.get("/health")
    async def health():
        ok = state["engine"].healthy()
        return JSONResponse({"status": "ok" if ok else "worker down"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state["engine"].metrics.registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "vlmc",
                                            "max_model_len": context}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        engine: Engine = state["engine"]
        m = engine.metrics
        t0 = time.perf_counter()
        try:
            check_key(request)
            try:
                body = json.loads(await request.body())
            except ValueError:
                raise ApiError("the request body is not valid JSON", code="invalid_json") from None
            if not isinstance(body, dict):
                raise ApiError("the request body must be a JSON object", code="invalid_json")
            messages, images = convert_messages(body.get("messages"), args.allowed_local_media_path)
            sampling = sampling_params(body)
            stops = stop_strings(body)
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
                raise ApiError("`max_tokens` must be a positive integer", code="invalid_parameter")
            if max_tokens is not None and max_tokens >= context:
                raise ApiError(f"max_tokens ({max_tokens}) must be less than the compiled context of {context}",
                               code="context_length_exceeded")
        except ApiError as exc:
            m.requests.labels(str(exc.status)).inc()
            return error_response(exc)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        stream = bool(body.get("stream"))
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        m.queue_depth.inc()
        queue = await engine.submit(request_id, messages, images, max_tokens, sampling)
        first = await next_event(engine, queue)
        m.queue_depth.dec()
        if "error" in first:
            engine.queues.pop(request_id, None)
            exc = ApiError(first["error"], first.get("status", 500),
                           "context_length_exceeded" if first.get("status") == 400 else "internal_error",
                           "invalid_request_error" if first.get("status") == 400 else "server_error")
            m.requests.labels(str(exc.status)).inc()
            return error_response(exc)
        prompt_tokens = first["prompt_tokens"]
        created = int(time.time())
        timing = {"first": None}

        async def tokens():
            """Yields (new text, finish_reason or None); detokenizes incrementally and applies `stop`."""
            ids, sent, reason = [], "", None
            while reason is None:
                ev = await next_event(engine, queue)
                if "error" in ev:
                    raise RuntimeError(ev["error"])
                if "token" in ev:
                    if timing["first"] is None:
                        timing["first"] = time.perf_counter()
                        m.ttft.observe(timing["first"] - t0)
                    ids.append(ev["token"])
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    if text.endswith("\ufffd"):
                        continue  # an incomplete UTF-8 character: wait for the rest
                    hit = min((text.find(s, max(0, len(sent) - len(s))) for s in stops
                               if text.find(s, max(0, len(sent) - len(s))) >= 0), default=-1)
                    if hit >= 0:
                        text, reason = text[:hit], "stop"
                        await engine.cancel(request_id)
                    if len(text) > len(sent):
                        yield text[len(sent):], None
                        sent = text
                elif ev.get("done"):
                    reason = ev["finish_reason"]
            timing["completion"] = len(ids)
            yield "", reason

        def finished(status: int):
            engine.queues.pop(request_id, None)
            total = time.perf_counter() - t0
            out = timing.get("completion", 0)
            ttft = (timing["first"] - t0) if timing["first"] else total
            if out > 1:
                m.per_token.observe((total - ttft) / (out - 1))
            m.requests.labels(str(status)).inc()
            m.tokens_in.inc(prompt_tokens)
            m.tokens_out.inc(out)
            log.warning("request %s: %d tokens in, %d out, ttft %.3fs, total %.3fs, status %d",
                        request_id, prompt_tokens, out, ttft, total, status)

        def usage():
            out = timing.get("completion", 0)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}

        if not stream:
            parts, reason = [], None
            try:
                async for text, reason in tokens():
                    parts.append(text)
            except RuntimeError as exc:
                finished(500)
                return error_response(ApiError(str(exc), 500, "internal_error", "server_error"))
            finished(200)
            return {"id": request_id, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                 "finish_reason": reason}], "usage": usage()}

        def chunk(delta, reason=None, with_usage=False):
            data = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            if with_usage:
                data["choices"], data["usage"] = [], usage()
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            status = 200
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for text, reason in tokens():
                    yield chunk({"content": text} if text else {}, reason)
                if include_usage:
                    yield chunk({}, with_usage=True)
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:  # the client went away: free its slot
                status = 499
                await engine.cancel(request_id)
                raise
            except RuntimeError as exc:
                status = 500
                yield f"data: {json.dumps(ApiError(str(exc), 500, 'internal_error', 'server_error').body())}\n\n"
            finally:
                finished(status)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def next_event(engine: Engine, queue: asyncio.Queue) -> dict:
    """The next worker event for a request; an error event if a worker died (so no request hangs)."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if not engine.healthy():
                return {"error": "a worker process died", "status": 503}


def serve(args) -> int:
    import uvicorn

    from ...errors import VlmcError
    from ..llm.runtime import LLMArtifact
    from ..visual.runtime import read_manifest

    llm = LLMArtifact(args.model)
    llm.check_visual(read_manifest(Path(args.vit_model), kind="visual"), args.vit_model)
    compiled = int(llm.manifest["batch_size"])
    if args.batch_size is not None and not 1 <= args.batch_size <= compiled:
        raise VlmcError(f"--batch_size must be between 1 and the LLM artifact's compiled batch of {compiled}")
    logging.getLogger("vlmc.serve").setLevel(logging.INFO)
    app = build_app(args, llm.tokenizer(), int(llm.manifest["context"]))
    log.warning("vlmc serve: %s on http://%s:%d (batch %d)", Path(args.model).name, args.host, args.port,
                args.batch_size or compiled)
    # uvicorn shuts down gracefully on SIGTERM and then re-raises it; a no-op handler makes that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    return 0
