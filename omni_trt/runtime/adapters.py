"""LoRA adapters in a loaded runtime: the registry (omni_trt.lora) plus what puts an adapter set
into effect between batches, always on the worker thread under the runtime's lock.

The torch runtime uses diffusers' PEFT integration unmerged: each adapter is loaded once into the
transformer with `load_lora_weights(adapter_name=...)` and a batch's set is made active with
`set_adapters(names, scales)` (or `disable_lora` for none), so a switch costs a few attribute
writes, not a pass over the weights; benchmarks/lora.py measures what the unmerged branch costs
per step."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from ..errors import UsageError
from ..lora import MAX_LORAS_PER_REQUEST, AdapterSet, Registry, describe
from ..lora.files import MAX_ADAPTER_BYTES

log = logging.getLogger(__name__)

MAX_LORA_SESSIONS = 2  # --max-lora-sessions' default: ONNX Runtime sessions kept by adapter set, besides the base one


def weight_shapes(module: Any) -> dict[str, tuple[int, ...]]:
    """Torch weight name -> shape of a module's parameters (taken before any adapter is injected)."""
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


class TorchAdapters:
    """Puts adapter sets into a diffusers pipeline. `activate` runs under the runtime's lock."""

    kind = "set_adapters"

    def __init__(self, pipe: Any, registry: Registry, max_per_request: int = MAX_LORAS_PER_REQUEST, loading: bool = False) -> None:
        self.pipe = pipe
        self.registry = registry
        self.max_per_request = max_per_request
        self.loading = loading  # --enable-lora-loading: the load/unload routes answer
        self.switches = 0
        self.active: AdapterSet = ()
        self._in_pipe: set[str] = set()
        self._stale: set[str] = set()  # removed from the registry; deleted from the pipe on the next switch
        self._stale_lock = threading.Lock()
        registry.on_remove.append(self._forget)

    def _forget(self, name: str) -> None:
        with self._stale_lock:
            self._stale.add(name)

    def describe(self) -> dict[str, Any]:
        return {"applied_by": self.kind, "adapters": len(self.registry.names()), "switches": self.switches}

    def activate(self, adapters: AdapterSet) -> float | None:
        """Make `adapters` the active set; the seconds it took, or None when it already was."""
        with self._stale_lock:
            stale, self._stale = self._stale & self._in_pipe, set()
        if adapters == self.active and not stale:
            return None
        t0 = time.perf_counter()
        if stale:
            with warnings.catch_warnings():  # PEFT warns when the active adapter goes: the set below replaces it
                warnings.simplefilter("ignore", UserWarning)
                self.pipe.delete_adapters(sorted(stale))
            self._in_pipe -= stale
        for name, _ in adapters:
            if name not in self._in_pipe:
                adapter = self.registry.get(name)
                with warnings.catch_warnings():  # PEFT warns that a second adapter joins the first: that is the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    self.pipe.load_lora_weights(str(adapter.file), adapter_name=name)
                self._in_pipe.add(name)
        if adapters:
            self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
        elif self._in_pipe:
            self.pipe.disable_lora()
        self.active = adapters
        self.switches += 1
        seconds = time.perf_counter() - t0
        log.info("lora: active adapters %s (%.3fs)", describe(adapters), seconds)
        return seconds


