"""What the benchmarks that drive a real `omni serve` share: start one in its own cache, wait
for /health, stop it as an operator would (SIGINT), and write the JSON they measured."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    cache: Path
    log: Path
    started_s: float  # launch to /health 200


def start_server(args: list[str], cache: str | Path | None = None, env: dict[str, str] | None = None, timeout_s: float = 600) -> Server:
    """`omni serve ARGS` (the demo model unless ARGS name one), its log in the cache dir."""
    cache = Path(cache or tempfile.mkdtemp(prefix="omni-bench-"))
    port = free_port()
    log = cache / f"serve-{port}.log"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "omni_trt", "serve", "--port", str(port), *args], cwd=ROOT,
                            env={**os.environ, "OMNI_TRT_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0", **(env or {})},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"omni serve {' '.join(args)} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Server(proc, url, cache, log, time.monotonic() - t0)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"omni serve {' '.join(args)} was not ready in {timeout_s:.0f} s; its log: {log}")


def stop_server(server: Server, timeout_s: float = 120) -> int | str:
    """SIGINT (the drain), then a kill if it does not end; its exit status, or "killed"."""
    server.proc.send_signal(signal.SIGINT)
    try:
        return server.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        return "killed"


def write_result(result: Any, out: str | None) -> int:
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
    return 0
