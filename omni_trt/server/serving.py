"""The serving object: what every route shares (the runtime once loaded, the scheduler, metrics,
the encode pool) and the one request sequence both image endpoints run: ready, check the model,
resolve the request, queue it, wait, encode. Routes (server/routes.py) only translate HTTP
bodies into calls on it, as vLLM's OpenAI entrypoints do with their serving classes."""

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

from ..errors import OmniError, OutOfProfile
from ..runtime.pipeline import STAGES, BatchResult, PipelineRuntime
from ..runtime.request import GenerationRequest, resolve
from .encoding import data_url, encode_b64
from .metrics import Metrics
from .protocol import (
    AssistantMessage,
    ChatBody,
    ChatChoice,
    ChatCompletionResponse,
    ChatImageParams,
    ImageGenerationBody,
    ImageData,
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


@dataclass(frozen=True)
class ServerOptions:
    served_model_name: str
    max_queue: int = 64
    max_batch_size: int = 4
    api_key: str | None = None
    disconnect_poll_s: float = 0.1


class ClientGone(OmniError):
    """The client left before its answer: nobody reads the response (nginx's 499)."""

    status = 499


@dataclass(frozen=True)
class Generated:
    """What the shared sequence gives a route: the resolved request and its encoded images."""

    request: GenerationRequest
    images: list[str]  # base64


class ImageServing:
    """Owns the runtime (loaded in a background thread after the server listens, so clients see
    503 "not initialized" rather than a refused connection), the scheduler and the metrics."""

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

    # ---- lifecycle ----

    def load_in_background(self) -> threading.Thread:
        def run() -> None:
            try:
                runtime = self.load()
                # One cap for both: batching stops there, and a larger request runs in chunks of it
                # (a 10-image request is never one 10-image call that could run out of memory).
                cap = runtime.max_batch(self.options.max_batch_size)
                scheduler = Scheduler(lambda reqs: runtime.generate(reqs, cap), self.options.max_queue, cap, self._on_batch)
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
        m.images.inc(sum(j.request.n for j in jobs))
        for n in result.calls:
            m.batch_images.observe(n)
        total = result.stages.get("total", 0.0)
        self.batch_seconds_ema = total if self.batch_seconds_ema is None else 0.8 * self.batch_seconds_ema + 0.2 * total

    # ---- state ----

    def not_ready_message(self) -> str:
        why = f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
        return f"Model not initialized ({why})"

    def ready(self) -> tuple[PipelineRuntime, Scheduler]:
        if self.runtime is None or self.scheduler is None:
            raise OmniError(self.not_ready_message(), status=503, headers={"Retry-After": "5"})
        return self.runtime, self.scheduler

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.options.served_model_name:
            raise OmniError(f"model {model!r} is not served here; this server serves {self.options.served_model_name!r}", "model", status=400)

    def retry_after(self) -> int:
        """Seconds until the queue has room, from the recent batch time."""
        per_batch = self.batch_seconds_ema or 1.0
        depth = self.scheduler.depth() if self.scheduler else 0
        return max(1, min(120, math.ceil(per_batch * depth / max(1, self.options.max_batch_size))))

    def runtime_info(self) -> RuntimeInfo | None:
        return RuntimeInfo(**self.runtime.describe()) if self.runtime else None

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
            }
        card = ModelCard(id=self.options.served_model_name, object="model", created=self.created, owned_by="omni-trt", ready=rt is not None, **fields)
        return ModelList(object="list", data=[card])

    # ---- the shared request sequence ----

    async def generate(self, http_request: Request, model: str | None, prompt: Any, what: str, **fields: Any) -> Generated:
        """ready -> check model -> resolve -> queue and wait -> encode."""
        runtime, _ = self.ready()
        self.check_model(model)
        req = resolve(runtime.family, prompt, limits=runtime.limits, request_id=uuid.uuid4().hex, **fields)
        log.info("request %s %s n=%d %dx%d steps=%d seed=%d", req.request_id, what, req.n, req.width, req.height, req.steps, req.seed)
        result = await self._run(req, http_request)
        return Generated(req, await self._encode(result.images, req.output_format, req.output_compression))

    async def create_images(self, http_request: Request, body: ImageGenerationBody) -> tuple[ImagesResponse, str]:
        g = await self.generate(
            http_request, body.model, body.prompt, f"images user={body.user}", size=body.size, n=body.n,
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
            raise OmniError("no user text in messages: send a message with role 'user' and text content", "messages", status=400)
        try:
            p = ChatImageParams.model_validate(body.params())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        g = await self.generate(
            http_request, body.model, prompt, "chat", size=p.size, width=p.width, height=p.height, n=p.num_outputs_per_prompt,
            steps=p.num_inference_steps, guidance_scale=p.guidance_scale, true_cfg_scale=p.true_cfg_scale,
            negative_prompt=p.negative_prompt, seed=p.seed, output_format=p.output_format, output_compression=p.output_compression,
        )
        fmt = g.request.output_format
        parts = [ImagePart(image_url=ImageURL(url=data_url(b, fmt))) for b in g.images]
        response = ChatCompletionResponse(
            id=f"chatcmpl-{g.request.request_id}", created=int(time.time()), model=self.options.served_model_name,
            choices=[ChatChoice(message=AssistantMessage(content=parts))],
        )
        return response, g.request.request_id

    async def _run(self, request: GenerationRequest, http_request: Request) -> JobResult:
        """Queue the request and wait; drop it if the client goes away while it is queued."""
        _, scheduler = self.ready()
        try:
            job = scheduler.submit(request)
        except QueueFull as e:
            raise OmniError(str(e), status=429, headers={"Retry-After": str(self.retry_after())}) from None
        self.metrics.queue_depth.set(scheduler.depth())
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=self.options.disconnect_poll_s)
            if done:
                try:
                    return job.future.result()
                except OutOfProfile:  # a shape the built engines do not cover: the request's own fault
                    raise
                except Exception as e:  # a fault in the batch, logged with its traceback by the worker
                    # Answered here rather than by the catch-all handler: Starlette re-raises after
                    # that one responds, and uvicorn then closes the connection under the client.
                    raise OmniError(f"internal server error: {type(e).__name__}: {e}") from None
            if await http_request.is_disconnected():
                if scheduler.cancel(job):
                    self.metrics.dropped.inc()
                    log.info("request %s dropped: client disconnected while queued", request.request_id)
                raise ClientGone("client disconnected")

    async def _encode(self, images: list[Any], fmt: str, compression: int | None) -> list[str]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await asyncio.gather(*(loop.run_in_executor(self.encode_pool, encode_b64, im, fmt, compression) for im in images))
        self.metrics.stage.labels(stage="encode").observe(time.perf_counter() - t0)
        return list(out)