def parse_modules(items: list[str] | None) -> dict[str, str]:
    """--lora-modules NAME=PATH ... -> {name: path}; each name once."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--lora-modules takes NAME=PATH, got {item!r}", "--lora-modules")
        if name in out:
            raise UsageError(f"--lora-modules names {name!r} twice", "--lora-modules")
        out[name] = path
    return out


def make_registry(pipeline_cls: Any, shapes: Mapping[str, tuple[int, ...]], modules: Mapping[str, str],
                  lora_dir: str | Path | None, max_bytes: int = MAX_ADAPTER_BYTES) -> Registry:
    """The registry with the operator's adapters loaded and checked (a bad one stops the start,
    naming the adapter and the fault)."""
    registry = Registry(pipeline_cls, shapes, lora_dir, max_bytes)
    for name, path in modules.items():
        try:
            registry.load(name, path, trusted=True)
        except UsageError as e:
            raise UsageError(f"--lora-modules {name}={path}: {e.message}", "--lora-modules") from None
    return registry


# ---- engines: adapter sets merged into their weights ----


class OnnxWeights:
    """The transformer's weights as its ONNX file holds them (what merges start from), read on
    first use; `layout` is the manifest's weight map (torch name -> (initializer, transposed))."""

    def __init__(self, path: str | Path, layout: Mapping[str, tuple[str, bool]]) -> None:
        import onnx

        self.path = Path(path)
        self.layout = dict(layout)
        self._model = onnx.load(str(self.path), load_external_data=False)
        self._inits = {i.name: i for i in self._model.graph.initializer}
        missing = sorted(init for init, _ in self.layout.values() if init not in self._inits)
        if missing:
            raise UsageError(f"{self.path.name} lacks initializers its manifest maps ({missing[0]!r}, ...): rebuild the engine dir")

    def keep(self, names: set[str]) -> None:
        """Only the weights whose initializers are among `names` (what an engine can refit): an
        adapter targeting another layer is then refused when it is loaded, naming its key."""
        dropped = sorted(n for n, (init, _) in self.layout.items() if init not in names)
        if dropped:
            log.warning("lora: %d transformer weights are not refittable in this engine (first: %s); adapters cannot target them",
                        len(dropped), dropped[0])
        self.layout = {n: v for n, v in self.layout.items() if v[0] in names}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Torch weight name -> torch shape, for the registry's shape check."""
        out = {}
        for name, (init, flipped) in self.layout.items():
            dims = tuple(int(d) for d in self._inits[init].dims)
            out[name] = dims[::-1] if flipped else dims
        return out

    def torch_weight(self, name: str) -> Any:
        """A weight in torch's layout (a torch tensor over the file's data)."""
        import torch
        from onnx import numpy_helper

        init, flipped = self.layout[name]
        w = torch.from_numpy(numpy_helper.to_array(self._inits[init], base_dir=str(self.path.parent)).copy())
        return w.t() if flipped else w

    def engine_array(self, name: str, weight: Any) -> tuple[str, Any]:
        """(initializer name, numpy array in the file's layout) for a torch-layout weight."""
        init, flipped = self.layout[name]
        return init, (weight.t() if flipped else weight).contiguous().numpy()


class MergedAdapters:
    """Adapter sets merged into an engine's weights (lora.merge: W + sum(scale * scaling * B @ A))."""

    kind = "merged"

    def __init__(self, registry: Registry, weights: OnnxWeights, max_per_request: int = MAX_LORAS_PER_REQUEST,
                 loading: bool = False) -> None:
        from ..lora.merge import targets

        self.registry = registry
        self.weights = weights
        self.max_per_request = max_per_request
        self.loading = loading
        self.active: AdapterSet = ()
        self.switches = 0
        self._targets = targets
        self._stale: set[str] = set()
        self._stale_lock = threading.Lock()
        registry.on_remove.append(self._forget)

    def _forget(self, name: str) -> None:
        with self._stale_lock:
            self._stale.add(name)

    def describe(self) -> dict[str, Any]:
        return {"applied_by": self.kind, "adapters": len(self.registry.names()), "switches": self.switches, **self.memory()}

    def memory(self) -> dict[str, Any]:
        return {}

    def merged(self, adapters: AdapterSet) -> dict[str, Any]:
        """Initializer name -> merged array (the file's layout and dtype) for the set's targets."""
        from ..lora.merge import merged_weight

        out = {}
        for name, terms in self._targets(adapters, self.registry.get).items():
            init, array = self.weights.engine_array(name, merged_weight(self.weights.torch_weight(name), terms))
            out[init] = array
        return out

    def activate(self, adapters: AdapterSet) -> float | None:
        with self._stale_lock:
            stale, self._stale = self._stale, set()
        if stale:
            self._drop(stale)
        if adapters == self.active:
            return None
        t0 = time.perf_counter()
        self._switch(adapters)
        self.active = adapters
        self.switches += 1
        seconds = time.perf_counter() - t0
        log.info("lora: %s active adapters %s (%.3fs)", self.kind, describe(adapters), seconds)
        return seconds

    def _drop(self, names: set[str]) -> None:
        """Forget what was made from removed adapters."""

    def _switch(self, adapters: AdapterSet) -> None:
        raise NotImplementedError


