"""What an engine was built from: fingerprints of a model's files, and of the engine dir's own.

Config files are hashed by content, weights by name and size only: hashing 40 GB of weights on
every build would take minutes. Weights replaced in place by files of the same sizes go
unnoticed; rebuild with --force then."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..files import sha256_file

_CONTENT_SUFFIXES = (".json",)


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .cache, .git, .huggingface
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def model_fingerprint(model_dir: Path | str, subfolders: Iterable[str] | None = None, configs_only: bool = False) -> str:
    """sha256 over model_index.json, the content of every JSON config, and the names and sizes of
    every other file (weights, safetensors indexes, tokenizer files), under `subfolders` (all
    when None). With subfolders, model_index.json contributes only their entries, so changing one
    component leaves the other components' fingerprints alone. configs_only: the JSON files alone
    (configs and safetensors indexes), which a server can fetch from the hub without the weights."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    index = json.loads((model_dir / "model_index.json").read_text())
    if subfolders is None:
        roots = [model_dir]
        h.update(json.dumps(index, sort_keys=True).encode())
    else:
        subfolders = sorted(subfolders)
        roots = [model_dir / s for s in subfolders]
        h.update(json.dumps({s: index.get(s) for s in subfolders}, sort_keys=True).encode())
    for root in roots:
        if not root.is_dir():
            h.update(f"missing:{root.name}".encode())
            continue
        for path in _walk(root):
            rel = path.relative_to(model_dir).as_posix()
            if rel == "model_index.json":
                continue
            if path.suffix in _CONTENT_SUFFIXES:
                h.update(f"{rel}:{sha256_file(path)}\n".encode())
            elif not configs_only:
                h.update(f"{rel}:{path.stat().st_size}\n".encode())
    return h.hexdigest()


def combined_fingerprint(component_fingerprints: dict[str, str]) -> str:
    """The model fingerprint of a manifest: over its components' own fingerprints, so it does not
    depend on which other parts of a hub model happen to be downloaded."""
    parts = sorted(f"{n}:{fp}" for n, fp in component_fingerprints.items())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def present_sizes(engine_dir: Path | str, relpaths: Iterable[str]) -> dict[str, int | None]:
    """Current size of each file, None where missing: the cheap check used to decide rebuilds."""
    out: dict[str, int | None] = {}
    for rel in relpaths:
        p = Path(engine_dir) / rel
        out[rel] = p.stat().st_size if p.is_file() else None
    return out
