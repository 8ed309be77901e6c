"""A real uvicorn server on localhost, in a thread of the test process."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import uvicorn
from PIL import Image

from omni_trt.server.app import create_app
from omni_trt.server.contract import ServerOptions
from omni_trt.server.serving import ImageServing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app: Any, server: uvicorn.Server, port: int) -> None:
        self.app, self.server, self.port = app, server, port
        self.url = f"http://127.0.0.1:{port}"

    @property
    def state(self) -> Any:
        return self.app.state.omni

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)


def images(response: httpx.Response) -> list[np.ndarray]:
    """The images of a 200 images response, as float RGB arrays (0..255)."""
    assert response.status_code == 200, response.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB"), dtype=float) for d in response.json()["data"]]


@contextmanager
def counting_steps(runtime: Any) -> Iterator[list[int]]:
    """The transformer's forward calls (denoising steps) while inside, one entry each."""
    steps: list[int] = []
    real = runtime.pipe.transformer.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        steps.append(1)
        return real(*args, **kwargs)

    runtime.pipe.transformer.forward = counted
    try:
        yield steps
    finally:
        runtime.pipe.transformer.forward = real


def wait_until(check: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


@contextmanager
def live_server(load: Callable[[], Any], wait_ready: bool = True, **options: Any) -> Iterator[LiveServer]:
    """The app on ImageServing(ServerOptions(**options), load), served by uvicorn until the block
    ends; wait_ready: until the model is loaded (the app's lifespan loads it in the background)."""
    options.setdefault("served_model_name", "test-model")
    app = create_app(ImageServing(ServerOptions(**options), load))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    live = LiveServer(app, server, port)
    try:
        wait_until(lambda: server.started, 30, "uvicorn to start")
        if wait_ready:
            wait_until(lambda: live.state.runtime is not None or live.state.load_error is not None, 120, "model load")
            assert live.state.load_error is None, live.state.load_error
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def ray_replica_pids() -> list[int]:
    """Live model replicas, by the process title Ray gives an actor's worker
    (`ray::ServeReplica:<app>:<deployment>`); the state API would need Ray's dashboard."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:  # gone meanwhile, or not a process
            continue
        if proc.name.isdigit() and title.startswith(b"ray::ServeReplica:omni:ModelReplica"):
            pids.append(int(proc.name))
    return pids
