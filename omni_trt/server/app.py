"""The OpenAI-compatible image API (vllm-omni's Image Generation API): routes, readiness,
errors. The model loads in a background thread after the server starts listening, so clients
see 503 "not initialized" rather than a refused connection."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.engines import OutOfProfile
from ..runtime.pipeline import STAGES, BatchResult, PipelineRuntime
from ..runtime.request import GenerationRequest, RequestError, resolve
from .encoding import data_url, encode_b64
from .metrics import Metrics, RequestCounter
from .protocol import ChatBody, ChatImageParams, ImageGenerationBody
from .scheduler import Job, JobResult, QueueFull, Scheduler

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


@dataclass
class ServerOptions:
    served_model_name: str
    max_queue: int = 64
    max_batch_size: int = 4
    api_key: str | None = None
    disconnect_poll_s: float = 0.1


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_body(status: int, detail: Any, message: str | None = None, param: str | None = None) -> dict[str, Any]:
    """Both shapes at once: FastAPI clients read `detail`, OpenAI clients read `error`."""
    message = message if message is not None else (detail if isinstance(detail, str) else str(detail))
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"detail": detail, "error": {"message": message, "type": kind, "param": param, "code": status}}


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        names = [x for x in loc if not x.isdigit()]  # list indices and JSON offsets are no param
        param = param or (names[-1] if names else None)
        parts.append(f"{field}: {e.get('msg')}" if field else str(e.get("msg")))
    return "; ".join(parts) or "invalid request", param


class ServerState:
    """What the routes share: the runtime once loaded, the scheduler, metrics, the encode pool."""

    def __init__(self, options: ServerOptions, load: Callable[[], PipelineRuntime]) -> None:
        self.options = options
        self.load = load
        self.metrics = Metrics()
        self.runtime: PipelineRuntime | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.encode_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="omni-encode")
        self.batch_seconds_ema: float | None = None
        self.on_load_error: Callable[[BaseException], None] | None = None

    def load_in_background(self) -> threading.Thread:
        def run() -> None:
            try:
                runtime = self.load()
                # One cap for both: batching stops there, and a larger request runs in chunks of it
                # (a 10-image request is never one 10-image call that could run out of memory).
                runtime.max_call_images = self.options.max_batch_size
                scheduler = Scheduler(self._run_batch, self.options.max_queue, runtime.max_batch or self.options.max_batch_size, self._on_batch)
                scheduler.start()
                self.scheduler, self.runtime = scheduler, runtime
                log.info("ready: %s", runtime.describe())
            except BaseException as e:  # noqa: BLE001 - reported to the operator, server stops
                self.load_error = f"{type(e).__name__}: {e}"
                log.error("model failed to load: %s", self.load_error)
                if self.on_load_error:
                    self.on_load_error(e)

        thread = threading.Thread(target=run, name="omni-load", daemon=True)
        thread.start()
        return thread

    def _run_batch(self, requests: list[GenerationRequest]) -> BatchResult:
        assert self.runtime is not None
        return self.runtime.generate(requests)

    def _on_batch(self, jobs: list[Job], result: BatchResult | None, started: float) -> None:
        m = self.metrics
        for job in jobs:
            m.queue_wait.observe(started - job.enqueued)
        if result is None:
            return
        for stage in (*STAGES, "total"):
            if stage in result.stages:
                m.stage.labels(stage=stage).observe(result.stages[stage])
        n = sum(j.request.n for j in jobs)
        m.images.inc(n)
        m.batch_images.observe(n)
        total = result.stages.get("total", 0.0)
        self.batch_seconds_ema = total if self.batch_seconds_ema is None else 0.8 * self.batch_seconds_ema + 0.2 * total

    def not_ready_message(self) -> str:
        why = f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
        return f"Model not initialized ({why})"

    def ready(self) -> tuple[PipelineRuntime, Scheduler]:
        if self.runtime is None or self.scheduler is None:
            raise ApiError(503, self.not_ready_message(), headers={"Retry-After": "5"})
        return self.runtime, self.scheduler

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.options.served_model_name:
            raise ApiError(400, f"model {model!r} is not served here; this server serves {self.options.served_model_name!r}", "model")

    def retry_after(self) -> int:
        """Seconds until the queue has room, from the recent batch time."""
        per_batch = self.batch_seconds_ema or 1.0
        depth = self.scheduler.depth() if self.scheduler else 0
        return max(1, min(120, math.ceil(per_batch * depth / max(1, self.options.max_batch_size))))

    async def run(self, request: GenerationRequest, http_request: Request) -> JobResult:
        """Queue the request and wait; drop it if the client goes away while it is queued."""
        _, scheduler = self.ready()
        try:
            job = scheduler.submit(request)
        except QueueFull as e:
            raise ApiError(429, str(e), headers={"Retry-After": str(self.retry_after())}) from None
        self.metrics.queue_depth.set(scheduler.depth())
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=self.options.disconnect_poll_s)
            if done:
                try:
                    return job.future.result()
                except OutOfProfile as e:  # a shape the built engines do not cover
                    raise ApiError(400, str(e)) from None
                except Exception as e:  # a fault in the batch, logged with its traceback by the worker
                    # Answered here rather than by the catch-all handler: Starlette re-raises after
                    # that one responds, and uvicorn then closes the connection under the client.
                    raise ApiError(500, f"internal server error: {type(e).__name__}: {e}") from None
            if await http_request.is_disconnected():
                if scheduler.cancel(job):
                    self.metrics.dropped.inc()
                    log.info("request %s dropped: client disconnected while queued", request.request_id)
                raise ClientGone()

    async def encode(self, images: list[Any], fmt: str, compression: int | None) -> list[str]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await asyncio.gather(*(loop.run_in_executor(self.encode_pool, encode_b64, im, fmt, compression) for im in images))
        self.metrics.stage.labels(stage="encode").observe(time.perf_counter() - t0)
        return list(out)


class ClientGone(Exception):
    pass


def _request_from(runtime: PipelineRuntime, prompt: Any, **fields: Any) -> GenerationRequest:
    try:
        return resolve(runtime.family, prompt, limits=runtime.limits, request_id=uuid.uuid4().hex, **fields)
    except RequestError as e:
        raise ApiError(e.status, e.message, e.param) from None


def create_app(options: ServerOptions, load: Callable[[], PipelineRuntime]) -> FastAPI:
    state = ServerState(options, load)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.load_in_background()
        yield
        if state.scheduler:
            state.scheduler.stop()
        state.encode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="omni-trt", version="0.1.0", lifespan=lifespan)
    app.state.omni = state

    async def require_key(request: Request) -> None:
        key = options.api_key
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != key:
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})

    v1 = [Depends(require_key)]

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.status, e.message, param=e.param), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = _jsonable_errors(e.errors())
        message, param = _validation_message(errors)
        return JSONResponse(error_body(422, errors, message, param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(e.status_code, e.detail), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _fault(_: Request, e: Exception) -> JSONResponse:
        log.exception("server fault")
        return JSONResponse(error_body(500, f"internal server error: {type(e).__name__}: {e}"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.runtime is None:
            return JSONResponse(error_body(503, state.not_ready_message()), status_code=503)
        return JSONResponse({"status": "ok", "model": options.served_model_name, **state.runtime.describe()})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.scheduler:
            state.metrics.queue_depth.set(state.scheduler.depth())
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        card: dict[str, Any] = {"id": options.served_model_name, "object": "model", "created": state.created, "owned_by": "omni-trt", "ready": state.runtime is not None}
        if state.runtime is not None:
            rt = state.runtime
            d = rt.family.defaults
            card.update(rt.describe())
            card["defaults"] = {"size": f"{d.width}x{d.height}", "num_inference_steps": d.steps, "guidance_scale": d.guidance_scale, "true_cfg_scale": d.true_cfg_scale}
            card["sizes"] = rt.limits.describe()
            card["max_batch"] = rt.max_batch
        return {"object": "list", "data": [card]}

    @app.post("/v1/images/generations", dependencies=v1)
    async def images(body: ImageGenerationBody, request: Request) -> JSONResponse:
        runtime, _ = state.ready()
        state.check_model(body.model)
        req = _request_from(
            runtime, body.prompt, size=body.size, n=body.n, steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, true_cfg_scale=body.true_cfg_scale, negative_prompt=body.negative_prompt,
            seed=body.seed, output_format=body.output_format, output_compression=body.output_compression,
        )
        log.info("request %s images n=%d %dx%d steps=%d seed=%d user=%s", req.request_id, req.n, req.width, req.height, req.steps, req.seed, body.user)
        result = await state.run(req, request)
        encoded = await state.encode(result.images, req.output_format, req.output_compression)
        data = [{"b64_json": b, "url": None, "revised_prompt": None} for b in encoded]
        return JSONResponse({"created": int(time.time()), "data": data}, headers={"X-Request-Id": req.request_id})

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(body: ChatBody, request: Request) -> JSONResponse:
        runtime, _ = state.ready()
        state.check_model(body.model)
        prompt = body.prompt()
        if not prompt:
            raise ApiError(400, "no user text in messages: send a message with role 'user' and text content", "messages")
        try:
            p = ChatImageParams.model_validate(body.params())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        req = _request_from(
            runtime, prompt, size=p.size, width=p.width, height=p.height, n=p.num_outputs_per_prompt,
            steps=p.num_inference_steps, guidance_scale=p.guidance_scale, true_cfg_scale=p.true_cfg_scale,
            negative_prompt=p.negative_prompt, seed=p.seed, output_format=p.output_format, output_compression=p.output_compression,
        )
        log.info("request %s chat n=%d %dx%d steps=%d seed=%d", req.request_id, req.n, req.width, req.height, req.steps, req.seed)
        result = await state.run(req, request)
        encoded = await state.encode(result.images, req.output_format, req.output_compression)
        content = [{"type": "image_url", "image_url": {"url": data_url(b, req.output_format)}} for b in encoded]
        return JSONResponse(
            {
                "id": f"chatcmpl-{req.request_id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": options.served_model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
            headers={"X-Request-Id": req.request_id},
        )

    app.add_middleware(RequestCounter, metrics=state.metrics)
    return app


def _jsonable_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic errors can carry exceptions and bytes in ctx/input; keep what JSON can hold."""
    out = []
    for e in errors:
        item = {k: v for k, v in e.items() if k in ("type", "loc", "msg")}
        if "input" in e and isinstance(e["input"], (str, int, float, bool, type(None))):
            item["input"] = e["input"]
        out.append(item)
    return out
