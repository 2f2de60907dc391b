"""The HTTP process: FastAPI app, worker processes, and the dispatcher that routes worker results to requests."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hmac
import json
import logging
import socket
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from ... import __version__
from .openapi import ERRORS, ModelList, add_request_schemas, chat_route_docs
from .protocol import (ApiError, RemoteMedia, RequestLimits, VideoLimits, convert_messages, sampling_params,
                       stop_strings)
from .workers import QUEUE_HWM, llm_main, visual_main

log = logging.getLogger("vlmc.serve")
WEBUI = Path(__file__).parent / "webui"
# The chat page loads only its own files: no inline script, nothing from another origin.
WEBUI_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'",
                 "X-Content-Type-Options": "nosniff"}


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
        self.graph_batch = Histogram("vlmc_decode_graph_batch", "compiled batch of the decode graph each step ran "
                                     "(the smallest decode bucket holding the running sequences)",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.visual_s = Histogram("vlmc_visual_encode_seconds", "visual encode time per request",
                                  registry=self.registry)
        self.tokens_in = Counter("vlmc_prompt_tokens", "prompt tokens", registry=self.registry)
        self.tokens_out = Counter("vlmc_generation_tokens", "generated tokens", registry=self.registry)
        self.cache_hits = Counter("vlmc_image_cache_hits", "images and videos served from the embedding cache",
                                  registry=self.registry)
        self.cache_misses = Counter("vlmc_image_cache_misses", "images and videos run through the visual graph",
                                    registry=self.registry)
        self.cache_bytes = Gauge("vlmc_image_cache_bytes", "bytes held by the image embedding cache",
                                 registry=self.registry)
        self.cancelled = Counter("vlmc_cancelled_requests", "sequences dropped before they finished, by reason "
                                 "(client_disconnect, stop_string, worker_died)", ["reason"], registry=self.registry)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs. A dead grandchild (a TP rank) stays a zombie until its parent reaps it, and
    signal 0 still reaches zombies, so /proc's state is read where there is one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Worker:
    """One supervised worker process: how to start it, its current process and what it reported when ready."""

    START_TIMEOUT = 600  # a real 32B artifact takes minutes to load; a worker stuck longer is restarted

    def __init__(self, name: str, target, args_fn, devices: list[int]):
        self.name, self.target, self.args_fn, self.devices = name, target, args_fn, devices
        self.proc = None
        self.conn = None
        self.info: dict = {}
        self.state = "stopped"  # starting | up | down
        self.restarts = 0
        self.last_exit = None
        self.started_at = 0.0
        self.retry_at = 0.0

    def start(self) -> None:
        mp = multiprocessing.get_context("spawn")
        recv, send = mp.Pipe(duplex=False)
        # Not a daemon: the LLM worker spawns its TP ranks, which daemons may not. Engine.close (and an atexit
        # hook, for paths that skip it) stops the workers; they also exit by themselves if orphaned.
        self.proc = mp.Process(target=self.target, args=(*self.args_fn(), send), name=f"vlmc-{self.name}")
        self.proc.start()
        send.close()
        self.conn, self.info, self.state, self.started_at = recv, {}, "starting", time.monotonic()

    def poll_ready(self) -> bool:
        if self.state == "starting" and self.conn.poll(0):
            try:
                self.info = self.conn.recv()
            except EOFError:  # died before it was ready; alive() reports it
                return False
            self.state = "up"
        return self.state == "up"

    def pids(self) -> list[int]:
        return [p for p in [self.proc.pid if self.proc else None, *self.info.get("ranks", [])] if p]

    def alive(self) -> bool:
        """The process and every TP rank it spawned are running."""
        if self.proc is None or not self.proc.is_alive():
            return False
        return all(pid_alive(pid) for pid in self.info.get("ranks", []))

    def kill(self) -> None:
        for pid in self.info.get("ranks", []):
            kill_pid(pid)
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=10)
            self.last_exit = self.proc.exitcode
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def describe(self) -> dict:
        out = {"state": self.state, "pid": self.proc.pid if self.proc and self.state != "down" else None,
               "restarts": self.restarts, "devices": self.devices}
        if "ranks" in self.info:
            out["rank_pids"] = self.info["ranks"]
        if self.last_exit is not None:
            out["last_exit_code"] = self.last_exit
        return out


@dataclass
class Pending:
    queue: asyncio.Queue
    started: bool = False  # the LLM worker admitted it (its image, if any, is encoded)


class Engine:
    """HTTP-side handle on the workers: submit a request, get an asyncio queue of its events. Also supervises
    the workers: a dead one fails the requests it held (5xx, so nobody hangs) and is restarted."""

    SUPERVISE_S = 0.2

    def __init__(self, args, stopping=lambda: False):
        self.args = args
        self.stopping = stopping  # True once the server is shutting down: no restarts then
        self.dir = tempfile.mkdtemp(prefix="vlmc-serve-")
        addr = {n: f"ipc://{self.dir}/{n}" for n in ("visual", "llm", "control", "results")}
        self.addr = addr
        self.zctx = zmq.asyncio.Context()
        self.results = self.zctx.socket(zmq.PULL)
        self.results.bind(addr["results"])
        self.to_visual = self.zctx.socket(zmq.PUSH)
        self.to_visual.setsockopt(zmq.SNDHWM, QUEUE_HWM)
        self.to_visual.bind(addr["visual"])
        self.epoch = 0  # bumped on every LLM restart; the new LLM worker drops requests stamped earlier
        self.llm = Worker("llm", llm_main, lambda: (args.model, addr["llm"], addr["control"], addr["results"],
                                                    args.batch_size, args.max_prompt_tokens, args.cluster,
                                                    self.epoch),
                          args.llm_devices)
        self.visual = Worker("visual", visual_main,
                             lambda: (args.vit_model, addr["visual"], addr["llm"], addr["results"],
                                      args.min_pixels, args.max_pixels, args.image_cache_mb), args.vit_devices)
        self.workers = [self.llm, self.visual]
        # Runs before multiprocessing's own exit hook, which would otherwise wait forever on live workers.
        atexit.register(self.kill_all)
        try:
            for w in self.workers:
                w.start()
            for w in self.workers:
                while not w.poll_ready():
                    if not w.proc.is_alive():
                        raise RuntimeError(f"the {w.name} worker failed to start (exit {w.proc.exitcode})")
                    w.conn.poll(0.5)
        except BaseException:
            self.kill_all()
            raise
        # Cancellations go straight to the scheduler's control socket. A plain (blocking-API) socket, so that a
        # cancel can be sent from a task that is itself being cancelled (a client that went away).
        self.sync_ctx = zmq.Context()
        self.control = self.sync_ctx.socket(zmq.PUSH)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.SNDHWM, 10000)
        self.control.connect(addr["control"])
        self.pending: dict[str, Pending] = {}
        self.metrics = Metrics()

    def healthy(self) -> bool:
        return all(w.state == "up" for w in self.workers)

    def health(self) -> dict:
        out = {"status": "ok" if self.healthy() else "unavailable",
               "workers": {w.name: w.describe() for w in self.workers}}
        cluster = self.args.cluster
        if cluster.nnodes > 1:  # ranks on other nodes are not watched by pid: a failure there fails a collective
            out["nodes"] = {"nnodes": cluster.nnodes, "master": f"{cluster.master_addr}:{cluster.master_port}"}
        return out

    async def dispatch(self) -> None:
        m = self.metrics
        while True:
            msg = await self.results.recv_pyobj()
            if "batch" in msg:
                m.batch.set(msg["batch"])
                if msg.get("graph_batch"):
                    m.graph_batch.observe(msg["graph_batch"])
                if msg["batch"] > m.max_batch._value.get():
                    m.max_batch.set(msg["batch"])
                continue
            if msg.get("stats") == "visual":
                m.visual_s.observe(msg["seconds"])
                m.cache_hits.inc(msg["hits"])
                m.cache_misses.inc(msg["misses"])
                m.cache_bytes.set(msg["cache_bytes"])
                continue
            if msg.get("cancel_reason"):  # the LLM worker dropped a sequence and freed its slot
                m.cancelled.labels(msg["cancel_reason"]).inc()
            pending = self.pending.get(msg["id"])
            if pending is not None:
                pending.started = pending.started or bool(msg.get("started"))
                pending.queue.put_nowait(msg)

    async def supervise(self) -> None:
        while True:
            await asyncio.sleep(self.SUPERVISE_S)
            if self.stopping():
                return
            for w in self.workers:
                try:
                    self._check(w)
                except Exception:  # the supervisor itself must keep running
                    log.exception("supervising the %s worker failed", w.name)

    def _check(self, w: Worker) -> None:
        now = time.monotonic()
        if w.state == "up" and not w.alive():
            self._on_death(w)
        elif w.state == "starting":
            if w.poll_ready():
                log.warning("the %s worker is back (pid %d)", w.name, w.proc.pid)
            elif not w.alive() or now - w.started_at > w.START_TIMEOUT:
                w.kill()
                log.error("the %s worker did not come back (exit %s); retrying", w.name, w.last_exit)
                w.state, w.retry_at = "down", now + min(30.0, 2.0 ** min(w.restarts, 5))
        if w.state == "down" and now >= w.retry_at:
            w.restarts += 1
            w.start()

    def _on_death(self, w: Worker) -> None:
        w.kill()
        log.error("the %s worker died (exit %s); failing its requests and restarting it", w.name, w.last_exit)
        w.state, w.retry_at = "down", 0.0
        error = {"error": f"the {w.name} worker process died; the request was aborted (it is being restarted)",
                 "status": 503, "code": "worker_died"}
        if w is self.llm:
            self.epoch += 1  # requests still on their way from the visual worker belong to the dead one
            self.metrics.batch.set(0)
            failed = list(self.pending)
        else:
            # Requests the LLM already admitted are unaffected; the others were lost with the visual worker (or
            # are on their way to the LLM, which is told to drop them).
            failed = [rid for rid, p in self.pending.items() if not p.started]
        for rid in failed:
            self.pending.pop(rid).queue.put_nowait(dict(error, id=rid))
            if w is self.visual:
                self.cancel(rid, "worker_died")

    async def submit(self, request_id: str, messages, images, max_tokens, sampling, videos=()) -> asyncio.Queue:
        down = [w.name for w in self.workers if w.state != "up"]
        if down:
            raise ApiError(f"the {' and '.join(down)} worker is restarting; retry shortly", 503,
                           "worker_unavailable", "server_error")
        queue = asyncio.Queue()
        self.pending[request_id] = Pending(queue)
        await self.to_visual.send_pyobj({"id": request_id, "messages": messages, "images": images,
                                         "videos": list(videos), "max_tokens": max_tokens, "sampling": sampling,
                                         "epoch": self.epoch})
        return queue

    def cancel(self, request_id: str, reason: str) -> None:
        """Drop a request: the LLM worker frees its slot (or drops it on arrival). Never blocks."""
        self.pending.pop(request_id, None)
        try:
            self.control.send_pyobj({"cancel": request_id, "reason": reason}, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.error("could not cancel %s: the LLM worker's control queue is full", request_id)

    def kill_all(self) -> None:
        for w in self.workers:
            w.kill()

    def close(self) -> None:
        # Ask politely (the LLM worker stops its TP ranks), then make sure.
        try:
            self.control.send_pyobj({"stop": True}, flags=zmq.NOBLOCK)
            self.to_visual.send_pyobj(None, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        deadline = time.monotonic() + 10
        for w in self.workers:
            if w.proc is not None:
                w.proc.join(timeout=max(0.1, deadline - time.monotonic()))
        self.kill_all()
        atexit.unregister(self.kill_all)
        self.control.close(linger=0)
        self.sync_ctx.term()
        self.zctx.destroy(linger=0)
        shutil.rmtree(self.dir, ignore_errors=True)


class WorkerFailed(Exception):
    """A worker reported an error for a request after it started (or died under it)."""

    def __init__(self, event: dict):
        super().__init__(event["error"])
        self.api = event_error(event)


def error_response(exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status,
                        headers={"Retry-After": "5"} if exc.status == 503 else None)


def event_error(event: dict) -> ApiError:
    status = event.get("status", 500)
    if status < 500:
        return ApiError(event["error"], status, event.get("code") or "invalid_request", "invalid_request_error")
    return ApiError(event["error"], status, event.get("code") or "internal_error", "server_error")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, refused (413) past `max_bytes` before more is read, and (408) when it does not arrive in
    `timeout_s`: a slow client cannot hold the request open."""
    too_large = ApiError(f"the request body is larger than {max_bytes // 2**20} MiB (--max-request-mb)", 413,
                         "request_too_large")
    try:
        if int(request.headers.get("content-length") or 0) > max_bytes:
            raise too_large
    except ValueError:
        raise ApiError("the Content-Length header is not a number", code="invalid_request") from None

    async def receive() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
        return bytes(body)

    try:
        return await asyncio.wait_for(receive(), timeout_s)
    except TimeoutError:
        raise ApiError(f"the request body did not arrive within {timeout_s:g} s (--body-timeout)", 408,
                       "request_timeout") from None


