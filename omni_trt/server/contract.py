"""The serving contract: what the routes, the app and `omni serve` depend on, and what the local
serving object (server/serving.py) and the Ray client (server/ray/client.py) both implement.

A `Caller` is all the serving side knows of the HTTP request: its id and an awaitable that
returns once the client has left. Below the routes no Starlette request travels."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:  # kept light: `omni --help` reads the defaults below
    from .metrics import Metrics
    from .protocol import ChatBody, HealthResponse, ImageEditForm, ImageGenerationBody, ModelList

MB = 1 << 20
# Defined once: ServerOptions, `omni serve`'s flags and the Ray config builder read these.
MAX_QUEUE = 64
MAX_BATCH_SIZE = 4
DRAINING = "the server is shutting down; retry on another replica or later"
# Always accepted as the served model's name, never listed: vLLM-Omni's benchmark client sends it.
# The image routes, as metrics label what each request came by.
GENERATIONS, EDITS, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"
DEFAULT_MODEL = "default"

T = TypeVar("T")


@dataclass(frozen=True)
class ServerOptions:
    """Everything an operator sets on `omni serve` that the app needs (see its --help).
    served_model_name: the name reported; aliases: more names clients may send (vLLM's
    convention: `--served-model-name a b`); DEFAULT_MODEL is accepted besides."""

    served_model_name: str
    aliases: tuple[str, ...] = ()
    max_queue: int = MAX_QUEUE
    max_batch_size: int = MAX_BATCH_SIZE
    api_key: str | None = None
    max_body_bytes: int = 32 * MB  # bodies over it get 413 (edits carry images)
    body_timeout_s: float = 30.0  # a body that stalls longer gets 408
    body_total_timeout_s: float = 120.0  # ... and one that takes longer in all
    max_prompt_tokens: int | None = None  # None: all the model reads
    max_megapixel_steps: float | None = 256.0  # width x height x n x steps / 1e6 per request
    request_timeout_s: float = 300.0  # from arrival to answer; past it: 504 and the work stops
    drain_timeout_s: float = 30.0  # on shutdown, how long the backlog may finish
    max_input_pixels: int = 4096 * 4096  # an edit's input image (and mask), read from its header before decoding
    allowed_image_hosts: tuple[str, ...] = ()  # chat image_url hosts this server may fetch from; none: data: URLs only
    keepalive_s: float = 5.0  # SSE comments this often while a stream has nothing to send


async def never() -> None:
    """A client whose leaving arrives as a cancellation instead (a Ray replica's caller, or one
    behind Ray's proxy): waits until cancelled with its waiter."""
    await asyncio.get_running_loop().create_future()


@dataclass(frozen=True)
class Caller:
    """Who asked: the request id (None: the serving side makes one) and `gone`, which makes a
    fresh awaitable each call that returns once the client has disconnected."""

    request_id: str | None = None
    gone: Callable[[], Awaitable[None]] = never

    async def race(self, work: Awaitable[T]) -> T:
        """`work`'s result, unless the client leaves first: then `work` is cancelled and
        Cancelled(499) raised."""
        from ..errors import Cancelled

        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(self.gone())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise Cancelled("the client disconnected", status=499)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nobody reads it now


def http_caller(request: Any, request_id: str | None = None) -> Caller:
    """The Caller of a request under uvicorn: `gone` awaits the ASGI http.disconnect, which uvicorn
    sends the moment the connection drops (the body was read by then, so nothing else comes).
    Awaiting it rather than polling stops abandoned work at once."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return Caller(request_id, gone)


Answer = tuple[Any, dict[str, str]]  # a response model and its headers
Stream = tuple[AsyncIterator[str], dict[str, str]]  # SSE text and the response headers
EditFiles = list[tuple[str, bytes]]  # (form field, bytes) of each input image


@runtime_checkable
class Serving(Protocol):
    """One serving object per app. Every refusal (4xx, 429, 503) is raised before a response or
    a stream begins; a stream's later failure is an `error` event."""

    options: ServerOptions
    metrics: Metrics  # the app's HTTP counters live here
    draining: str | None  # why new work is refused, once shutdown began
    load_error: str | None  # why the model could not be served; the server exits

    @property
    def loaded(self) -> bool:
        """Serving a model (so a shutdown drains rather than closing at once)."""

    def load(self) -> None:
        """Blocking, run by the app's lifespan in a thread once the server listens (clients get
        503 meanwhile); a failure is recorded in load_error, never raised."""

    async def drain(self, timeout: float | None = None) -> None:
        """Shutdown, first half: refuse new work (503), let what is under way finish for up to
        `timeout` seconds (default: the options'), then answer what is left with 503."""

    def stop(self) -> None: ...

    async def health(self) -> HealthResponse: ...

    async def models(self) -> ModelList: ...

    async def render_metrics(self) -> bytes: ...

    async def create_images(self, caller: Caller, body: ImageGenerationBody) -> Answer: ...

    async def stream_images(self, caller: Caller, body: ImageGenerationBody) -> Stream: ...

    async def create_edit(self, caller: Caller, form: ImageEditForm, files: EditFiles, mask: bytes | None) -> Answer: ...

    async def stream_edit(self, caller: Caller, form: ImageEditForm, files: EditFiles, mask: bytes | None) -> Stream: ...

    async def create_chat(self, caller: Caller, body: ChatBody) -> Answer: ...

    async def stream_chat(self, caller: Caller, body: ChatBody) -> Stream: ...


def _request_calls(streamed: bool) -> tuple[str, ...]:
    """Serving's methods that carry one request (a Caller first), streamed or not: the Ray client
    forwards exactly these to a replica, which answers them with its local serving object. Read
    off the protocol, so a new endpoint cannot be forgotten on one path."""
    names = []
    for name, fn in vars(Serving).items():
        if inspect.iscoroutinefunction(fn) and list(inspect.signature(fn).parameters)[1:2] == ["caller"]:
            if name.startswith("stream_") == streamed:
                names.append(name)
    return tuple(names)


REQUEST_CALLS = _request_calls(streamed=False)
STREAM_CALLS = _request_calls(streamed=True)

__all__ = ["Answer", "Caller", "DEFAULT_MODEL", "DRAINING", "EditFiles", "MAX_BATCH_SIZE", "MAX_QUEUE", "REQUEST_CALLS", "STREAM_CALLS", "ServerOptions",
           "Serving", "Stream", "http_caller", "never"]
