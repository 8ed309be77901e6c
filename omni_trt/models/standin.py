"""The base of every engine stand-in: what a pipeline reads of the module it replaces.

Imported lazily (from inside the families' `_standin` builders), since it needs torch and
diffusers."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator, Mapping

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import FrozenDict

from .base import Engine


class EngineStandIn(ModelMixin):
    """No weights: the replaced component's config, and an engine that does the work.

    A ModelMixin because DiffusionPipeline.from_pretrained accepts only those for model slots
    (passing the stand-in there is what keeps the real weights from ever being read). A zero-size
    buffer carries dtype and device, so `.to(dtype)`/`.to(device)` behave as on the original."""

    def __init__(self, config: Mapping[str, Any], engine: Engine) -> None:
        super().__init__()
        self.config = FrozenDict(dict(config))  # ModelMixin has no ConfigMixin here: plain attribute
        self.engine = engine
        self.register_buffer("_anchor", torch.zeros(0, dtype=torch.float32), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def with_dtype(self, dtype: torch.dtype) -> "EngineStandIn":
        """The dtype the pipeline casts this component's inputs to (the engine's compute dtype).
        Not .to(dtype): diffusers warns about fp32 modules on every ModelMixin dtype cast."""
        self._anchor = self._anchor.to(dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        yield  # pipelines wrap transformer calls in it; an engine has no diffusers cache hooks


class VaeStandIn(EngineStandIn):
    """An engine decodes the whole batch in one call: slicing and tiling are no-ops."""

    def enable_slicing(self) -> None: ...

    def disable_slicing(self) -> None: ...

    def enable_tiling(self, *args: Any, **kwargs: Any) -> None: ...

    def disable_tiling(self) -> None: ...


class PrepCache:
    """Host prep (RoPE tables, masks) per key such as (size, text length), least recently used
    evicted: a server sees many prompt lengths and sizes, so an unbounded dict would only grow."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
        else:
            self._items[key] = make()
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        return self._items[key]

    def __len__(self) -> int:
        return len(self._items)