class SessionAdapters(MergedAdapters):
    """ONNX Runtime: one session per adapter set, its merged weights given as overridden
    initializers; the last `max_sessions` sets are kept (LRU), the base session always."""

    kind = "onnxruntime session"

    def __init__(self, engine: Any, registry: Registry, weights: OnnxWeights, max_sessions: int = 2, **kw: Any) -> None:
        super().__init__(registry, weights, **kw)
        from collections import OrderedDict

        self.engine = engine
        self.base = engine.session
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[AdapterSet, tuple[Any, list[Any], int]] = OrderedDict()  # set -> (session, values, bytes)

    def _switch(self, adapters: AdapterSet) -> None:
        if not adapters:
            self.engine.session = self.base
            return
        if adapters not in self.sessions:
            import onnxruntime

            values = {init: onnxruntime.OrtValue.ortvalue_from_numpy(a) for init, a in self.merged(adapters).items()}
            nbytes = sum(v.numpy().nbytes for v in values.values())
            self.sessions[adapters] = (self.engine.new_session(values), list(values.values()), nbytes)
            while len(self.sessions) > self.max_sessions:
                evicted, _ = self.sessions.popitem(last=False)
                log.info("lora: session for %s evicted (--max-lora-sessions %d)", describe(evicted), self.max_sessions)
        self.sessions.move_to_end(adapters)
        self.engine.session = self.sessions[adapters][0]

    def _drop(self, names: set[str]) -> None:
        for key in [k for k in self.sessions if any(n in names for n, _ in k)]:
            del self.sessions[key]
        if any(n in names for n, _ in self.active):
            self.engine.session, self.active = self.base, ()

    def memory(self) -> dict[str, Any]:
        """Sessions held and the merged weights they override (each session also holds the graph's
        other weights: ONNX Runtime does not share initializers between sessions)."""
        return {"sessions": len(self.sessions), "merged_mb": round(sum(b for _, _, b in self.sessions.values()) / 2**20, 1)}


class RefitAdapters(MergedAdapters):
    """TensorRT: the engine's weights refit in place (IRefitter, by the ONNX initializer names),
    between batches; the weights the previous set changed and this one does not go back to base."""

    kind = "tensorrt refit"

    def __init__(self, engine: Any, registry: Registry, weights: OnnxWeights, **kw: Any) -> None:
        super().__init__(registry, weights, **kw)
        self.engine = engine
        self._touched: set[str] = set()  # torch names the active set changed

    def _switch(self, adapters: AdapterSet) -> None:
        new = self.merged(adapters)
        names = set(self._targets(adapters, self.registry.get))
        for name in self._touched - names:
            init, array = self.weights.engine_array(name, self.weights.torch_weight(name))
            new[init] = array
        self.engine.refit(new)
        self._touched = names

    def _drop(self, names: set[str]) -> None:
        if any(n in names for n, _ in self.active):
            self._switch(())
            self.active = ()


class ModuleWeights:
    """A torch module's own weights as the merge base (torch-compile): a weight's original is kept
    the first time a set changes it, so any set merges from the base and the base can go back."""

    def __init__(self, module: Any) -> None:
        self.params = dict(module.named_parameters())
        self._base: dict[str, Any] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.params.items()}

    def torch_weight(self, name: str) -> Any:
        return self._base.get(name, self.params[name]).detach()

    def engine_array(self, name: str, weight: Any) -> tuple[str, Any]:
        return name, weight

    def refit(self, weights: Mapping[str, Any]) -> None:
        self.write(weights)

    def write(self, weights: Mapping[str, Any]) -> None:
        """Copy merged weights into the parameters in place: the compiled graphs read the same
        tensors, so nothing recompiles."""
        import torch

        with torch.no_grad():
            for name, w in weights.items():
                p = self.params[name]
                if name not in self._base:
                    self._base[name] = p.detach().clone()
                p.copy_(w)


class InPlaceAdapters(RefitAdapters):
    """torch-compile: the merged weights copied into the compiled modules' parameters in place
    (no LoRA branch in the graphs, no recompile on a switch); the weights the previous set changed
    and this one does not go back to base."""

    kind = "in-place merge"

    def __init__(self, weights: ModuleWeights, registry: Registry, **kw: Any) -> None:
        super().__init__(weights, registry, weights, **kw)  # the module's weights are their own "engine": refit = write

