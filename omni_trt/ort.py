"""The one place ONNX Runtime sessions are made (the compiler's validation and the runtime's
engines), so both run a graph with the same options."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def session(path: Path | str, providers: Sequence[str] | None = None) -> Any:
    """An InferenceSession on `providers` (default: CUDA where onnxruntime-gpu has it, else CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # ORT's idle threads spin for a while after each run; inside a pipeline that steals the
    # cores torch's text encoder and scheduler run on next (a 20x slower text encode on CPU).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), opts, providers=list(providers))
