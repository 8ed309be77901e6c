"""The adapters a server knows: read through the family pipeline's own diffusers loader
(`lora_state_dict`, which converts kohya and other community forms to diffusers' PEFT keys),
checked against the transformer's weight shapes, and kept by name.

An `Adapter` holds its transformer LoRA factors per targeted layer with PEFT's scaling (alpha / r,
patterns included, as diffusers derives it), which is what the merge maths (lora.merge) needs;
the torch runtime loads the file itself with `load_lora_weights` (runtime.adapters)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .files import MAX_ADAPTER_BYTES, adapter_file, inside
from .request import AdapterSet, LoraRef, adapter_set, refuse

PREFIX = "transformer."  # diffusers' key prefix of the transformer's LoRA layers
MAX_ADAPTERS = 64  # adapters held at once (each holds its factors in memory)


@dataclass(frozen=True)
class Factors:
    """One targeted layer: delta W = scaling * B @ A (A: r x in, B: out x r)."""

    a: Any
    b: Any
    scaling: float


@dataclass(frozen=True, eq=False)
class Adapter:
    """A checked adapter. file: where it was read (never shown to clients)."""

    name: str
    file: Path = field(repr=False)
    layers: Mapping[str, Factors] = field(repr=False)  # torch weight name ("layers.0.attention.to_q.weight") -> factors

    @property
    def rank(self) -> int:
        return max(int(f.a.shape[0]) for f in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size() for f in self.layers.values())

    def card(self) -> dict[str, Any]:
        """What /v1/models says of it: no path."""
        return {"rank": self.rank, "target_layers": len(self.layers)}


def state_dict_of(pipeline_cls: Any, file: Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """(state dict, metadata, network alphas) as the family's loader mixin reads the file (safetensors
    only: diffusers is told never to unpickle)."""
    try:
        out = pipeline_cls.lora_state_dict(str(file), return_lora_metadata=True, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - a user's file: its fault becomes a 400, never a 500
        raise refuse(f"lora file {file.name!r} is not a LoRA adapter this model's loader reads ({type(e).__name__})") from None
    if not isinstance(out, tuple):
        return out, None, None
    alphas = out[1] if len(out) == 3 else None
    return out[0], out[-1], alphas


def read_factors(name: str, state_dict: Mapping[str, Any], metadata: Mapping[str, Any] | None,
                 alphas: Mapping[str, Any] | None, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Factors]:
    """The transformer's factors per weight name, with PEFT's scaling, shape-checked against
    `shapes` (torch weight name -> shape); the message names the first key at fault."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    if not any(k.startswith(PREFIX) and ".lora_A." in k for k in state_dict):
        raise refuse(f"lora adapter {name!r} has no LoRA weights for this model's transformer; is it an adapter of this model family?")
    others = sorted(k for k in state_dict if not k.startswith(PREFIX))
    if others:
        raise refuse(f"lora adapter {name!r} has weights outside the transformer (first: {others[0]!r}); only transformer adapters are served")
    sd = {k[len(PREFIX):]: v for k, v in state_dict.items()}
    config = LoraConfig(**_config_kwargs(sd, metadata, alphas))
    layers: dict[str, Factors] = {}
    for key in sorted(sd):
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise refuse(f"lora key {PREFIX + key!r} is not a LoRA factor (DoRA and other variants are not served)")
            continue
        module = key.split(".lora_A.")[0]
        a, b = sd[key], sd.get(f"{module}.lora_B.weight")
        weight = f"{module}.weight"
        if b is None or weight not in shapes:
            what = "has no lora_B" if b is None else "names no layer of this model's transformer"
            raise refuse(f"lora key {PREFIX + key!r} {what}")
        want = tuple(shapes[weight])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != want[:2] or len(want) != 2:
            raise refuse(f"lora key {PREFIX + key!r}: factors {tuple(b.shape)} x {tuple(a.shape)} do not fit the layer's weight {want}")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern, module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, module), config.lora_alpha)
        scaling = alpha / (r ** 0.5 if config.use_rslora else r)
        layers[weight] = Factors(a.float(), b.float(), float(scaling))
    return layers