def build_app(args, tokenizer, context: int, stopping=lambda: False):
    from PIL import Image
    from prometheus_client import generate_latest

    model_name = args.served_model_name or Path(args.model).name
    remote = RemoteMedia(args.remote_media_timeout, args.remote_media_max_mb * 2**20) \
        if args.allow_remote_media else None
    video_limits = VideoLimits(args.max_video_seconds, args.max_video_frames, args.video_min_pixels,
                               args.video_max_pixels)
    limits = RequestLimits(args.max_images_per_request, args.max_videos_per_request, args.max_image_pixels)
    Image.MAX_IMAGE_PIXELS = None  # replaced by --max-image-pixels, checked on each image's header before decoding
    max_body = args.max_request_mb * 2**20
    expected_key = f"Bearer {args.api_key}".encode() if args.api_key else None
    state = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Workers start with the app (not at import) so that uvicorn's port is bound by a process that is ready.
        state["engine"] = engine = Engine(args, stopping)
        tasks = [asyncio.create_task(engine.dispatch()), asyncio.create_task(engine.supervise())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            engine.close()

    app = FastAPI(title="vlmc", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions over vlmc's compiled visual and LLM graphs.")
    add_request_schemas(app)
    if args.allowed_origins:  # browsers may call the API from these origins; off by default
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def check_key(request: Request):
        # Constant-time: the comparison takes as long whatever prefix of the key a guess gets right.
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if expected_key and not hmac.compare_digest(given, expected_key):
            raise ApiError("invalid API key", 401, "invalid_api_key", "authentication_error")

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return error_response(exc)

    if args.webui:
        page_config = json.dumps({"model": model_name, "context": context, "auth": bool(args.api_key),
                                  "max_images": limits.max_images, "max_image_pixels": limits.max_image_pixels,
                                  "max_request_mb": args.max_request_mb}).replace("<", "\\u003c")
        page = (WEBUI / "index.html").read_text().replace("__VLMC_CONFIG__", page_config)
        assets = {"app.js": "text/javascript", "style.css": "text/css"}

        @app.get("/", include_in_schema=False)
        async def chat_page():
            return HTMLResponse(page, headers=WEBUI_HEADERS)

        @app.get("/webui/{name}", include_in_schema=False)
        async def chat_page_asset(name: str):
            if name not in assets:
                raise ApiError(f"no such file: /webui/{name}", 404, "not_found")
            return Response((WEBUI / name).read_bytes(), media_type=assets[name], headers=WEBUI_HEADERS)

    @app.get("/health")
    async def health():
        """200 when every worker is up; 503 naming the worker that is down or restarting. Lists worker pids
        and the devices they were given."""
        engine: Engine = state["engine"]
        return JSONResponse(engine.health(), status_code=200 if engine.healthy() else 503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format, version 0.0.4"}})
    async def metrics():
        """Prometheus metrics (docs/serve.md lists them)."""
        return Response(generate_latest(state["engine"].metrics.registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses={200: {"model": ModelList}, 401: ERRORS[401]})
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "vlmc",
                                            "max_model_len": context}]}

    @app.post("/v1/chat/completions", **chat_route_docs())
    async def chat(request: Request):
        """Chat completion over text, images and videos, streamed (SSE) or not; `usage` in every response."""
        engine: Engine = state["engine"]
        m = engine.metrics
        t0 = time.perf_counter()
        try:
            check_key(request)
            try:
                body = json.loads(await read_body(request, max_body, args.body_timeout))
            except ValueError:
                raise ApiError("the request body is not valid JSON", code="invalid_json") from None
            if not isinstance(body, dict):
                raise ApiError("the request body must be a JSON object", code="invalid_json")
            # In a thread: decoding large images or fetching remote ones must not stall the event loop.
            messages, images, videos = await asyncio.to_thread(convert_messages, body.get("messages"),
                                                               args.allowed_local_media_path, remote, video_limits,
                                                               limits)
            sampling = sampling_params(body)
            stops = stop_strings(body)
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
                raise ApiError("`max_tokens` must be a positive integer", code="invalid_parameter")
            if max_tokens is not None and max_tokens >= context:
                raise ApiError(f"max_tokens ({max_tokens}) must be less than the compiled context of {context}",
                               code="context_length_exceeded")
            request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            queue = await engine.submit(request_id, messages, images, max_tokens, sampling, videos)
        except ApiError as exc:
            m.requests.labels(str(exc.status)).inc()
            return error_response(exc)
        stream = bool(body.get("stream"))
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        m.queue_depth.inc()
        try:
            first = await queue.get()
        except asyncio.CancelledError:
            engine.cancel(request_id, "client_disconnect")
            raise
        finally:
            m.queue_depth.dec()
        if "error" in first:
            engine.pending.pop(request_id, None)
            exc = event_error(first)
            m.requests.labels(str(exc.status)).inc()
            return error_response(exc)
        prompt_tokens = first["prompt_tokens"]
        created = int(time.time())
        timing = {"first": None}

        async def tokens():
            """Yields (new text, finish_reason or None); detokenizes incrementally and applies `stop`."""
            ids, sent, reason = [], "", None
            while reason is None:
                # No timeout needed here: the supervisor puts an error event in the queue if a worker dies.
                ev = await queue.get()
                if "error" in ev:
                    raise WorkerFailed(ev)
                if "token" in ev:
                    if timing["first"] is None:
                        timing["first"] = time.perf_counter()
                        m.ttft.observe(timing["first"] - t0)
                    ids.append(ev["token"])
                    timing["completion"] = len(ids)
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    if text.endswith("\ufffd"):
                        continue  # an incomplete UTF-8 character: wait for the rest
                    hit = min((text.find(s, max(0, len(sent) - len(s))) for s in stops
                               if text.find(s, max(0, len(sent) - len(s))) >= 0), default=-1)
                    if hit >= 0:
                        text, reason = text[:hit], "stop"
                        engine.cancel(request_id, "stop_string")
                    if len(text) > len(sent):
                        yield text[len(sent):], None
                        sent = text
                elif ev.get("done"):
                    reason = ev["finish_reason"]
            timing["completion"] = len(ids)
            yield "", reason

        def finished(status: int):
            engine.pending.pop(request_id, None)
            total = time.perf_counter() - t0
            out = timing.get("completion", 0)
            ttft = (timing["first"] - t0) if timing["first"] else total
            if out > 1 and status == 200:
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
            async def collect():
                parts, reason = [], None
                async for text, reason in tokens():
                    parts.append(text)
                return "".join(parts), reason

            # Starlette does not cancel a plain handler when its client leaves: watch for that ourselves so a
            # disconnected client's sequence stops decoding.
            work = asyncio.create_task(collect())
            while not work.done():
                await asyncio.wait({work}, timeout=0.5)
                if not work.done() and await request.is_disconnected():
                    work.cancel()
                    engine.cancel(request_id, "client_disconnect")
                    finished(499)
                    return Response(status_code=499)
            try:
                content, reason = work.result()
            except WorkerFailed as exc:
                finished(exc.api.status)
                return error_response(exc.api)
            finished(200)
            return {"id": request_id, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
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
            except asyncio.CancelledError:  # the client went away: free its slot (cancel() never awaits)
                status = 499
                engine.cancel(request_id, "client_disconnect")
                raise
            except WorkerFailed as exc:
                # Headers (200) are already sent: the error goes in-band, as OpenAI does; clients raise on it.
                status = exc.api.status
                yield f"data: {json.dumps(exc.api.body())}\n\n"
            finally:
                finished(status)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# A response's bytes that may wait for a client: the socket's send buffer (fixed, so that the kernel does not grow it to
# MiBs for a client that reads nothing) and the transport's buffer above it; past both, writing pauses and
# --send-timeout starts. A text stream needs no more on any network.
SOCKET_SEND_BUFFER = 8192  # the kernel doubles it
WRITE_BUFFER_HIGH = 8192


def timeout_protocol(header_seconds: float, send_seconds: float):
    """uvicorn's h11 protocol with two deadlines uvicorn lacks (it times out only idle keep-alive connections):
    - a connection's first request headers: a client that trickles or stalls them gets a 408, then the connection
      is closed;
    - a response that cannot be sent: a client that stops reading fills the socket and the transport's buffer, and
      uvicorn would wait for it forever. After `send_seconds` without room to write, the connection is dropped; the
      response's handler then sees the client as gone, so a stream's sequence is cancelled and its slot freed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimeoutProtocol(H11Protocol):
        send_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
            transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
            self.header_deadline = self.loop.call_later(header_seconds, self.headers_timed_out)

        def headers_timed_out(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # no request has started
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                self.transport.close()

        def pause_writing(self) -> None:  # the transport's buffer is over its high-water mark
            super().pause_writing()
            if self.send_deadline is None:
                self.send_deadline = self.loop.call_later(send_seconds, self.send_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.send_deadline is not None:
                self.send_deadline.cancel()
                self.send_deadline = None

        def send_timed_out(self) -> None:
            self.send_deadline = None
            if not self.transport.is_closing():
                log.warning("dropping a client that read nothing for %g s (--send-timeout)", send_seconds)
                self.transport.abort()

        def connection_lost(self, exc) -> None:
            self.header_deadline.cancel()
            if self.send_deadline is not None:
                self.send_deadline.cancel()
            super().connection_lost(exc)

    return TimeoutProtocol


def parse_devices(text: str, flag: str) -> list[int]:
    """The vendor's device list syntax: "[0,1,2]" (also "0,1,2" or "2")."""
    from ...errors import VlmcError

    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    try:
        devices = [int(part) for part in body.split(",") if part.strip()] if body.strip() else []
    except ValueError:
        raise VlmcError(f"{flag} must be a list of device ids like \"[0,1]\", got {text!r}") from None
    if not devices:
        raise VlmcError(f"{flag} lists no devices")
    if any(d < 0 for d in devices) or len(set(devices)) != len(devices):
        raise VlmcError(f"{flag} must list distinct non-negative device ids, got {text!r}")
    return devices


def check_devices(llm: list[int] | None, vit: list[int] | None, tp: int) -> tuple[list[int], list[int]]:
    """Validated (LLM devices, visual devices): one LLM device per TP rank, one visual device."""
    from ...errors import VlmcError

    llm = list(range(tp)) if llm is None else llm
    if len(llm) != tp:
        example = ",".join(map(str, range(tp)))
        raise VlmcError(f"--llm_devices lists {len(llm)} device(s) but the LLM artifact was compiled for tp={tp}: "
                        f"give exactly {tp} (one per tensor-parallel rank), e.g. \"[{example}]\"")
    vit = [0] if vit is None else vit
    if len(vit) != 1:
        raise VlmcError(f"--vit_devices lists {len(vit)} devices; the visual worker runs on one, e.g. \"[2]\"")
    return llm, vit


def serve(args) -> int:
    import uvicorn

    from ...errors import VlmcError
    from ..llm.cluster import cluster_from_args
    from ..llm.runtime import LLMArtifact, host_ranks
    from ..visual.runtime import read_manifest

    args.cluster = cluster_from_args(args)
    if args.cluster.node_rank > 0:
        # Another node: only its tensor-parallel ranks; node 0 runs the HTTP front, the visual worker and rank 0.
        logging.getLogger("vlmc.ranks").setLevel(logging.INFO)
        return host_ranks(args.model, args.cluster, rejoin=True, verify=args.verify)
    if args.vit_model is None:
        raise VlmcError("--vit_model is required (on node 0)")
    # Flag syntax first: a typo is reported before the artifacts are read.
    llm_devices = parse_devices(args.llm_devices, "--llm_devices") if args.llm_devices else None
    vit_devices = parse_devices(args.vit_devices, "--vit_devices") if args.vit_devices else None
    if vit_devices is not None:
        check_devices(None, vit_devices, 1)
    llm = LLMArtifact(args.model, verify=args.verify)
    visual = read_manifest(Path(args.vit_model), kind="visual", verify=args.verify)
    llm.check_visual(visual, args.vit_model)
    if "max_tiles" in visual and (args.min_pixels is not None or args.max_pixels is not None):
        raise VlmcError(f"--min_pixels / --max_pixels do not apply: {args.vit_model} cuts images into at most "
                        f"{visual['max_tiles']} tiles (set when it was compiled, --max-tiles)")
    compiled = int(llm.manifest["batch_size"])
    if args.batch_size is not None and not 1 <= args.batch_size <= compiled:
        raise VlmcError(f"--batch_size must be between 1 and the LLM artifact's compiled batch of {compiled}")
    if args.image_cache_mb < 0:
        raise VlmcError("--image_cache_mb must be 0 (off) or a positive number of MiB")
    for flag in ("max_request_mb", "body_timeout", "header_timeout", "send_timeout", "max_image_pixels",
                 "max_prompt_tokens"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            raise VlmcError(f"--{flag.replace('_', '-')} must be positive")
    for flag in ("max_images_per_request", "max_videos_per_request"):
        if getattr(args, flag) < 0:
            raise VlmcError(f"--{flag.replace('_', '-')} must be 0 or more")
    if args.remote_media_timeout <= 0 or args.remote_media_max_mb <= 0:
        raise VlmcError("--remote-media-timeout and --remote-media-max-mb must be positive")
    if not args.max_video_seconds > 0 or args.max_video_frames <= 0:
        raise VlmcError("--max-video-seconds and --max-video-frames must be positive")
    for flag in ("video_min_pixels", "video_max_pixels"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise VlmcError(f"--{flag.replace('_', '-')} must be positive")
    args.cluster.ranks(llm.tp)  # a layout the artifact's tp does not divide over: a one-line error
    args.llm_devices, args.vit_devices = check_devices(llm_devices, vit_devices, llm.tp)
    logging.getLogger("vlmc.serve").setLevel(logging.INFO)
    config = uvicorn.Config(None, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=30, http=timeout_protocol(args.header_timeout, args.send_timeout))
    server = uvicorn.Server(config)
    config.app = build_app(args, llm.tokenizer(), int(llm.manifest["context"]), lambda: server.should_exit)
    # On CPU the device ids are only recorded (and shown in /health); an accelerator runtime binds to them.
    log.warning("vlmc serve: %s on http://%s:%d (batch %d; LLM tp=%d on devices %s, visual on device %s; "
                "image cache %d MiB; remote media %s)", Path(args.model).name, args.host, args.port,
                args.batch_size or compiled, llm.tp, args.llm_devices, args.vit_devices, args.image_cache_mb,
                "allowed" if args.allow_remote_media else "off")
    # uvicorn shuts down gracefully on SIGTERM and then re-raises it; a no-op handler makes that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 0
