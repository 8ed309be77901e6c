"""The serving object: what every route shares (the runtime once loaded, the scheduler, metrics,
the encode pool) and the one request sequence both image endpoints run: ready, check the model,
resolve and bound the request, queue it, wait (cancelling it if the client leaves or its deadline
passes), encode. Routes (server/routes.py) only translate HTTP bodies into calls on it, as vLLM's
OpenAI entrypoints do with their serving classes."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ..errors import Cancelled, OmniError, RequestError
from ..logs import escape
from ..runtime.pipeline import STAGES, BatchResult, PipelineRuntime
from ..runtime.request import GenerationRequest, RequestCaps, resolve
from .encoding import data_url, encode_b64
from .metrics import Metrics
from .protocol import (
    AssistantMessage,
    ChatBody,
    ChatChoice,
    ChatCompletionResponse,
    ChatImageParams,
    ImageData,
    ImageGenerationBody,
    ImagePart,
    ImagesResponse,
    ImageURL,
    ModelCard,
    ModelDefaults,
    ModelList,
    RuntimeInfo,
)
from .scheduler import Job, JobResult, QueueFull, Scheduler

log = logging.getLogger(__name__)

MB = 1 << 20


@dataclass(frozen=True)
class ServerOptions:
    """Everything an operator sets on `omni serve` that the app needs (see its --help)."""

    served_model_name: str
    max_queue: int = 64
    max_batch_size: int = 4
    api_key: str | None = None
    max_body_bytes: int = 32 * MB  # bodies over it get 413 (edits carry images)
    body_timeout_s: float = 30.0  # a body that stalls longer gets 408
    max_prompt_tokens: int | None = None  # None: all the model reads
    max_megapixel_steps: float | None = 256.0  # width x height x n x steps / 1e6 per request
    request_timeout_s: float = 300.0  # from arrival to answer; past it: 504 and the work stops
    drain_timeout_s: float = 30.0  # on shutdown, how long the backlog may finish
    disconnect_poll_s: float = 0.1


@dataclass(frozen=True)
class Generated:
    """What the shared sequence gives a route: the resolved request and its encoded images."""

    request: GenerationRequest
    images: list[str]  # base64


def internal_error(request_id: str) -> OmniError:
    """What a client sees of a server fault: no exception types, no messages; the log has them."""
    return OmniError(f"internal error (request {request_id}); the server log has the details", status=500)


class ImageServing:
    """Owns the runtime (loaded in a background thread after the server listens, so clients see
    503 "not initialized" rather than a refused connection), the scheduler and the metrics."""

    def __init__(self, options: ServerOptions, load: Callable[[], PipelineRuntime]) -> None:
        self.options = options
        self.load = load
        self.metrics = Metrics()
        self.runtime: PipelineRuntime | None = None
        self.scheduler: Scheduler | None = None
        self.caps = RequestCaps(options.max_prompt_tokens, options.max_megapixel_steps)
        self.load_error: str | None = None
        self.draining: str | None = None  # why new work is refused, once shutdown began
        self.created = int(time.time())
        self.encode_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="omni-encode")
        self.batch_seconds_ema: float | None = None
        self.on_load_error: Callable[[BaseException], None] | None = None

    # ---- lifecycle ----

    def load_in_background(self) -> threading.Thread:
        def run() -> None:
            try:
                runtime = self.load()
                # One cap for both: batching stops there, and a larger request runs in chunks of it
                # (a 10-image request is never one 10-image call that could run out of memory).
                cap = runtime.max_batch(self.options.max_batch_size)
                scheduler = Scheduler(lambda reqs, stop: runtime.generate(reqs, cap, stop), self.options.max_queue, cap, self._on_batch)
                scheduler.start()
                tokens = runtime.max_prompt_tokens
                if self.options.max_prompt_tokens:
                    tokens = min(tokens, self.options.max_prompt_tokens)
                self.caps = RequestCaps(tokens, self.options.max_megapixel_steps)
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

    async def drain(self, timeout: float | None = None) -> None:
        """Shutdown, first half: refuse new work (503), let the backlog finish for up to
        `timeout` seconds, then answer what is left with 503 in the error shape."""
        timeout = self.options.drain_timeout_s if timeout is None else timeout
        self.draining = "the server is shutting down; retry on another replica or later"
        scheduler = self.scheduler
        if scheduler is None:
            return
        scheduler.close(self.draining)
        deadline = time.monotonic() + timeout
        while not scheduler.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = scheduler.refuse_backlog(Cancelled(self.draining, status=503, headers={"Retry-After": "5"}))
        if left:
            log.warning("drain timeout (%.0f s): %d request(s) answered 503", timeout, left)

    def stop(self) -> None:
        if self.scheduler:
            self.scheduler.stop()
        self.encode_pool.shutdown(wait=False, cancel_futures=True)

    def _on_batch(self, jobs: list[Job], result: BatchResult | None, started: float) -> None:
        m = self.metrics
        for job in jobs:
            m.queue_wait.observe(started - job.enqueued)
        if result is None:
            return
        for stage in (*STAGES, "total"):
            if stage in result.stages:
                m.stage.labels(stage=stage).observe(result.stages[stage])
        m.images.inc(sum(j.request.n for j in jobs if not j.cancelled))
        for n in result.calls:
            m.batch_images.observe(n)
        total = result.stages.get("total", 0.0)
        self.batch_seconds_ema = total if self.batch_seconds_ema is None else 0.8 * self.batch_seconds_ema + 0.2 * total

    # ---- state ----

    def not_ready_message(self) -> str:
        if self.draining:
            return self.draining
        why = f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
        return f"Model not initialized ({why})"

    def ready(self) -> tuple[PipelineRuntime, Scheduler]:
        if self.runtime is None or self.scheduler is None or self.draining:
            raise OmniError(self.not_ready_message(), status=503, headers={"Retry-After": "5"})
        return self.runtime, self.scheduler

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.options.served_model_name:
            raise RequestError(f"model {model!r} is not served here; this server serves {self.options.served_model_name!r}", "model")

    def retry_after(self) -> int:
        """Seconds until the queue has room, from the recent batch time."""
        per_batch = self.batch_seconds_ema or 1.0
        depth = self.scheduler.depth() if self.scheduler else 0
        return max(1, min(120, math.ceil(per_batch * depth / max(1, self.options.max_batch_size))))

    def runtime_info(self) -> RuntimeInfo | None:
        return RuntimeInfo(**self.runtime.describe()) if self.runtime and not self.draining else None

    def models(self) -> ModelList:
        """The model card; runtime fields only once loaded (served with exclude_unset)."""
        fields: dict[str, Any] = {}
        rt = self.runtime
        if rt is not None:
            d = rt.family.defaults
            fields = {
                **rt.describe(),
                "defaults": ModelDefaults(size=f"{d.width}x{d.height}", num_inference_steps=d.steps, guidance_scale=d.guidance_scale, true_cfg_scale=d.true_cfg_scale),
                "sizes": rt.limits.describe(),
                "max_batch": rt.max_batch(self.options.max_batch_size),
                "max_prompt_tokens": self.caps.max_prompt_tokens,
                "max_megapixel_steps": self.caps.max_megapixel_steps,
            }
        card = ModelCard(id=self.options.served_model_name, object="model", created=self.created, owned_by="omni-trt", ready=rt is not None, **fields)
        return ModelList(object="list", data=[card])

    # ---- the shared request sequence ----

    async def generate(self, http_request: Request, model: str | None, prompt: Any, what: str, prompt_param: str = "prompt",
                       **fields: Any) -> Generated:
        """ready -> check model -> resolve and bound -> queue and wait -> encode."""
        arrived = time.monotonic()
        runtime, _ = self.ready()
        self.check_model(model)
        try:
            req = resolve(runtime.family, prompt, limits=runtime.limits, caps=self.caps, request_id=uuid.uuid4().hex, **fields)
        except RequestError as e:
            if e.param == "prompt":
                e.param = prompt_param
            raise
        await self._check_tokens(runtime, req, prompt_param)
        log.info("request %s %s n=%d %dx%d steps=%d seed=%d", req.request_id, what, req.n, req.width, req.height, req.steps, req.seed)
        result = await self._run(req, http_request, arrived)
        return Generated(req, await self._encode(result.images, req.output_format, req.output_compression))

    async def _check_tokens(self, runtime: PipelineRuntime, req: GenerationRequest, prompt_param: str) -> None:
        """Prompts the model cannot read whole are refused before they are queued (the pipelines
        would truncate them silently, or fail on a short config). Counted off the event loop."""
        most = self.caps.max_prompt_tokens
        loop = asyncio.get_running_loop()
        for param, text in ((prompt_param, req.prompt), ("negative_prompt", req.negative_prompt)):
            if text is None or most is None:
                continue
            tokens = await loop.run_in_executor(self.encode_pool, runtime.prompt_tokens, text)
            if tokens > most:
                raise RequestError(f"{param} is {tokens} tokens; this model reads at most {most}: shorten it", param)

    async def create_images(self, http_request: Request, body: ImageGenerationBody) -> tuple[ImagesResponse, str]:
        g = await self.generate(
            http_request, body.model, body.prompt, f"images user={escape(body.user)}", size=body.size, n=body.n,
            steps=body.num_inference_steps, guidance_scale=body.guidance_scale, true_cfg_scale=body.true_cfg_scale,
            negative_prompt=body.negative_prompt, seed=body.seed, output_format=body.output_format,
            output_compression=body.output_compression,
        )
        return ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=b) for b in g.images]), g.request.request_id

    async def create_chat(self, http_request: Request, body: ChatBody) -> tuple[ChatCompletionResponse, str]:
        self.ready()
        self.check_model(body.model)
        prompt = body.prompt()
        if not prompt:
            raise RequestError("no user text in messages: send a message with role 'user' and text content", "messages")
        try:
            p = ChatImageParams.model_validate(body.params())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        g = await self.generate(
            http_request, body.model, prompt, "chat", prompt_param="messages", size=p.size, width=p.width, height=p.height,
            n=p.num_outputs_per_prompt, steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
            true_cfg_scale=p.true_cfg_scale, negative_prompt=p.negative_prompt, seed=p.seed, output_format=p.output_format,
            output_compression=p.output_compression,
        )
        fmt = g.request.output_format
        parts = [ImagePart(image_url=ImageURL(url=data_url(b, fmt))) for b in g.images]
        response = ChatCompletionResponse(
            id=f"chatcmpl-{g.request.request_id}", created=int(time.time()), model=self.options.served_model_name,
            choices=[ChatChoice(message=AssistantMessage(content=parts))],
        )
        return response, g.request.request_id

    async def _run(self, request: GenerationRequest, http_request: Request, arrived: float) -> JobResult:
        """Queue the request and wait. A client that leaves, or a deadline that passes, cancels
        it: dropped while queued, stopped at the next step while running."""
        _, scheduler = self.ready()
        try:
            job = scheduler.submit(request)
        except QueueFull as e:
            e.headers = {"Retry-After": str(self.retry_after())}
            raise
        self.metrics.queue_depth.set(scheduler.depth())
        deadline = arrived + self.options.request_timeout_s
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=self.options.disconnect_poll_s)
            if done:
                outcome = job.future.result()
                if outcome.error is None:
                    return outcome.result
                if isinstance(outcome.error, OmniError):  # the request's own fault, a deadline, a shutdown
                    raise outcome.error
                # A fault, logged with its traceback by the worker. Answered here rather than by
                # the catch-all handler: Starlette re-raises after that one responds, and uvicorn
                # then closes the connection under the client.
                raise internal_error(request.request_id)
            if await http_request.is_disconnected():
                reason = Cancelled("the client disconnected", status=499)
            elif time.monotonic() > deadline:
                reason = Cancelled(f"the request took longer than this server's limit of {self.options.request_timeout_s:g} s; "
                                   "ask for less (fewer images or steps, a smaller size) or retry later", status=504)
            else:
                continue
            queued = scheduler.cancel(job, reason)
            self.metrics.cancelled.labels(reason="disconnect" if reason.status == 499 else "deadline", where="queued" if queued else "running").inc()
            if queued and reason.status == 499:
                self.metrics.dropped.inc()
            log.info("request %s cancelled while %s: %s", request.request_id, "queued" if queued else "running", reason)
            raise reason

    async def _encode(self, images: list[Any], fmt: str, compression: int | None) -> list[str]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await asyncio.gather(*(loop.run_in_executor(self.encode_pool, encode_b64, im, fmt, compression) for im in images))
        self.metrics.stage.labels(stage="encode").observe(time.perf_counter() - t0)
        return list(out)
