"""Engines: named tensors in, named tensors out. Stand-in modules call these in place of the
PyTorch components they replace.

- TensorRTEngine: a serialized TensorRT (or TensorRT-RTX) plan, run on torch's CUDA stream.
- OnnxRuntimeEngine: the exported ONNX graph on CPU (or CUDA with onnxruntime-gpu).
- ProfiledEngine: checks every call against the built profile first, so a shape the engine was
  not built for is a clear request error rather than a TensorRT failure deep in a batch.
- MissingEngine: a component the engine dir was built without; a call says what to build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .. import ort
from ..errors import ComponentNotBuilt, EngineDirError, OutOfProfile

_ORT_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(bool)": torch.bool,
}


class OnnxRuntimeEngine:
    """ONNX Runtime over an exported graph: CPU here, CUDA where onnxruntime-gpu is installed."""

    kind = "onnxruntime"

    def __init__(self, onnx_path: Path, providers: Sequence[str] | None = None) -> None:
        self.session = ort.session(onnx_path, providers)
        inputs = self.session.get_inputs()
        self.input_names = tuple(i.name for i in inputs)
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.input_dtypes = {i.name: _ORT_TYPES.get(i.type) for i in inputs}
        bf16 = [n for n, t in self.input_dtypes.items() if t == torch.bfloat16]
        if bf16:
            raise EngineDirError(
                f"{Path(onnx_path).name} takes bf16 inputs ({', '.join(bf16)}), which ONNX Runtime cannot feed; "
                "export with --dtype fp32 (or fp16) for ONNX Runtime, or serve bf16 engines with --runtime tensorrt"
            )
        self.path = Path(onnx_path)

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise KeyError(f"{self.path.name}: missing inputs {sorted(missing)}")
        device = next(iter(feeds.values())).device
        np_feeds: dict[str, np.ndarray] = {}
        for name in self.input_names:
            t = feeds[name].detach()
            want = self.input_dtypes[name]
            if want is not None and t.dtype != want:
                t = t.to(want)
            np_feeds[name] = t.cpu().contiguous().numpy()
        outs = self.session.run(list(self.output_names), np_feeds)
        return {k: torch.from_numpy(v).to(device) for k, v in zip(self.output_names, outs)}


class TensorRTEngine:
    """One deserialized engine and one execution context. Inputs are bound by data_ptr, outputs
    are allocated by torch, and the engine is enqueued on torch's current CUDA stream, so it
    orders with the rest of the pipeline without synchronising."""

    kind = "tensorrt"

    def __init__(self, plan_path: Path, trt: Any, device: str = "cuda") -> None:
        self.trt = trt
        self.path = Path(plan_path)
        self.device = torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineDirError(f"TensorRT could not deserialize {self.path} (built for another GPU or TensorRT version?); rebuild it on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctx = self.context
        keep = []  # inputs must outlive the enqueue; the caching allocator orders frees on the stream
        for name in self.input_names:
            t = feeds[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            keep.append(t)
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path.name}")
        return outputs


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
        trt.bool: torch.bool,
    }
    return table[dt]


class ProfiledEngine:
    """Wraps an engine with its built profile: input name -> (min, opt, max) shapes."""

    def __init__(self, engine: Any, profile: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]], component: str) -> None:
        self.engine = engine
        self.profile = profile
        self.component = component
        self.input_names = engine.input_names
        self.output_names = engine.output_names
        self.kind = getattr(engine, "kind", type(engine).__name__)

    def check(self, feeds: Mapping[str, torch.Tensor]) -> None:
        for name, (lo, _, hi) in self.profile.items():
            shape = tuple(feeds[name].shape)
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                raise OutOfProfile(
                    f"{self.component} engine input {name!r} has shape {shape}, outside the built range "
                    f"{tuple(lo)}..{tuple(hi)}; rebuild with omni build-engine and a wider profile"
                )

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check(feeds)
        return self.engine(feeds)


class MissingEngine:
    """Where a stand-in expects an engine the engine dir lacks (the VAE encoder of a text-to-image
    build): everything else serves, and a call raises ComponentNotBuilt with `message` (what to build)."""

    kind = "missing"
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()

    def __init__(self, component: str, message: str) -> None:
        self.component = component
        self.message = message

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise ComponentNotBuilt(self.message)
