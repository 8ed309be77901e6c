"""What every request passes before any route reads its body (pure ASGI middleware, so nothing
is buffered or parsed first): the API key, the body size and pace, and the shutdown drain.

An unauthenticated client cannot make the server read (and hold) a 100 MB body, a malformed one
gets 401 rather than 422, and a body that trickles in is cut off."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Callable

from starlette.exceptions import HTTPException

from .protocol import error_body

PROTECTED = "/v1/"  # the API key guards these; /health, /metrics and the docs stay open


async def send_error(send: Any, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """api_key: compared in constant time; max_body: bytes (413 beyond); body_timeout: seconds
    a body may stall between chunks, body_total_timeout: seconds it may take in all (408 past
    either: a body trickled a byte at a time never stalls); draining(): a reason while shutting
    down (503)."""

    def __init__(self, app: Any, api_key: str | None, max_body: int, body_timeout: float, draining: Callable[[], str | None],
                 body_total_timeout: float | None = None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.body_total_timeout = body_total_timeout
        self.draining = draining

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if path.startswith(PROTECTED) and self.key is not None and not self._authorized(headers.get(b"authorization", b"")):
            await send_error(send, 401, "missing or invalid API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
            return
        reason = self.draining()
        if reason and path.startswith(PROTECTED) and scope.get("method") == "POST":
            await send_error(send, 503, reason, {"Retry-After": "5"})
            return
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await send_error(send, 400, "Content-Length is not a number")
                return
            if int(length) > self.max_body:
                await send_error(send, 413, self._too_large())
                return
        await self.app(scope, self._bounded(receive), send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    def _too_large(self) -> str:
        return f"request body over this server's limit of {self.max_body / (1 << 20):g} MB"

    def _bounded(self, receive: Any) -> Any:
        """receive(), counting body bytes (a chunked body has no Content-Length) and timing each
        chunk; once the body is whole, later messages (the disconnect) are passed through as they come."""
        seen = 0
        done = False
        total = self.body_total_timeout
        until = None if total is None else asyncio.get_running_loop().time() + total

        async def wrapped() -> dict:
            nonlocal seen, done
            if done:
                return await receive()
            left = None if until is None else until - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout if left is None else max(0.0, min(left, self.body_timeout)))
            except asyncio.TimeoutError:
                if left is not None and left <= self.body_timeout:
                    raise HTTPException(408, f"the request body took longer than this server's {total:g} s in all") from None
                raise HTTPException(408, f"the request body stalled for over {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, self._too_large())
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        return wrapped
