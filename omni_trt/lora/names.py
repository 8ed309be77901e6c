"""The weight-name map: which ONNX initializer holds each torch weight of the transformer.

The exporter (torch.onnx dynamo, optimized) names some initializers after the module path and folds
others into anonymous constants, often transposed (a Linear's W stored as W.T for a MatMul). The
map is found by content, not by guessing names: an initializer whose bytes are exactly a weight's
(or its transpose's) is that weight. Computed once at export (compiler), recorded in the manifest,
and used by ONNX Runtime (overridden initializers) and TensorRT (refit) alike."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

Digest = tuple[tuple[int, ...], str, str]  # (shape, dtype name, sha256 of the bytes)


def digest(shape: Iterable[int], dtype: str, data: bytes) -> Digest:
    return tuple(int(d) for d in shape), dtype, hashlib.sha256(data).hexdigest()


def torch_digests(module: Any) -> dict[str, tuple[Digest, Digest]]:
    """Torch weight name -> (digest of W, digest of W.T) for the module's 2-D parameters."""
    out = {}
    for name, p in module.named_parameters():
        if p.ndim != 2:
            continue
        w = p.detach().cpu().contiguous()
        t = w.t().contiguous()
        dtype = str(w.dtype).removeprefix("torch.")
        out[name] = (digest(w.shape, dtype, _bytes(w)), digest(t.shape, dtype, _bytes(t)))
    return out


def _bytes(t: Any) -> bytes:
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16"}


def onnx_digests(model: Any) -> dict[str, Digest]:
    """Initializer name -> digest, for the 2-D float initializers of a loaded onnx.ModelProto
    (external data loaded)."""
    from onnx import numpy_helper

    out = {}
    for init in model.graph.initializer:
        if len(init.dims) != 2 or init.data_type not in ONNX_DTYPES:
            continue
        data = init.raw_data if init.raw_data else numpy_helper.to_array(init).tobytes()
        out[init.name] = digest(init.dims, ONNX_DTYPES[init.data_type], data)
    return out


def weight_map(weights: Mapping[str, tuple[Digest, Digest]], initializers: Mapping[str, Digest]) -> dict[str, tuple[str, bool]]:
    """Torch name -> (initializer name, transposed), for each weight exactly one initializer holds.
    A weight left out (folded into something else, or sharing its bytes with another weight or
    initializer, so which is which is unknowable) cannot take an adapter."""
    by_content: dict[Digest, list[str]] = {}
    for name, d in initializers.items():
        by_content.setdefault(d, []).append(name)
    owners: dict[Digest, int] = {}
    for same, flipped in weights.values():
        for d in {same, flipped}:
            owners[d] = owners.get(d, 0) + 1
    out = {}
    for name, (same, flipped) in weights.items():
        found = [(init, False) for init in by_content.get(same, [])]
        if flipped != same:
            found += [(init, True) for init in by_content.get(flipped, [])]
        if len(found) == 1 and owners[same] == 1 and owners[flipped] == 1:
            out[name] = found[0]
    return out
