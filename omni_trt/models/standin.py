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
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from ..errors import ComponentNotBuilt
from .base import Engine


class EngineStandIn(ModelMixin):
    """No weights: the replaced component's config, and an engine that does the work.

    A ModelMixin because DiffusionPipeline.from_pretrained accepts only those for model slots
    (passing the stand-in there is what keeps the real weights from ever being read). A zero-size
    buffer carries dtype and device: `.to(device)` moves it as on the original, while its dtype is
    the engine's, set once by `with_dtype` and kept through `.to(dtype)` (from_pipe casts every
    module of the new pipeline, and this module is shared with the pipeline it came from)."""

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

    def to(self, *args: Any, **kwargs: Any) -> "EngineStandIn":
        dtype = self.dtype
        torch.nn.Module.to(self, *args, **kwargs)  # not ModelMixin.to: it warns on every dtype cast
        self._anchor = self._anchor.to(dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        yield  # pipelines wrap transformer calls in it; an engine has no diffusers cache hooks


class VaeStandIn(EngineStandIn):
    """The `vae` of a pipeline: `decode` on the VAE decoder's engine and `encode` on the VAE
    encoder's (None: an engine dir built without it; encode then says what to build). Engines
    take the whole batch in one call: slicing and tiling are no-ops.

    The decoder engine maps "latent" -> "image"; the encoder engine maps "image" (pixels in
    [-1, 1]) -> "mean", "logvar": the latent distribution's parameters, so sampling stays on the
    host with the pipeline's own generator (DiagonalGaussianDistribution, as diffusers does)."""

    def __init__(self, config: Mapping[str, Any], engine: Engine, vae_encoder: Engine | None = None) -> None:
        super().__init__(config, engine)
        self.encoder_engine = vae_encoder

    def check(self, x: torch.Tensor, what: str) -> None:
        """A family's layout check of what the pipeline passes to encode/decode (none by default)."""

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        self.check(z, "decodes")  # generator: AutoencoderKL.decode takes one and ignores it; so do we
        image = self.engine({"latent": z})["image"]
        return DecoderOutput(sample=image) if return_dict else (image,)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        if self.encoder_engine is None:
            raise ComponentNotBuilt(
                "this VAE stand-in has no encoder engine, so it cannot encode images (edits): "
                "build one with `omni build-engine MODEL --engine-dir DIR --components vae_encoder`"
            )
        self.check(x, "encodes")
        out = self.encoder_engine({"image": x})
        posterior = DiagonalGaussianDistribution(torch.cat([out["mean"], out["logvar"]], dim=1))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z, return_dict=False)[0]

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
