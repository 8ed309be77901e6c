"""File helpers shared by the engine dir, the compiler, the runtime and the demo builders."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

_CHUNK = 1 << 20


def cache_root() -> Path:
    """Where omni-trt keeps what it builds or fits for reuse (the demo's tiny pipelines, preview
    maps): $OMNI_TRT_CACHE, else ~/.cache/omni-trt."""
    return Path(os.environ.get("OMNI_TRT_CACHE", Path.home() / ".cache" / "omni-trt"))


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path | str, data: str | bytes | memoryview | Any) -> Path:
    """Write beside `path` and rename over it: a crash mid-write leaves the previous file.
    data: text, or anything with the buffer protocol (bytes, a TensorRT host buffer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else memoryview(data))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def build_dir(out_dir: Path | str, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` on a folder beside `out_dir`, then swap it in: a crash never leaves a
    half-written folder where a complete one is expected."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        build(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
