"""Where things live in an engine dir (see engines/README.md):
    manifest.json, onnx/<component>.onnx (+ .onnx.data), <component>.plan, timing-*.cache
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

MANIFEST = "manifest.json"
ONNX_DIR = "onnx"


def onnx_relpath(component: str) -> str:
    return f"{ONNX_DIR}/{component}.onnx"


def plan_relpath(component: str) -> str:
    return f"{component}.plan"


def timing_cache_name(flavor: str, version: str) -> str:
    """One cache per TensorRT flavour and version: TensorRT rejects caches from other versions."""
    return f"timing-{flavor}-{version}.cache"


def manifest_path(engine_dir: Path | str) -> Path:
    return Path(engine_dir) / MANIFEST


def is_inside(relpath: str) -> bool:
    """A manifest path that stays inside its engine dir: relative, no '..', no backslashes."""
    p = PurePosixPath(relpath)
    return bool(relpath) and "\\" not in relpath and not p.is_absolute() and ".." not in p.parts


def escapes(engine_dir: Path | str, relpath: str) -> str | None:
    """Why `relpath` must not be opened, or None: the file (or a folder on its way) is a symlink,
    or it resolves outside the engine dir. A manifest's hashes say nothing of files elsewhere."""
    root = Path(engine_dir)
    path = root
    for part in PurePosixPath(relpath).parts:
        path = path / part
        if path.is_symlink():
            return f"{path.relative_to(root).as_posix()} is a symlink (engine dir files are opened only inside the dir)"
    if not path.resolve().is_relative_to(root.resolve()):
        return "resolves outside the engine dir"
    return None
