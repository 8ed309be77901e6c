"""The one dtype table: names on the command line and in manifests, and torch's dtypes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:  # torch is heavy; `omni --help` and the pure parts import this module
    import torch

DTYPE_NAMES = ("bf16", "fp16", "fp32")
_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def check_dtype(name: str) -> str:
    if name not in DTYPE_NAMES:
        raise UsageError(f"dtype {name!r}: choose one of {', '.join(DTYPE_NAMES)}", "dtype")
    return name


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, _TORCH_NAMES[check_dtype(name)])


def default_dtype(device: str) -> str:
    """bf16 on a GPU, fp32 on CPU (CPU bf16 kernels are slow, and ONNX Runtime CPU lacks some)."""
    return "fp32" if device == "cpu" else "bf16"
