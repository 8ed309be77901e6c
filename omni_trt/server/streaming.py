"""Server-sent events: the one event stream both paths use. The local server streams its jobs'
previews and images through it; the Ray client relays a replica's stream through it. Either way a
stream sends keep-alive comments while it has nothing to say, ends with an `error` event (the
error shape) when it fails after it began, and stops its work the moment the client leaves: it
awaits the caller's `gone`, it does not poll."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from ..errors import Cancelled, OmniError
from .admission import CLIENT_LEFT, Admitted, Deadline
from .contract import Caller
from .protocol import CompletedImageEvent, PartialImageEvent, error_body
from .scheduler import Job

KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: proxies and clients see the stream is alive
PREFIX = {"generation": "image_generation", "edit": "image_edit"}  # the event types' first word, by endpoint

Encode = Callable[[list[Any], str, "int | None"], Awaitable[list[str]]]  # PIL images -> base64, in order


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event: its type, then its JSON on one data line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def error_event(e: OmniError) -> str:
    return sse("error", error_body(e.status, e.message, param=e.param))


async def event_stream(source: AsyncIterator[str], caller: Caller, keepalive_s: float, abandon: Callable[[Cancelled], None],
                       deadline: Deadline | None = None) -> AsyncIterator[str]:
    """`source`'s events, with keep-alives after `keepalive_s` of silence. `abandon(reason)` stops
    the work behind the stream when it ends early: the client left (499, no event: nobody
    reads it), the deadline passed (504) or the source failed (an OmniError: its error event).
    A response closed under the stream counts as the client leaving."""
    finished = False
    pending: asyncio.Future | None = None
    gone = asyncio.ensure_future(caller.gone())
    last_sent = time.monotonic()
    try:
        while True:
            pending = pending or asyncio.ensure_future(source.__anext__())
            now = time.monotonic()
            wait = keepalive_s - (now - last_sent)
            if deadline is not None:
                wait = min(wait, deadline.at - now)
            await asyncio.wait({pending, gone}, timeout=max(0.01, wait), return_when=asyncio.FIRST_COMPLETED)
            if pending.done():
                step, pending = pending, None
                try:
                    text = step.result()
                except StopAsyncIteration:
                    finished = True
                    return
                except OmniError as e:  # a part failed: the rest of the request goes too
                    finished = True
                    abandon(Cancelled("another part of the request failed", status=500))
                    if e.status != 499:
                        yield error_event(e)
                    return
                yield text
                last_sent = time.monotonic()
                continue
            if gone.done():
                raise Cancelled(CLIENT_LEFT, status=499)
            late = deadline.passed() if deadline is not None else None
            if late is not None:
                raise late
            if time.monotonic() - last_sent >= keepalive_s:
                yield KEEP_ALIVE
                last_sent = time.monotonic()
    except Cancelled as reason:
        finished = True
        abandon(reason)
        if reason.status != 499:
            yield error_event(reason)
    finally:
        gone.cancel()
        if pending is not None:
            pending.cancel()
            # A source may still end with its own error once cancelled (a Ray stream answers the
            # cancellation with RequestCancelledError): nobody reads it now.
            pending.add_done_callback(lambda t: t.cancelled() or t.exception())
        if not finished:  # the response was closed under us
            abandon(Cancelled(CLIENT_LEFT, status=499))


async def job_images(a: Admitted, encode: Encode, result: Callable[[Job], list[Any]]) -> AsyncIterator[tuple[int, int | None, str]]:
    """An admitted request's images as its worker makes them, encoded: (image index, preview
    index, b64) per preview, then (image index, None, b64) per final image. The parts of an edit
    of several images follow each other, the image index counting on. A part that fails raises
    its error (`result` says which)."""
    offset = 0
    for job, req in zip(a.jobs, a.requests):
        while True:
            get = asyncio.ensure_future(job.previews.get())
            try:
                await asyncio.wait({get, job.future}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not get.done():
                    get.cancel()
            if get.done() and not get.cancelled():
                image, partial, picture = get.result()
                b64 = (await encode([picture], req.output_format, req.output_compression))[0]
                yield offset + image, partial, b64
                continue
            if not job.previews.empty():
                continue  # previews still queued: they go first
            encoded = await encode(result(job), req.output_format, req.output_compression)
            for i, b64 in enumerate(encoded):
                yield offset + i, None, b64
            break
        offset += req.n


async def job_events(a: Admitted, kind: str, encode: Encode, result: Callable[[Job], list[Any]]) -> AsyncIterator[str]:
    """An image endpoint's events: a partial_image event per preview, then one completed event per image."""
    prefix = PREFIX[kind]
    async for index, partial, b64 in job_images(a, encode, result):
        if partial is not None:
            event = PartialImageEvent(type=f"{prefix}.partial_image", b64_json=b64, partial_image_index=partial, image_index=index,
                                      created_at=int(time.time()), **a.describe())
            yield sse(event.type, event.model_dump())
        else:
            done = CompletedImageEvent(type=f"{prefix}.completed", b64_json=b64, image_index=index, created_at=int(time.time()),
                                       usage=a.usage(1), **a.describe())
            yield sse(done.type, done.model_dump())