def _config_kwargs(sd: Mapping[str, Any], metadata: Mapping[str, Any] | None, alphas: Mapping[str, Any] | None) -> dict[str, Any]:
    """LoraConfig's arguments as diffusers makes them (loaders.peft.load_lora_adapter): the saved
    metadata where the file has it, else ranks and alphas read off the weights."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    if metadata:
        meta = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in metadata.items()}
        if "r" in meta:
            return meta
    ranks = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
    alphas = {k[len(PREFIX):]: v for k, v in (alphas or {}).items() if k.startswith(PREFIX)}
    return get_peft_kwargs(ranks, network_alpha_dict=alphas or None, peft_state_dict=sd, is_unet=False)


class Registry:
    """Adapters by name, shared by the request handlers and the worker (a lock guards the map).
    lora_dir: where request and load-route paths may point (None: no paths at all)."""

    def __init__(self, pipeline_cls: Any, shapes: Mapping[str, tuple[int, ...]], lora_dir: str | Path | None = None,
                 max_bytes: int = MAX_ADAPTER_BYTES, max_adapters: int = MAX_ADAPTERS) -> None:
        self.pipeline_cls = pipeline_cls
        self.shapes = dict(shapes)
        self.lora_dir = Path(lora_dir).resolve() if lora_dir else None
        self.max_bytes = max_bytes
        self.max_adapters = max_adapters
        self._adapters: dict[str, Adapter] = {}
        self._lock = threading.Lock()
        self.on_remove: list[Callable[[str], None]] = []  # runtimes drop what they hold of a removed adapter

    def read(self, name: str, path: str | Path, trusted: bool = False) -> Adapter:
        """Read and check an adapter file; trusted: the operator's --lora-modules (any path),
        else only inside lora_dir."""
        if not trusted:
            if self.lora_dir is None:
                raise refuse("this server loads no adapter paths (start it with --lora-dir DIR to allow files inside DIR)")
            path = inside(path, self.lora_dir)
        file = adapter_file(path, self.max_bytes)
        sd, metadata, alphas = state_dict_of(self.pipeline_cls, file)
        return Adapter(name, file, read_factors(name, sd, metadata, alphas, self.shapes))

    def add(self, adapter: Adapter) -> Adapter:
        with self._lock:
            if adapter.name in self._adapters:
                raise refuse(f"an adapter named {adapter.name!r} is already loaded; unload it first or pick another name")
            if len(self._adapters) >= self.max_adapters:
                raise refuse(f"this server already holds {self.max_adapters} adapters; unload one first")
            self._adapters[adapter.name] = adapter
        return adapter

    def load(self, name: str, path: str | Path, trusted: bool = False) -> Adapter:
        return self.add(self.read(name, path, trusted))

    def remove(self, name: str) -> None:
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise refuse(f"no adapter named {name!r} is loaded", 404)
        for drop in self.on_remove:
            drop(name)

    def get(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._adapters.get(name)
            known = sorted(self._adapters)
        if adapter is None:
            listed = f"; this server has {', '.join(map(repr, known[:10]))}" if known else "; this server has none loaded"
            raise refuse(f"unknown lora adapter {name!r}{listed}")
        return adapter

    def names(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._adapters)

    def adapters(self) -> list[Adapter]:
        with self._lock:
            return [self._adapters[n] for n in sorted(self._adapters)]

    def resolve(self, refs: tuple[LoraRef, ...]) -> AdapterSet:
        """The request's adapter set, loading those named with a path on first use (kept under
        their name). Blocking (file reads): callers run it off the event loop."""
        for ref in refs:
            if ref.path is None or ref.name in self.names():
                self.get(ref.name) if ref.path is None else self._same_file(ref)
                continue
            try:
                self.load(ref.name, ref.path)
            except Exception:
                if ref.name not in self.names():  # another request may have loaded it meanwhile
                    raise
        return adapter_set(refs)

    def _same_file(self, ref: LoraRef) -> None:
        if self.lora_dir is None:
            raise refuse("this server loads no adapter paths (start it with --lora-dir DIR to allow files inside DIR)")
        if adapter_file(inside(ref.path, self.lora_dir), self.max_bytes) != self.get(ref.name).file:
            raise refuse(f"adapter {ref.name!r} is already loaded from another file; pick another name")
