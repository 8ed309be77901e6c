"""The serving object: what every route shares (the runtime once loaded, the scheduler, metrics,
the encode pool) and the one request sequence both image endpoints run: ready, check the model,
resolve and bound the request, queue it, wait (cancelling it if the client leaves or its deadline
passes), encode. Routes (server/routes.py) only translate HTTP bodies into calls on it, as vLLM's
OpenAI entrypoints do with their serving classes."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ..errors import Cancelled, ComponentNotBuilt, OmniError, RequestError
from ..logs import escape
from ..runtime.pipeline import STAGES, BatchResult, PipelineRuntime
from ..runtime.request import SEED_LIMIT, GenerationRequest, RequestCaps, resolve
from .encoding import data_url, encode_b64
from .metrics import Metrics
from .inputs import MAX_INPUT_IMAGES, as_rgb, check_remote_url, decode_data_url, edit_mask, fetch_image, open_image
from .protocol import (
    AssistantMessage,
    ChatBody,
    ChatChoice,
    ChatCompletionResponse,
    ChatImageParams,
    ChatUsage,
    HealthResponse,
    CompletedImageEvent,
    ImageData,
    ImageEditForm,
    ImageGenerationBody,
    ImagePart,
    ImagesResponse,
    ImageURL,
    ImageUsage,
    InputTokensDetails,
    ModelCard,
    ModelDefaults,
    ModelList,
    PartialImageEvent,
    RuntimeInfo,
    SizeRange,
    error_body,
)
from .scheduler import Job, JobResult, QueueFull, Scheduler

log = logging.getLogger(__name__)

MB = 1 << 20


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event: its type, then its JSON on one data line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class ServerOptions:
    """Everything an operator sets on `omni serve` that the app needs (see its --help).
    served_model_name: the name reported; aliases: more names clients may send (vLLM's
    convention: `--served-model-name a b`; vLLM-Omni's benchmark client sends "default")."""

    served_model_name: str
    aliases: tuple[str, ...] = ()
    max_queue: int = 64
    max_batch_size: int = 4
    api_key: str | None = None
    max_body_bytes: int = 32 * MB  # bodies over it get 413 (edits carry images)
    body_timeout_s: float = 30.0  # a body that stalls longer gets 408
    max_prompt_tokens: int | None = None  # None: all the model reads
    max_megapixel_steps: float | None = 256.0  # width x height x n x steps / 1e6 per request
    request_timeout_s: float = 300.0  # from arrival to answer; past it: 504 and the work stops
    drain_timeout_s: float = 30.0  # on shutdown, how long the backlog may finish
    max_input_pixels: int = 4096 * 4096  # an edit's input image (and mask), read from its header before decoding
    allowed_image_hosts: tuple[str, ...] = ()  # chat image_url hosts this server may fetch from; none: data: URLs only
    keepalive_s: float = 5.0  # SSE comments this often while a stream waits
    disconnect_poll_s: float = 0.1  # how often a stream waiting on the worker looks for a disconnect and keep-alives


@dataclass(frozen=True)
class Admitted:
    """A request that passed every check and is queued: one job per input image (an edit of k
    images is k jobs of n images each; a generation is one), with its prompt tokens."""

    requests: list[GenerationRequest]
    jobs: list[Job]
    prompt_tokens: int
    image_tokens: int
    arrived: float

    @property
    def request(self) -> GenerationRequest:
        return self.requests[0]

    @property
    def images(self) -> int:
        return sum(r.n for r in self.requests)

    def usage(self, images: int | None = None) -> ImageUsage:
        out = self.image_tokens * (self.images if images is None else images)
        return ImageUsage(input_tokens=self.prompt_tokens, input_tokens_details=InputTokensDetails(text_tokens=self.prompt_tokens),
                          output_tokens=out, total_tokens=self.prompt_tokens + out)

    def describe(self) -> dict[str, str]:
        r = self.request
        return {"size": r.size, "quality": r.quality, "background": "opaque", "output_format": r.output_format}


SSE_EVENTS = {"generation": "image_generation", "edit": "image_edit"}


def internal_error(request_id: str) -> OmniError:
    """What a client sees of a server fault: no exception types, no messages; the log has them."""
    return OmniError(f"internal error (request {request_id}); the server log has the details", status=500)


async def client_gone(http_request: Any) -> None:
    """Returns once the client has disconnected: the ASGI http.disconnect, which uvicorn sends the
    moment the connection drops (the body was read by then, so nothing else comes). Waiting on it
    rather than polling is_disconnected() stops abandoned work at once. A caller without an ASGI
    receive (a Ray replica's RemoteRequest) never gets here: Ray cancels the call instead."""
    receive = getattr(http_request, "receive", None)
    if receive is None:
        await asyncio.get_running_loop().create_future()  # never set; cancelled with its waiter
    while (await receive())["type"] != "http.disconnect":
        pass


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

    def start(self, runtime: PipelineRuntime) -> None:
        """Serve `runtime`: its scheduler and worker, and the limits it sets."""
        # One cap for both: batching stops there, and a larger request runs in chunks of it
        # (a 10-image request is never one 10-image call that could run out of memory).
        cap = runtime.max_batch(self.options.max_batch_size)
        scheduler = Scheduler(lambda reqs, stop, preview: runtime.generate(reqs, cap, stop, preview), self.options.max_queue, cap, self._on_batch)
        scheduler.start()
        tokens = runtime.max_prompt_tokens
        if self.options.max_prompt_tokens:
            tokens = min(tokens, self.options.max_prompt_tokens)
        self.caps = RequestCaps(tokens, self.options.max_megapixel_steps)
        self.scheduler, self.runtime = scheduler, runtime
        log.info("ready: %s", runtime.describe())

    def load_in_background(self) -> threading.Thread:
        def run() -> None:
            try:
                self.start(self.load())
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
        names = (self.options.served_model_name, *self.options.aliases)
        if model is not None and model not in names:
            raise RequestError(f"model {model!r} is not served here; this server serves {', '.join(map(repr, names))}", "model")

    def retry_after(self) -> int:
        """Seconds until the queue has room, from the recent batch time."""
        per_batch = self.batch_seconds_ema or 1.0
        depth = self.scheduler.depth() if self.scheduler else 0
        return max(1, min(120, math.ceil(per_batch * depth / max(1, self.options.max_batch_size))))

    def runtime_info(self) -> RuntimeInfo | None:
        return RuntimeInfo(**self.runtime.describe()) if self.runtime and not self.draining else None

    async def health(self) -> HealthResponse:
        info = self.runtime_info()
        if info is None:
            raise OmniError(self.not_ready_message(), status=503)
        return HealthResponse(model=self.options.served_model_name, **info.model_dump())

    async def list_models(self) -> ModelList:
        return self.models()

    async def render_metrics(self) -> bytes:
        if self.scheduler:
            self.metrics.queue_depth.set(self.scheduler.depth())
        return self.metrics.render()

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
                "size_limits": SizeRange(**rt.limits.bounds()),
                "max_batch": rt.max_batch(self.options.max_batch_size),
                "max_prompt_tokens": self.caps.max_prompt_tokens,
                "max_megapixel_steps": self.caps.max_megapixel_steps,
            }
        card = ModelCard(id=self.options.served_model_name, object="model", created=self.created, owned_by="omni-trt", ready=rt is not None, **fields)
        return ModelList(object="list", data=[card])

    # ---- the shared request sequence ----

    async def admit(self, http_request: Request, model: str | None, prompt: Any, what: str, prompt_param: str = "prompt",
                    stream: bool = False, inputs: list[tuple[Any, Any]] | None = None, **fields: Any) -> Admitted:
        """ready -> check model -> resolve and bound -> queue. Every refusal (4xx, 429, 503)
        happens here, before a response (or a stream) starts. inputs: an edit's (image, mask)
        pairs, each edited on its own with the next n seeds."""
        arrived = time.monotonic()
        runtime, scheduler = self.ready()
        self.check_model(model)
        inputs = inputs or [(None, None)]
        if inputs[0][0] is not None and runtime.edit_unavailable:
            raise ComponentNotBuilt(runtime.edit_unavailable)
        # An id the caller chose (Ray Serve's ingress passes its own, so logs and headers agree), else ours.
        request_id = getattr(http_request, "request_id", None) or uuid.uuid4().hex
        requests: list[GenerationRequest] = []
        try:
            for j, (image, mask) in enumerate(inputs):
                if j:
                    fields["seed"] = (requests[0].seed + j * requests[0].n) % SEED_LIMIT
                requests.append(resolve(runtime.family, prompt, limits=runtime.limits, caps=self.caps, image=image, mask=mask,
                                        request_id=request_id if not j else f"{request_id}-{j}", **fields))
        except RequestError as e:
            if e.param == "prompt":
                e.param = prompt_param
            raise
        req = requests[0]
        tokens = await self._check_tokens(runtime, req, prompt_param)
        log.info("request %s %s n=%d %dx%d steps=%d seed=%d%s%s", req.request_id, what, req.n, req.width, req.height, req.steps,
                 req.seed, f" {req.task} images={len(requests)} strength={req.strength:g}" if req.image is not None else "",
                 f" stream partial_images={req.partial_images}" if stream else "")
        jobs: list[Job] = []
        try:
            for r in requests:
                jobs.append(scheduler.submit(r, stream=stream))
        except OmniError as e:
            for job in jobs:  # all or nothing
                scheduler.cancel(job, Cancelled("a later part of the request was refused", status=e.status))
            if isinstance(e, QueueFull):
                e.headers = {"Retry-After": str(self.retry_after())}
            raise
        self.metrics.queue_depth.set(scheduler.depth())
        return Admitted(requests, jobs, tokens, runtime.family.image_tokens(req.width, req.height), arrived)

    async def generate(self, http_request: Request, model: str | None, prompt: Any, what: str, prompt_param: str = "prompt",
                       **fields: Any) -> tuple[Admitted, list[str]]:
        """admit -> wait -> encode: the request and its images, base64, in order."""
        a = await self.admit(http_request, model, prompt, what, prompt_param, **fields)
        images = await self._wait(a, http_request)
        return a, await self._encode(images, a.request.output_format, a.request.output_compression)

    async def _check_tokens(self, runtime: PipelineRuntime, req: GenerationRequest, prompt_param: str) -> int:
        """Prompts the model cannot read whole are refused before they are queued (the pipelines
        would truncate them silently, or fail on a short config). Counted off the event loop.
        Returns the prompt's tokens (OpenAI's usage.input_tokens)."""
        most = self.caps.max_prompt_tokens
        loop = asyncio.get_running_loop()
        counted = 0
        for param, text in ((prompt_param, req.prompt), ("negative_prompt", req.negative_prompt)):
            if text is None:
                continue
            tokens = await loop.run_in_executor(self.encode_pool, runtime.prompt_tokens, text)
            if most is not None and tokens > most:
                raise RequestError(f"{param} is {tokens} tokens; this model reads at most {most}: shorten it", param)
            counted = counted or tokens
        return counted

    def _image_fields(self, body: ImageGenerationBody) -> dict[str, Any]:
        return dict(size=body.size, n=body.n, steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
                    true_cfg_scale=body.true_cfg_scale, negative_prompt=body.negative_prompt, seed=body.seed,
                    output_format=body.output_format, output_compression=body.output_compression,
                    quality=body.quality, background=body.background)

    async def create_images(self, http_request: Request, body: ImageGenerationBody) -> tuple[ImagesResponse, dict[str, str]]:
        a, images = await self.generate(http_request, body.model, body.prompt, f"images user={escape(body.user)}", **self._image_fields(body))
        response = ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=b) for b in images], usage=a.usage(), **a.describe())
        return response, self.headers(a)

    async def stream_images(self, http_request: Request, body: ImageGenerationBody) -> tuple[AsyncIterator[str], dict[str, str]]:
        """Admitted (or refused with a JSON 4xx) before the first event; then the events."""
        a = await self.admit(http_request, body.model, body.prompt, f"images user={escape(body.user)}", stream=True,
                             partial_images=body.partial_images, **self._image_fields(body))
        return self._events(a, http_request, "generation"), self.headers(a)

    async def _edit_inputs(self, files: list[tuple[str, bytes]], mask: bytes | None) -> list[tuple[Any, Any]]:
        """Decoded (image, mask) pairs, off the event loop; the mask goes with every image and
        must have the first one's size."""
        if not files:
            raise RequestError("send the image to edit: a file in `image` (or up to 16 in `image[]`)", "image")
        if len(files) > MAX_INPUT_IMAGES:
            raise RequestError(f"{len(files)} images: at most {MAX_INPUT_IMAGES} per request", "image")
        loop = asyncio.get_running_loop()
        most = self.options.max_input_pixels

        def decode() -> list[tuple[Any, Any]]:
            images = [as_rgb(open_image(data, param, most)) for param, data in files]
            m = edit_mask(mask, images[0].size, most) if mask is not None else None
            return [(im, m) for im in images]

        return await loop.run_in_executor(self.encode_pool, decode)

    def _edit_fields(self, form: ImageEditForm) -> dict[str, Any]:
        return dict(size=form.size, n=form.n, steps=form.num_inference_steps, guidance_scale=form.guidance_scale,
                    true_cfg_scale=form.true_cfg_scale, negative_prompt=form.negative_prompt, seed=form.seed,
                    output_format=form.output_format, output_compression=form.output_compression,
                    quality=form.quality, background=form.background, strength=form.strength)

    async def create_edit(self, http_request: Request, form: ImageEditForm, files: list[tuple[str, bytes]],
                          mask: bytes | None) -> tuple[ImagesResponse, dict[str, str]]:
        self.ready()
        inputs = await self._edit_inputs(files, mask)
        a, images = await self.generate(http_request, form.model, form.prompt, f"edit user={escape(form.user)}", inputs=inputs,
                                        **self._edit_fields(form))
        response = ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=b) for b in images], usage=a.usage(), **a.describe())
        return response, self.headers(a)

    async def stream_edit(self, http_request: Request, form: ImageEditForm, files: list[tuple[str, bytes]],
                          mask: bytes | None) -> tuple[AsyncIterator[str], dict[str, str]]:
        self.ready()
        inputs = await self._edit_inputs(files, mask)
        a = await self.admit(http_request, form.model, form.prompt, f"edit user={escape(form.user)}", stream=True, inputs=inputs,
                             partial_images=form.partial_images, **self._edit_fields(form))
        return self._events(a, http_request, "edit"), self.headers(a)

    async def _chat_images(self, urls: list[str]) -> list[tuple[str, bytes]]:
        """The bytes of a chat's image_url parts: data: URLs, or http(s) from allowed hosts."""
        out = []
        for i, url in enumerate(urls):
            param = "messages"
            if url.startswith("data:"):
                out.append((param, decode_data_url(url, param)))
                continue
            check_remote_url(url, self.options.allowed_image_hosts, param)
            loop = asyncio.get_running_loop()
            out.append((param, await loop.run_in_executor(self.encode_pool, fetch_image, url, self.options.max_body_bytes,
                                                          self.options.body_timeout_s, param)))
        return out

    async def create_chat(self, http_request: Request, body: ChatBody) -> tuple[ChatCompletionResponse, dict[str, str]]:
        self.ready()
        self.check_model(body.model)
        prompt = body.prompt()
        if not prompt:
            raise RequestError("no user text in messages: send a message with role 'user' and text content", "messages")
        try:
            p = ChatImageParams.model_validate(body.params())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        urls = body.image_urls()
        # A user image makes the chat an edit of it (vLLM-Omni's chat clients ask for edits so).
        inputs = await self._edit_inputs(await self._chat_images(urls), None) if urls else None
        a, images = await self.generate(
            http_request, body.model, prompt, "chat", prompt_param="messages", size=p.size, width=p.width, height=p.height,
            n=p.num_outputs_per_prompt, steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
            true_cfg_scale=p.true_cfg_scale, negative_prompt=p.negative_prompt, seed=p.seed, output_format=p.output_format,
            output_compression=p.output_compression, quality=p.quality, background=p.background, inputs=inputs,
            strength=p.strength,
        )
        fmt = a.request.output_format
        parts = [ImagePart(image_url=ImageURL(url=data_url(b, fmt))) for b in images]
        response = ChatCompletionResponse(
            id=f"chatcmpl-{a.request.request_id}", created=int(time.time()), model=self.options.served_model_name,
            choices=[ChatChoice(message=AssistantMessage(content=parts))],
            usage=ChatUsage(prompt_tokens=a.prompt_tokens, completion_tokens=a.usage().output_tokens,
                            total_tokens=a.usage().total_tokens),
        )
        return response, self.headers(a)

    def headers(self, a: Admitted) -> dict[str, str]:
        """Response headers of an admitted request (its id; under Ray, also the replica)."""
        return {"X-Request-Id": a.request.request_id}

    def _abandon(self, a: Admitted, reason: Cancelled) -> None:
        """Cancel a request whose client left or whose deadline passed (every unfinished part of
        it); counted by why and where."""
        for job, req in zip(a.jobs, a.requests):
            if job.future.done():
                continue
            queued = self.scheduler.cancel(job, reason)
            where = "queued" if queued else "running"
            self.metrics.cancelled.labels(reason="disconnect" if reason.status == 499 else "deadline", where=where).inc()
            if queued and reason.status == 499:
                self.metrics.dropped.inc()
            log.info("request %s cancelled while %s: %s", req.request_id, where, reason)

    def _deadline_passed(self, a: Admitted) -> Cancelled | None:
        if time.monotonic() <= a.arrived + self.options.request_timeout_s:
            return None
        return Cancelled(f"the request took longer than this server's limit of {self.options.request_timeout_s:g} s; "
                         "ask for less (fewer images or steps, a smaller size) or retry later", status=504)

    def _result(self, job: Job) -> JobResult:
        """The job's result, or its error as what the client may see."""
        outcome = job.future.result()
        if outcome.error is None:
            return outcome.result
        if isinstance(outcome.error, OmniError):  # the request's own fault, a deadline, a shutdown
            raise outcome.error
        # A fault, logged with its traceback by the worker. Answered here rather than by the
        # catch-all handler: Starlette re-raises after that one responds, and uvicorn then
        # closes the connection under the client.
        raise internal_error(job.request.request_id)

    async def _wait(self, a: Admitted, http_request: Request) -> list[Any]:
        """Wait for the jobs; their images in order. A client that leaves, or a deadline that
        passes, cancels what is left: dropped while queued, stopped at the next step while running."""
        images: list[Any] = []
        gone = asyncio.ensure_future(client_gone(http_request))
        try:
            for job in a.jobs:
                while not job.future.done():
                    left = a.arrived + self.options.request_timeout_s - time.monotonic()
                    await asyncio.wait({job.future, gone}, timeout=max(0.01, left), return_when=asyncio.FIRST_COMPLETED)
                    if job.future.done():
                        break
                    if gone.done():
                        raise Cancelled("the client disconnected", status=499)
                    reason = self._deadline_passed(a)
                    if reason is not None:
                        raise reason
                images += self._result(job).images
        except Cancelled as reason:
            self._abandon(a, reason)
            raise
        except asyncio.CancelledError:  # the caller gave up on us (a Ray Serve ingress whose client left)
            self._abandon(a, Cancelled("the client disconnected", status=499))
            raise
        except OmniError:
            self._abandon(a, Cancelled("another part of the request failed", status=500))
            raise
        finally:
            gone.cancel()
        return images

    async def _events(self, a: Admitted, http_request: Request, kind: str) -> AsyncIterator[str]:
        """The SSE stream: comments while queued (keep-alives), a partial_image event per
        preview as the worker makes it, then one completed event per image; an `error` event
        (the error shape) if it fails after the stream began. A client that leaves cancels it.
        The parts of an edit of several images follow each other, image_index counting on."""
        prefix = SSE_EVENTS[kind]
        state = {"last_sent": time.monotonic()}
        finished = False
        try:
            offset = 0
            for job, req in zip(a.jobs, a.requests):
                async for event in self._job_events(a, job, req, offset, prefix, http_request, state):
                    yield event
                    if event.startswith("event: error"):
                        finished = True
                        return
                offset += req.n
            finished = True
        except Cancelled as reason:  # the client left, or the deadline passed
            finished = True
            self._abandon(a, reason)
            if reason.status != 499:
                yield sse("error", error_body(reason.status, reason.message))
        finally:
            if not finished:  # the response was closed under us
                self._abandon(a, Cancelled("the client disconnected", status=499))

    async def _job_events(self, a: Admitted, job: Job, req: GenerationRequest, offset: int, prefix: str, http_request: Request,
                          state: dict[str, float]) -> AsyncIterator[str]:
        while True:
            get = asyncio.ensure_future(job.previews.get())
            done, _ = await asyncio.wait({get, job.future}, timeout=self.options.disconnect_poll_s)
            if get in done:
                image, partial, picture = get.result()
                b64 = (await self._encode([picture], req.output_format, req.output_compression))[0]
                event = PartialImageEvent(type=f"{prefix}.partial_image", b64_json=b64, partial_image_index=partial, image_index=offset + image,
                                          created_at=int(time.time()), **a.describe())
                yield sse(f"{prefix}.partial_image", event.model_dump())
                state["last_sent"] = time.monotonic()
                continue
            get.cancel()
            if job.future.done() and job.previews.empty():
                try:
                    result = self._result(job)
                except OmniError as e:
                    self._abandon(a, Cancelled("another part of the request failed", status=500))
                    yield sse("error", error_body(e.status, e.message, param=e.param))
                    return
                encoded = await self._encode(result.images, req.output_format, req.output_compression)
                for i, b64 in enumerate(encoded):
                    event = CompletedImageEvent(type=f"{prefix}.completed", b64_json=b64, image_index=offset + i, created_at=int(time.time()), usage=a.usage(1),
                                                **a.describe())
                    yield sse(f"{prefix}.completed", event.model_dump())
                state["last_sent"] = time.monotonic()
                return
            if job.future.done():
                continue  # previews still queued: they go first
            if await http_request.is_disconnected():
                raise Cancelled("the client disconnected", status=499)
            reason = self._deadline_passed(a)
            if reason is not None:
                raise reason
            if time.monotonic() - state["last_sent"] >= self.options.keepalive_s:
                yield ": keep-alive\n\n"  # an SSE comment: proxies and clients see the stream is alive
                state["last_sent"] = time.monotonic()

    async def _encode(self, images: list[Any], fmt: str, compression: int | None) -> list[str]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await asyncio.gather(*(loop.run_in_executor(self.encode_pool, encode_b64, im, fmt, compression) for im in images))
        self.metrics.stage.labels(stage="encode").observe(time.perf_counter() - t0)
        return list(out)
