"""What names a module's weights in a cache file's name: one pure function, shared by the caches
that hold something fitted to a module (the preview decoder's map of a VAE, the step cache's
calibration of a transformer) without importing either."""

from __future__ import annotations

import hashlib
import json
from typing import Any

SAMPLES = 32  # values read from each parameter tensor, evenly strided


def module_key(module: Any, *extra: Any) -> str | None:
    """sha256 hex of `extra` (a version, the family, an engine's ONNX sha256...), the module's
    class and config, and, where it has parameters (torch), a strided sample of each: two
    checkpoints of one config differ, and reading it costs no pass over the weights. None: a
    module without parameters (an engine stand-in) and no truthy `extra` to name it."""
    params = list(module.named_parameters())
    if not params and not any(extra):
        return None
    h = hashlib.sha256(":".join(map(str, (*extra, type(module).__name__))).encode() + b"\n")
    h.update(json.dumps(dict(getattr(module, "config", {}) or {}), sort_keys=True, default=str).encode())
    for name, p in params:
        flat = p.detach().flatten()
        sample = flat[:: max(1, flat.numel() // SAMPLES)][:SAMPLES].float().cpu()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:".encode() + sample.numpy().tobytes())
    return h.hexdigest()
