"""The local serving object (`ImageServing`, the contract's `Serving` over one runtime): what
every route shares (the runtime once loaded, admission, metrics, the encode pool), and the
translation of each endpoint's body into the runtime's requests and of their images into the
endpoint's response. Admission (server/admission.py) decides a request's fate; streaming
(server/streaming.py) turns it into events. Routes (server/routes.py) only call this, as vLLM's
OpenAI entrypoints do with their serving classes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..errors import ComponentNotBuilt, OmniError, RequestError
from ..logs import escape
from ..lora import describe
from ..runtime.pipeline import PipelineRuntime
from ..runtime.request import SEED_LIMIT, check_text, edit_inputs, GenerationRequest, ImageAsk, RequestCaps, resolve
from .adapters import adapter_cards, adapter_names, request_adapters
from .admission import Admission, Admitted
from .chat import ChatShape, chat_chunks, chat_request, chat_response
from .contract import CHAT, DEFAULT_MODEL, EDITS, GENERATIONS, Answer, Caller, EditFiles, ServerOptions, Stream
from .encoding import encode_b64
from .inputs import MAX_INPUT_IMAGES, as_rgb, check_remote_url, decode_data_url, edit_mask, fetch_image, open_image
from .metrics import Metrics
from .protocol import (
    ChatBody,
    ChatUsage,
    HealthResponse,
    ImageData,
    ImageEditForm,
    ImageGenerationBody,
    ImagesResponse,
    ModelDefaults,
    ModelList,
    RuntimeInfo,
    SizeRange,
)
from .scheduler import Scheduler
from .streaming import event_stream, job_events, job_images

log = logging.getLogger(__name__)

def user_text(user: str | None) -> str:
    """The `user` field as logged: valid Unicode (the prompt's rule, 422 naming it), escaped."""
    return escape(None if user is None else check_text("user", user))


Inputs = list[tuple[Any, Any]]  # an edit's (image, mask) pairs; [(None, None)] for a generation


class ImageServing:
    """Serving over one runtime, loaded by `load` (the app runs it in a thread once the server
    listens, so clients see 503 "not initialized" rather than a refused connection)."""

    def __init__(self, options: ServerOptions, load: Callable[[], PipelineRuntime]) -> None:
        self.options = options
        self._load = load
        self.metrics = Metrics()
        self.admission = Admission(options, self.metrics)
        self.runtime: PipelineRuntime | None = None
        self.caps = RequestCaps(options.max_prompt_tokens, options.max_megapixel_steps)
        self.load_error: str | None = None
        self.created = int(time.time())
        self.encode_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="omni-encode")

    # ---- lifecycle ----

    @property
    def loaded(self) -> bool:
        return self.runtime is not None

    @property
    def draining(self) -> str | None:
        return self.admission.draining

    @property
    def scheduler(self) -> Scheduler | None:
        return self.admission.scheduler

    def load(self) -> None:
        try:
            self.start(self._load())
        except BaseException as e:  # noqa: BLE001 - reported to the operator; the server stops
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("model failed to load: %s", self.load_error)

    def start(self, runtime: PipelineRuntime) -> None:
        """Serve `runtime`: its scheduler and worker, and the limits it sets."""
        self.admission.start(runtime)
        tokens = runtime.max_prompt_tokens
        if self.options.max_prompt_tokens:
            tokens = min(tokens, self.options.max_prompt_tokens)
        self.caps = RequestCaps(tokens, self.options.max_megapixel_steps)
        self.runtime = runtime
        log.info("ready: %s", runtime.describe())

    async def drain(self, timeout: float | None = None) -> None:
        await self.admission.drain(timeout)

    def stop(self) -> None:
        self.admission.stop()
        self.encode_pool.shutdown(wait=False, cancel_futures=True)

    # ---- state ----

    def _ready(self) -> PipelineRuntime:
        if self.runtime is None or self.draining:
            raise OmniError(self._not_ready(), status=503, headers={"Retry-After": "5"})
        return self.runtime

    def _not_ready(self) -> str:
        if self.draining:
            return self.draining
        why = f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
        return f"Model not initialized ({why})"

    def _check_model(self, model: str | None) -> None:
        names = (self.options.served_model_name, *self.options.aliases)
        if model is not None and model not in names and model != DEFAULT_MODEL and model not in adapter_names(self.runtime):
            raise RequestError(f"model {model!r} is not served here; this server serves {', '.join(map(repr, names))}", "model")

    def _runtime_info(self) -> RuntimeInfo | None:
        return RuntimeInfo(**self.runtime.describe()) if self.runtime and not self.draining else None

    async def health(self) -> HealthResponse:
        info = self._runtime_info()
        if info is None:
            raise OmniError(self._not_ready(), status=503)
        return HealthResponse(model=self.options.served_model_name, **info.model_dump())

    async def render_metrics(self) -> bytes:
        if self.scheduler:
            self.metrics.queue_depth.set(self.scheduler.depth())
        return self.metrics.render()

    async def models(self) -> ModelList:
        """The model card; runtime fields only once loaded (served with exclude_unset)."""
        fields: dict[str, Any] = {}
        rt = self.runtime
        if rt is not None:
            d = rt.family.defaults
            fields = {
                **rt.describe(),
                "defaults": ModelDefaults(size=f"{d.width}x{d.height}", num_inference_steps=d.steps, guidance_scale=d.guidance_scale,
                                          true_cfg_scale=d.true_cfg_scale),
                "sizes": rt.limits.describe(),
                "size_limits": SizeRange(**rt.limits.bounds()),
                "max_batch": rt.max_batch(self.options.max_batch_size),
                "max_prompt_tokens": self.caps.max_prompt_tokens,
                "max_megapixel_steps": self.caps.max_megapixel_steps,
                "input_images": "optional" if rt.family.edits.generations else "required",
            }
        cards = ModelList.one(self.options.served_model_name, self.created, rt is not None, **fields)
        return cards.with_adapters(adapter_cards(rt, self.options.served_model_name))

    # ---- the endpoints ----

    async def create_images(self, caller: Caller, body: ImageGenerationBody) -> Answer:
        a = await self._admit(caller, body.model, body.ask(), f"images user={user_text(body.user)}", GENERATIONS)
        return await self._images_response(a, caller)

    async def stream_images(self, caller: Caller, body: ImageGenerationBody) -> Stream:
        a = await self._admit(caller, body.model, body.ask(), f"images user={user_text(body.user)}", GENERATIONS, stream=True)
        return self._events(a, caller, job_events(a, "generation", self._encode, self.admission.result)), self._headers(a)

    async def create_edit(self, caller: Caller, form: ImageEditForm, files: EditFiles, mask: bytes | None) -> Answer:
        self._ready()
        inputs = await self._edit_inputs(files, mask)
        a = await self._admit(caller, form.model, form.ask(), f"edit user={user_text(form.user)}", EDITS, inputs=inputs)
        return await self._images_response(a, caller)

    async def stream_edit(self, caller: Caller, form: ImageEditForm, files: EditFiles, mask: bytes | None) -> Stream:
        self._ready()
        inputs = await self._edit_inputs(files, mask)
        a = await self._admit(caller, form.model, form.ask(), f"edit user={user_text(form.user)}", EDITS, stream=True, inputs=inputs)
        return self._events(a, caller, job_events(a, "edit", self._encode, self.admission.result)), self._headers(a)

    async def create_chat(self, caller: Caller, body: ChatBody) -> Answer:
        a, shape = await self._admit_chat(caller, body, stream=False)
        images = await self._finished(a, caller)
        return chat_response(shape, images), self._headers(a)

    async def stream_chat(self, caller: Caller, body: ChatBody) -> Stream:
        a, shape = await self._admit_chat(caller, body, stream=True)
        usage = body.stream_options is not None and body.stream_options.include_usage
        source = chat_chunks(shape, job_images(a, self._encode, self.admission.result), usage)
        return self._events(a, caller, source), self._headers(a)

    async def _admit_chat(self, caller: Caller, body: ChatBody, stream: bool) -> tuple[Admitted, ChatShape]:
        self._ready()
        self._check_model(body.model)
        prompt, params, urls = chat_request(body)
        # A user image makes the chat an edit of it (vLLM-Omni's chat clients ask for edits so).
        inputs = await self._edit_inputs(await self._chat_images(urls), None) if urls else None
        a = await self._admit(caller, body.model, params.ask(prompt), "chat", CHAT, stream=stream, inputs=inputs)
        usage = a.usage()
        shape = ChatShape(f"chatcmpl-{a.request.request_id}", self.options.served_model_name, params.n, params.num_outputs_per_prompt,
                          a.request.output_format, ChatUsage(prompt_tokens=a.prompt_tokens, completion_tokens=usage.output_tokens,
                                                             total_tokens=usage.total_tokens))
        return a, shape

    # ---- the shared request sequence ----

    async def _admit(self, caller: Caller, model: str | None, ask: ImageAsk, what: str, route: str, stream: bool = False,
                     inputs: Inputs | None = None) -> Admitted:
        """ready -> check model -> resolve and bound -> queue. Every refusal (4xx, 429, 503)
        happens here, before a response (or a stream) starts. Each input image of an edit is
        its own request, with the next n seeds."""
        arrived = time.monotonic()
        runtime = self._ready()
        self._check_model(model)
        inputs = edit_inputs(runtime.family, inputs or [(None, None)])
        if inputs[0][0] is not None and runtime.edit_unavailable:
            raise ComponentNotBuilt(runtime.edit_unavailable)
        request_id = caller.request_id or uuid.uuid4().hex
        requests: list[GenerationRequest] = []
        for j, (image, mask) in enumerate(inputs):
            if j:
                ask = dataclasses.replace(ask, seed=(requests[0].seed + j * requests[0].n) % SEED_LIMIT)
            requests.append(resolve(runtime.family, ask, limits=runtime.limits, caps=self.caps, image=image, mask=mask,
                                    request_id=request_id if not j else f"{request_id}-{j}", cache=runtime.cache_settings, route=route))
        lora = await request_adapters(runtime, ask.lora, model, self.encode_pool)
        requests = [dataclasses.replace(r, lora=lora) for r in requests] if lora else requests
        req = requests[0]
        tokens = await self._check_tokens(runtime, req, ask.prompt_param)
        log.info("request %s %s n=%d %dx%d steps=%d seed=%d%s%s%s", req.request_id, what, req.n, req.width, req.height, req.steps,
                 req.seed, f" {req.task} images={len(requests)} strength={req.strength:g}" if req.image is not None else "",
                 f" stream partial_images={req.partial_images}" if stream else "", f" lora={describe(lora)}" if lora else "")
        jobs = self.admission.submit(requests, stream)
        return Admitted(requests, jobs, tokens, runtime.family.image_tokens(req.width, req.height), arrived,
                        show_steps=runtime.step_cache is not None)

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

    async def _finished(self, a: Admitted, caller: Caller) -> list[str]:
        """The request's images once made, encoded (base64) in order."""
        return await self._encode(await self.admission.wait(a, caller), a.request.output_format, a.request.output_compression)

    async def _images_response(self, a: Admitted, caller: Caller) -> Answer:
        images = await self._finished(a, caller)
        response = ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=b) for b in images], usage=a.usage(), **a.describe())
        return response, self._headers(a)

    def _events(self, a: Admitted, caller: Caller, source: Any) -> Any:
        return event_stream(source, caller, self.options.keepalive_s, lambda reason: self.admission.abandon(a, reason),
                            self.admission.deadline(a))

    def _headers(self, a: Admitted) -> dict[str, str]:
        return {"X-Request-Id": a.request.request_id}

    async def _edit_inputs(self, files: EditFiles, mask: bytes | None) -> Inputs:
        """Decoded (image, mask) pairs, off the event loop; the mask goes with every image and
        must have the first one's size."""
        if not files:
            raise RequestError("send the image to edit: a file in `image` (or up to 16 in `image[]`)", "image")
        if len(files) > MAX_INPUT_IMAGES:
            raise RequestError(f"{len(files)} images: at most {MAX_INPUT_IMAGES} per request", "image")
        most = self.options.max_input_pixels

        def decode() -> Inputs:
            images = [as_rgb(open_image(data, param, most)) for param, data in files]
            m = edit_mask(mask, images[0].size, most) if mask is not None else None
            return [(im, m) for im in images]

        return await asyncio.get_running_loop().run_in_executor(self.encode_pool, decode)

    async def _chat_images(self, urls: list[str]) -> EditFiles:
        """The bytes of a chat's image_url parts: data: URLs, or http(s) from allowed hosts."""
        out = []
        for url in urls:
            param = "messages"
            if url.startswith("data:"):
                out.append((param, decode_data_url(url, param)))
                continue
            check_remote_url(url, self.options.allowed_image_hosts, param)
            loop = asyncio.get_running_loop()
            out.append((param, await loop.run_in_executor(self.encode_pool, fetch_image, url, self.options.max_body_bytes,
                                                          self.options.body_timeout_s, param)))
        return out

    async def _encode(self, images: list[Any], fmt: str, compression: int | None) -> list[str]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await asyncio.gather(*(loop.run_in_executor(self.encode_pool, encode_b64, im, fmt, compression) for im in images))
        self.metrics.stage.labels(stage="encode").observe(time.perf_counter() - t0)
        return list(out)
