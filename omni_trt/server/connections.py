"""What a connection may cost before any request reaches the app, at the asyncio level (under
uvicorn's HTTP parser, httptools or h11 alike): its request headers must arrive whole within
`header_timeout` seconds (408, then the socket closes) and within `max_header_bytes` (431); and
when the connection cap is reached, the oldest connection with no request under way is closed
to make room, so idle or trickling sockets cannot lock everyone out (/health included)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .protocol import error_body

END_OF_HEAD = b"\r\n\r\n"


def error_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response in the error shape that closes the connection."""
    body = json.dumps(error_body(status, message)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


def head_length(seen: int, tail: bytes, data: bytes) -> tuple[int, bool]:
    """(header bytes so far, whether the head ended) after `data`, given `seen` bytes before it
    whose last three are `tail` (the end of the head may straddle two reads). Pure."""
    joined = tail + data
    end = joined.find(END_OF_HEAD)
    if end < 0:
        return seen + len(data), False
    return seen - len(tail) + end + len(END_OF_HEAD), True


def guarded(base: type[asyncio.Protocol], header_timeout: float, max_header_bytes: int, max_connections: int | None) -> type:
    """`base` (uvicorn's HTTP protocol class) with the limits above."""

    class Guarded(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._busy = False
            self._opened = self.loop.time()
            self._expect_head()
            self._start_head_timer()  # a socket that sends nothing is timed too
            if max_connections is not None:
                _make_room(self, max_connections)

        def _expect_head(self) -> None:
            self._head_seen, self._head_tail, self._in_head, self._head_timer = 0, b"", True, None

        def _start_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout, self._head_too_slow)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _refuse(self, status: int, reason: str, message: str) -> None:
            self._stop_head_timer()
            if not self.transport.is_closing():
                self.transport.write(error_response(status, reason, message))
                self.transport.close()

        def _head_too_slow(self) -> None:
            self._head_timer = None
            self._refuse(408, "Request Timeout", f"the request headers took longer than this server's {header_timeout:g} s")

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                if self._head_timer is None:  # the next request on a kept-alive connection begins
                    self._start_head_timer()
                self._head_seen, ended = head_length(self._head_seen, self._head_tail, data)
                self._head_tail = (self._head_tail + data)[-3:]
                if self._head_seen > max_header_bytes:
                    self._refuse(431, "Request Header Fields Too Large",
                                 f"request headers over this server's limit of {max_header_bytes // 1024} KB")
                    return
                if ended:
                    self._in_head, self._busy = False, True
                    self._stop_head_timer()
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._busy = False
            self._expect_head()  # the keep-alive timer closes it if nothing more comes

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


def _make_room(new: Any, max_connections: int) -> None:
    """At the cap (uvicorn answers 503 from it on), close the oldest idle connections: those with
    no request under way, whether silent, trickling headers or kept alive."""
    connections = new.connections
    if len(connections) < max_connections:
        return
    idle = sorted((c for c in connections if c is not new and not getattr(c, "_busy", True)), key=lambda c: c._opened)
    for c in idle[: len(connections) - max_connections + 1]:
        c._stop_head_timer()
        c.transport.close()
        connections.discard(c)  # counted out now: the close completes on a later loop turn
