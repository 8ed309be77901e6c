"""The one way a model is found: a local diffusers folder as it is, or a hub id fetched with
only the files asked for (a server never downloads weights an engine replaces)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import ModelNotFound


def local_dir(model: str | os.PathLike) -> Path | None:
    """The folder of a local model, None for a hub id; a path that is neither is an error."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelNotFound(f"model {text!r} not found: give a diffusers pipeline folder or a hub id like org/name")
    return None


def model_dir(model: str | os.PathLike, patterns: Sequence[str]) -> Path:
    """A local folder as it is; for a hub id, a snapshot holding only `patterns` (glob patterns
    relative to the repo root, e.g. 'model_index.json', 'vae/*')."""
    local = local_dir(model)
    if local is not None:
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=list(patterns)))
    except Exception as e:  # offline, unknown repo, gated: all mean "not found" to the user
        raise ModelNotFound(f"model {str(model)!r} not found locally and could not be fetched from the hub: {e}") from e


def model_id(model: str | os.PathLike) -> str:
    """What a manifest records: an absolute path for a local folder, else the hub id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def same_model(given: str, recorded: str) -> bool:
    a, b = Path(given).expanduser(), Path(recorded).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return given == recorded
