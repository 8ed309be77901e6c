"""The app under uvicorn: connection limits and timeouts, and a shutdown that drains.

On the first SIGINT/SIGTERM the server keeps listening but refuses new work (503), lets the
backlog finish for up to --drain-timeout seconds, answers what is left with 503 in the error
shape, and only then closes. A second signal skips the rest of the drain (uvicorn's graceful
close), a third forces the exit, as uvicorn's own Ctrl-C does.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from .contract import Serving

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_connections: int = 1000  # uvicorn's limit_concurrency: beyond it, 503 (plain text, from uvicorn)
    keep_alive_s: float = 5.0  # idle keep-alive connections close after this
    log_level: str = "info"


class DrainingServer(uvicorn.Server):
    """uvicorn, with the drain above; it also stops once the serving object failed to load."""

    def __init__(self, config: uvicorn.Config, serving: Serving) -> None:
        super().__init__(config)
        self.serving = serving
        self._drain_requested = False
        self._drain: asyncio.Future | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested or not self.serving.loaded:
            super().handle_exit(sig, frame)  # nothing to drain, or a second signal: close now
            return
        self._captured_signals.append(sig)  # uvicorn re-raises it once the server is down
        self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self.serving.load_error and not self.should_exit:
            log.error("stopping: the model failed to load")
            self.should_exit = True
        if self._drain_requested and self._drain is None:
            log.info("shutting down: new requests get 503; draining the backlog (up to %.0f s)", self.serving.options.drain_timeout_s)
            self._drain = asyncio.ensure_future(self.serving.drain())
            self._drain.add_done_callback(lambda _: setattr(self, "should_exit", True))
        return await super().on_tick(counter)


def make_server(app: Any, net: NetOptions) -> DrainingServer:
    config = uvicorn.Config(
        app,
        host=net.host,
        port=net.port,
        log_level=net.log_level,
        limit_concurrency=net.max_connections,
        timeout_keep_alive=net.keep_alive_s,
        # After the drain every answer is sent; this only bounds closing the sockets.
        timeout_graceful_shutdown=10,
    )
    return DrainingServer(config, app.state.omni)
