"""The one place ONNX Runtime sessions are made (the compiler's validation and the runtime's
engines), so both run a graph with the same options."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def has_cuda() -> bool:
    """Whether the installed ONNX Runtime has the CUDA execution provider (onnxruntime-gpu)."""
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


def session(path: Path | str, providers: Sequence[str] | None = None, *, device_id: int = 0, cuda_stream: int | None = None,
            initializers: Mapping[str, Any] | None = None) -> Any:
    """An InferenceSession on `providers` (default: CUDA where onnxruntime-gpu has it, else CPU).
    cuda_stream: a CUDA stream handle (torch's `cuda_stream`) the CUDA provider enqueues its
    kernels on, so a run orders with the torch work around it instead of synchronising.
    initializers: name -> OrtValue replacing the graph's initializers of those names (LoRA-merged
    weights); the caller keeps the values alive as long as the session."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # ORT's idle threads spin for a while after each run; inside a pipeline that steals the
    # cores torch's text encoder and scheduler run on next (a 20x slower text encode on CPU).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for name, value in (initializers or {}).items():
        opts.add_initializer(name, value)
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in (CUDA, CPU) if p in available]
    chosen: list[Any] = []
    for p in providers:
        if p == CUDA:
            cuda_opts = {"device_id": str(device_id)}
            if cuda_stream is not None:
                cuda_opts.update(has_user_compute_stream="1", user_compute_stream=str(cuda_stream))
            chosen.append((p, cuda_opts))
        else:
            chosen.append(p)
    return ort.InferenceSession(str(path), opts, providers=chosen)


def unsynchronized_run() -> Any:
    """RunOptions for a run enqueued on a stream its caller orders by: no host sync at the end,
    which would only stall the host."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return options
