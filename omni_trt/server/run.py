"""The app under uvicorn: connection limits and timeouts, and a shutdown that drains.

On the first SIGINT/SIGTERM the server keeps listening but refuses new work (503), lets the
backlog finish for up to --drain-timeout seconds, answers what is left with 503 in the error
shape, and only then closes. A second signal skips the rest of the drain: what is still waiting
gets that 503 at once (never uvicorn's cancellation, a plain-text 500 and a traceback each), then
the server closes; a third forces the exit, as uvicorn's own Ctrl-C does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .connections import guarded
from .contract import Serving

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    # uvicorn's limit_concurrency: at it, idle connections make room; past it in busy ones, 503 (plain text, from uvicorn)
    max_connections: int = 1000
    keep_alive_s: float = 5.0  # idle keep-alive connections close after this
    header_timeout_s: float = 10.0  # a request's headers must arrive whole within this (408)
    max_header_bytes: int = 64 * 1024  # a request's headers beyond this: 431
    log_level: str = "info"


class DrainingServer(uvicorn.Server):
    """uvicorn, with the drain above; it also stops once the serving object failed to load."""

    def __init__(self, config: uvicorn.Config, serving: Serving) -> None:
        super().__init__(config)
        self.serving = serving
        self._signals = 0
        self._drain: asyncio.Future | None = None
        self._gave_up = False

    def exit_status(self) -> int:
        """What the process exits with once run() returned: 128 + the signal that stopped it
        (SIGINT 130, SIGTERM 143), else 0. uvicorn re-raises that signal after the shutdown, but
        Python's asyncio runner takes a SIGINT that lands while its main task is finishing as a
        cancellation the finishing task never sees, so run() can return normally (seen under
        load: exit 0 after a Ctrl-C)."""
        first = self._captured_signals[0] if self._captured_signals else None
        return 128 + first if first in (signal.SIGINT, signal.SIGTERM) else 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signals >= 2 or not self.serving.loaded:
            super().handle_exit(sig, frame)  # nothing to drain, or a third signal: close now
            return
        self._captured_signals.append(sig)  # uvicorn re-raises it once the server is down
        self._signals += 1

    async def on_tick(self, counter: int) -> bool:
        if self.serving.load_error and not self.should_exit:
            log.error("stopping: the model failed to load")
            self.should_exit = True
        if self._signals and self._drain is None:
            log.info("shutting down: new requests get 503; draining the backlog (up to %.0f s)", self.serving.options.drain_timeout_s)
            self._drain = self._then_exit(self.serving.drain())
        if self._signals >= 2 and not self._gave_up:
            log.info("second signal: what is still waiting gets 503 now")
            self._gave_up = True
            self._drain.cancel()
            self._drain = self._then_exit(self.serving.drain(0))
        return await super().on_tick(counter)

    def _then_exit(self, drain: Any) -> asyncio.Future:
        """The drain, then the close; a drain cut short by a second signal closes nothing itself."""
        task = asyncio.ensure_future(drain)
        task.add_done_callback(lambda t: t.cancelled() or setattr(self, "should_exit", True))
        return task


def make_server(app: Any, net: NetOptions) -> DrainingServer:
    config = uvicorn.Config(
        app,
        host=net.host,
        port=net.port,
        log_level=net.log_level,
        limit_concurrency=net.max_connections,
        timeout_keep_alive=net.keep_alive_s,
        http=guarded(AutoHTTPProtocol, net.header_timeout_s, net.max_header_bytes, net.max_connections),
        # After the drain every answer is sent; this only bounds closing the sockets.
        timeout_graceful_shutdown=10,
    )
    return DrainingServer(config, app.state.omni)
