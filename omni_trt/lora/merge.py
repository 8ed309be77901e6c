"""Merge maths: an adapter set's weights, W + sum(scale * scaling * B @ A) per targeted layer, for
runtimes whose weights are constants (ONNX Runtime initializers, TensorRT refit)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .registry import Adapter
from .request import AdapterSet


def merged_weight(base: Any, terms: list[tuple[float, Any, Any, float]]) -> Any:
    """base + sum(scale * scaling * b @ a) over terms (scale, a, b, scaling), in fp32, returned in
    base's dtype. Pure: base is not changed."""
    out = base.float().clone()
    for scale, a, b, scaling in terms:
        out += (scale * scaling) * (b.float() @ a.float())
    return out.to(base.dtype)


def targets(adapters: AdapterSet, get: Callable[[str], Adapter]) -> dict[str, list[tuple[float, Any, Any, float]]]:
    """Torch weight name -> the terms of every adapter of the set that targets it."""
    out: dict[str, list[tuple[float, Any, Any, float]]] = {}
    for name, scale in adapters:
        for weight, f in get(name).layers.items():
            out.setdefault(weight, []).append((scale, f.a, f.b, f.scaling))
    return out


def merged_weights(adapters: AdapterSet, get: Callable[[str], Adapter], base: Callable[[str], Any],
                   names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """{engine weight name: merged weight} for the set; `base(torch name)` gives a weight as built,
    `names` maps torch names to the engine's (None: the same names)."""
    out = {}
    for weight, terms in targets(adapters, get).items():
        out[names[weight] if names is not None else weight] = merged_weight(base(weight), terms)
    return out
