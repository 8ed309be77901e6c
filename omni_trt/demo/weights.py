"""Random weights for the demo and real-shape pipelines.

Tiny pipelines: `init_small` (normal weights small enough that activations stay finite). Real
shapes (`omni demo-model --real-shapes`): `random_model` allocates a model once, directly in the
target dtype, so a 20B model never exists in float32 or twice."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:
    import torch

MAX_SHARD = "5GB"  # save_pretrained shards: one shard is the most that is ever held twice


def init_small(*modules: Any, std: float = 0.02) -> None:
    """Normal(0, std) for every weight matrix and every parameter a model leaves uninitialised
    (Z-Image's pad tokens start as torch.empty and can hold NaN); norms keep their ones."""
    import torch

    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if p.ndim >= 2 or "pad_token" in name:
                    p.normal_(0.0, std)


@contextlib.contextmanager
def dtype_scope(dtype: "torch.dtype") -> Iterator[None]:
    """Modules built inside get their parameters in `dtype` directly (no float32 copy, and no
    ModelMixin.to, which warns about keep-in-fp32 modules on every cast)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def parameters_on_meta(dtype: "torch.dtype") -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device in `dtype` (floating ones).

    Only parameters: tensors a constructor computes as plain attributes (QwenEmbedRope's
    pos_freqs) or buffers stay real, so the model works once its parameters are given storage;
    under torch.device("meta") those would be meta too and nothing would recompute them. Each
    parameter is created on the CPU uninitialised and moved right away (its init runs on meta),
    so at most one layer's worth is ever allocated here.
    """
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            dt = dtype if param.is_floating_point() else param.dtype
            param = torch.nn.Parameter(param.to(device="meta", dtype=dt), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def init_random(model: "torch.nn.Module", std: float = 0.02, seed: int = 0) -> None:
    """Weight matrices and pad tokens normal(0, std) as in init_small; other 1-D weights (norm
    scales) one; biases zero: every parameter is set, none is left as uninitialised memory.

    CPU normal_ runs on one core (~0.2 G values/s: 100 s for 20B), so parameters are spread over
    threads (torch releases the GIL), each with its own generator: deterministic for a seed
    on a given number of cores.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch

    workers = max(1, min(16, os.cpu_count() or 1))
    shares: list[list[tuple[str, torch.nn.Parameter]]] = [[] for _ in range(workers)]
    for i, item in enumerate(model.named_parameters()):
        shares[i % workers].append(item)

    def fill(k: int) -> None:
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        with torch.no_grad():
            for name, p in shares[k]:
                if p.ndim >= 2 or "pad_token" in name:
                    p.normal_(0.0, std, generator=gen)
                elif name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, range(workers)))


def random_model(cls: Any, config: Mapping[str, Any], dtype: "torch.dtype", std: float = 0.02) -> Any:
    """cls(**config) with random weights, allocated once in `dtype`.

    The parameters are built on the meta device (no memory, no default init pass), then given
    uninitialised CPU storage: a 20B model never exists in float32 or twice. Every parameter is
    then set by init_random.
    """
    import torch

    with parameters_on_meta(dtype):
        model = cls(**config)
    with torch.no_grad():
        storage: dict[int, torch.nn.Parameter] = {}  # keeps tied parameters tied
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None and p.device.type == "meta":
                    if id(p) not in storage:
                        storage[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
                    module._parameters[key] = storage[id(p)]
            # Buffers stay real (some are computed in __init__, e.g. SD3's sin-cos position table);
            # cast by hand, since ModelMixin.to(dtype) warns about keep-in-fp32 modules on every cast.
            for key, b in list(module._buffers.items()):
                if b is not None and b.is_floating_point():
                    module._buffers[key] = b.to(dtype)
    init_random(model, std)
    return model.eval()
