"""ONNX export of one family component through its tensor-only wrapper, and the validation gate."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import ort
from ..errors import BuildError
from ..models.base import ComponentSpec, Family, Point

log = logging.getLogger(__name__)

DEFAULT_OPSET = 20
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit


def sample_points(family: Family) -> tuple[Point, Point]:
    """Two points where every dynamic dim is > 1 and the dims differ from each other, so
    torch.export keeps them symbolic (it specialises 0/1 and equal sizes)."""
    if family.sample_points is not None:
        return family.sample_points
    g = family.size.multiple_of
    lo, _, hi = family.text_len
    t1 = min(max(lo, 7), hi)
    t2 = min(max(lo, 11), hi)
    return Point(batch=2, height=3 * g, width=4 * g, text_len=t1), Point(batch=3, height=5 * g, width=2 * g, text_len=t2)


def dynamic_shapes(spec: ComponentSpec) -> dict[str, dict[int, Any]]:
    dims: dict[str, Any] = {}
    out: dict[str, dict[int, Any]] = {}
    for t in spec.inputs:
        out[t.name] = {axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in t.dynamic.items()}
    return out


@dataclass
class ExportResult:
    path: Path
    seconds: float
    dynamic_inputs: dict[str, list[str | int]] = field(default_factory=dict)


def export_component(
    family: Family,
    component: str,
    module: torch.nn.Module,
    out_path: Path,
    dtype: torch.dtype = torch.float32,
    opset: int = DEFAULT_OPSET,
) -> ExportResult:
    """Export `module` (the pipeline's original component) through the family's wrapper."""
    spec = family.components[component]
    module = module.to(dtype).eval()
    wrapper = spec.wrapper(module).eval()
    point = sample_points(family)[0]
    case = spec.reference_case(module, point, dtype, torch.Generator().manual_seed(0))
    args = tuple(case.inputs[name] for name in spec.input_names)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            optimize=True,
            opset_version=opset,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_shapes=dynamic_shapes(spec),
            report=False,
            verbose=False,
        )
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    for stale in (out_path, out_path.with_name(out_path.name + ".data")):
        stale.unlink(missing_ok=True)
    program.save(str(out_path), external_data=big)
    seconds = time.perf_counter() - t0
    return ExportResult(out_path, seconds, onnx_input_dims(out_path))


def onnx_input_dims(path: Path) -> dict[str, list[str | int]]:
    """Each graph input's dims: an int where static, its dim_param where dynamic."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }


def check_dynamic_dims(spec: ComponentSpec, dims: dict[str, list[str | int]]) -> None:
    """The exporter can silently write a static input where a dynamic one was asked for."""
    for t in spec.inputs:
        got = dims.get(t.name)
        if got is None:
            raise BuildError(f"{spec.name}: ONNX has no input {t.name!r} (inputs: {sorted(dims)})")
        for axis in t.dynamic:
            if not isinstance(got[axis], str):
                raise BuildError(
                    f"{spec.name}: input {t.name!r} axis {axis} was exported static ({got[axis]}) "
                    f"but should be dynamic ({t.dynamic[axis]!r})"
                )


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: scale-free, and strict where values are small."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def validate_onnx(
    family: Family,
    component: str,
    module: torch.nn.Module,
    onnx_path: Path,
    dtype: torch.dtype = torch.float32,
    points: tuple[Point, ...] | None = None,
) -> dict[str, float]:
    """Run the ONNX graph at each point against the ORIGINAL forward; worst relative error per
    output and point, keyed 'output@BxHxW:T'."""
    spec = family.components[component]
    module = module.to(dtype).eval()
    session = ort.session(onnx_path, ["CPUExecutionProvider"])
    errors: dict[str, float] = {}
    for i, point in enumerate(points or sample_points(family)):
        case = spec.reference_case(module, point, dtype, torch.Generator().manual_seed(100 + i))
        feeds = {k: _to_numpy(v) for k, v in case.inputs.items()}
        outs = session.run(list(spec.output_names), feeds)
        for name, got in zip(spec.output_names, outs):
            key = f"{name}@{point.batch}x{point.height}x{point.width}:{point.text_len}"
            errors[key] = relative_error(torch.from_numpy(got), case.expected[name])
    return errors


def _to_numpy(t: torch.Tensor):
    if t.dtype == torch.bfloat16:  # numpy has no bf16; ORT CPU cannot run bf16 MatMul anyway
        raise BuildError("bf16 graphs cannot be validated on ONNX Runtime CPU; validate an fp32 twin")
    return t.detach().cpu().numpy()
