"""Engines: named tensors in, named tensors out. Stand-in modules call these in place of the
PyTorch components they replace.

- TensorRTEngine: a serialized TensorRT (or TensorRT-RTX) plan, run on torch's CUDA stream.
- OnnxRuntimeEngine: the exported ONNX graph on CPU (numpy feeds) or on CUDA with onnxruntime-gpu
  (I/O binding: torch tensors bound by pointer on torch's stream, nothing through host memory).
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
from ..enginedir import trt_flavor
from ..errors import ComponentNotBuilt, EngineDirError, OutOfProfile

_ORT_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(bool)": torch.bool,
}
_NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


class OnnxRuntimeEngine:
    """ONNX Runtime over an exported graph.

    device "cpu": the CPU provider, fed numpy arrays (io_binding=True binds the CPU tensors by
    pointer instead, the same code path as CUDA). device "cuda[:N]": the CUDA provider of
    onnxruntime-gpu enqueued on torch's current CUDA stream, inputs bound by data_ptr and outputs
    left in ORT's device memory and handed to torch through DLPack: no copy through the host, no
    synchronisation; the run orders with the pipeline's kernels on the same stream."""

    kind = "onnxruntime"

    def __init__(self, onnx_path: Path, device: str = "cpu", io_binding: bool | None = None) -> None:
        self.path = Path(onnx_path)
        self.device = torch.device(device)
        self._stream = None
        self._run_options = None
        if self.device.type == "cuda":
            if not ort.has_cuda():
                raise EngineDirError(f"{self.path.name}: ONNX Runtime here has no CUDAExecutionProvider; "
                                     "pip uninstall -y onnxruntime && pip install 'omni-trt[ort-gpu]', or run on --device cpu")
            self.device = torch.device("cuda", self.device.index if self.device.index is not None else torch.cuda.current_device())
            self._stream = torch.cuda.current_stream(self.device)
            self._run_options = ort.unsynchronized_run()
        elif self.device.type != "cpu":
            raise EngineDirError(f"{self.path.name}: ONNX Runtime engines run on cpu or cuda, not {device}")
        self.session = self.new_session()
        self.io_binding = self.device.type == "cuda" if io_binding is None else io_binding
        inputs = self.session.get_inputs()
        self.input_names = tuple(i.name for i in inputs)
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.input_dtypes = {i.name: _ORT_TYPES.get(i.type) for i in inputs}
        bf16 = [n for n, t in self.input_dtypes.items() if t == torch.bfloat16]
        if bf16:
            raise EngineDirError(
                f"{self.path.name} takes bf16 inputs ({', '.join(bf16)}), which ONNX Runtime cannot feed; "
                "export with --dtype fp32 (or fp16) for ONNX Runtime, or serve bf16 engines with --runtime tensorrt"
            )

    def new_session(self, initializers: Mapping[str, Any] | None = None) -> Any:
        """A session of this graph with the same options; `initializers` (name -> OrtValue) replace
        the graph's weights of those names (LoRA: merged weights). Swapped in by assigning `session`."""
        if self.device.type == "cuda":
            return ort.session(self.path, [ort.CUDA, ort.CPU], device_id=self.device.index, cuda_stream=self._stream.cuda_stream,
                               initializers=initializers)
        return ort.session(self.path, [ort.CPU], initializers=initializers)

    def _input(self, feeds: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        t = feeds[name].detach()
        want = self.input_dtypes[name]
        return t if want is None or t.dtype == want else t.to(want)

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise KeyError(f"{self.path.name}: missing inputs {sorted(missing)}")
        if self.io_binding:
            return self._run_bound(feeds)
        device = next(iter(feeds.values())).device
        np_feeds = {name: self._input(feeds, name).cpu().contiguous().numpy() for name in self.input_names}
        outs = self.session.run(list(self.output_names), np_feeds)
        return {k: torch.from_numpy(v).to(device) for k, v in zip(self.output_names, outs)}

    def _run_bound(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        where, index = self.device.type, self.device.index or 0
        current = torch.cuda.current_stream(self.device) if self._stream is not None else None
        other_stream = current is not None and current != self._stream
        if other_stream:  # called from another stream than the session's: order both ways
            self._stream.wait_stream(current)
        keep = []  # the bound inputs must outlive the run (on CUDA: the kernels it enqueued)
        for name in self.input_names:
            t = self._input(feeds, name).to(self.device).contiguous()
            if other_stream:
                t.record_stream(self._stream)
            keep.append(t)
            binding.bind_input(name, where, index, _NUMPY_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, where, index)  # ORT allocates: output shapes are known after the run
        self.session.run_with_iobinding(binding, self._run_options)
        outputs = {name: _ort_to_torch(v) for name, v in zip(self.output_names, binding.get_outputs())}
        if other_stream:
            current.wait_stream(self._stream)
        return outputs


def _ort_to_torch(value: Any) -> torch.Tensor:
    """An OrtValue as a torch tensor sharing its memory (DLPack). The public protocol is newer
    than the C binding's (onnxruntime 1.2x), hence the fallback."""
    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    return torch.from_dlpack(value._ortvalue.__dlpack__())


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

    def refittable_weights(self) -> set[str]:
        """The names of the weights a refit can replace (empty unless built with --refittable)."""
        return set(trt_flavor.refitter(self.trt, self.engine, self._logger).get_all_weights())

    def refit(self, weights: Mapping[str, Any]) -> None:
        """Replace named weights of a refittable engine in place (LoRA), on torch's current stream;
        the engine must have been built with --refittable. weights: ONNX initializer name -> numpy
        array in the engine's weight dtype and layout."""
        refitter = trt_flavor.refitter(self.trt, self.engine, self._logger)
        keep = []  # trt.Weights borrow the arrays until the refit is done
        for name, array in weights.items():
            keep.append(array)
            if not refitter.set_named_weights(name, self.trt.Weights(array)):
                raise EngineDirError(f"{self.path.name}: TensorRT cannot refit the weight {name!r}; rebuild with --refittable")
        missing = refitter.get_missing_weights()
        if missing:
            raise EngineDirError(f"{self.path.name}: a refit also needs {', '.join(list(missing)[:3])}")
        stream = torch.cuda.current_stream(self.device)
        if not refitter.refit_cuda_engine_async(stream.cuda_stream):
            raise EngineDirError(f"{self.path.name}: the TensorRT refit failed")

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
