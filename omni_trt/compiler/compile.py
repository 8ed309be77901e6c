"""Compile an exported ONNX file into a TensorRT engine with polygraphy.

Strongly typed networks only: the ONNX dtypes are the precision (TensorRT 11 and TensorRT-RTX
have no FP16/BF16 builder flags). One optimization profile per engine. Flavour differences
(tensorrt vs tensorrt_rtx, compute-capability targets) live in trt_flavor.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..enginedir import trt_flavor
from ..enginedir.trt_flavor import Flavor
from ..errors import BuildError
from ..files import atomic_write

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profile = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]  # name -> (min, opt, max)

HEARTBEAT_S = 30.0  # a real transformer build takes minutes: say we are alive this often


@dataclass
class CompileResult:
    """What went into the engine, read from the parsed network and the builder config (an engine
    itself can only be deserialized on a GPU). Shapes use -1 for dynamic dims."""

    plan: Path
    seconds: float
    flavor: str
    version: str
    compute_capabilities: list[str] | None  # None: the library's default targets
    opt_level: int
    inputs: list[dict[str, Any]] = field(default_factory=list)  # {"name", "dtype", "shape"}
    outputs: list[dict[str, Any]] = field(default_factory=list)
    profile: dict[str, list[list[int]]] = field(default_factory=dict)  # name -> [min, opt, max]
    refittable: bool = False


def check_profile(inputs: Sequence[Mapping[str, Any]], profile: Profile) -> list[str]:
    """Problems between the network's inputs (shape with -1 for dynamic) and a profile: missing or
    unknown names, wrong rank, static dims that differ, min <= opt <= max violated."""
    problems = []
    names = {i["name"] for i in inputs}
    for extra in sorted(set(profile) - names):
        problems.append(f"profile names {extra!r}, which is not a network input (inputs: {sorted(names)})")
    for inp in inputs:
        name, shape = inp["name"], list(inp["shape"])
        if name not in profile:
            if any(d < 0 for d in shape):
                problems.append(f"input {name!r} has dynamic dims {shape} but no profile")
            continue
        lo, opt, hi = (list(s) for s in profile[name])
        if not len(lo) == len(opt) == len(hi) == len(shape):
            problems.append(f"input {name!r}: network rank {len(shape)}, profile {lo}/{opt}/{hi}")
            continue
        for axis, d in enumerate(shape):
            if d >= 0 and not lo[axis] == opt[axis] == hi[axis] == d:
                problems.append(f"input {name!r} axis {axis} is {d} in the ONNX, profile says {lo[axis]}/{opt[axis]}/{hi[axis]}")
            elif not 1 <= lo[axis] <= opt[axis] <= hi[axis]:
                problems.append(f"input {name!r} axis {axis}: need 1 <= min <= opt <= max, got {lo[axis]}/{opt[axis]}/{hi[axis]}")
    return problems


def compile_engine(
    onnx_path: Path,
    plan_path: Path,
    profile: Profile,
    flavor: Flavor,
    *,
    opt_level: int = 3,
    timing_cache: Path | None = None,
    compute_capabilities: list[str] | None = None,
    label: str | None = None,
    refittable: bool = False,
) -> CompileResult:
    """Build `plan_path` from `onnx_path` with one optimization profile. The timing cache is loaded
    when present and saved (merged) after the build. Writes the plan atomically. refittable: the
    engine's weights can be replaced in place (BuilderFlag.REFIT; LoRA adapters on TensorRT)."""
    label = label or plan_path.stem
    trt = flavor.import_module()  # switches polygraphy to this flavour before it imports TensorRT
    from polygraphy.logger import G_LOGGER

    t0 = time.perf_counter()
    colors, G_LOGGER.colors = G_LOGGER.colors, False  # else it nags about the optional 'colored' module
    try:
        return _compile(onnx_path, plan_path, profile, flavor, refittable, opt_level, timing_cache, compute_capabilities, label, t0)
    finally:
        G_LOGGER.colors = colors


def _compile(
    onnx_path: Path,
    plan_path: Path,
    profile: Profile,
    flavor: Flavor,
    refittable: bool,
    opt_level: int,
    timing_cache: Path | None,
    compute_capabilities: list[str] | None,
    label: str,
    t0: float,
) -> CompileResult:
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    trt = flavor.import_module()  # already imported by compile_engine: this only fetches it
    with G_LOGGER.verbosity(G_LOGGER.WARNING):  # our own log lines say what happens
        try:
            log.info("%s: parsing %s", label, onnx_path)
            builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
        except PolygraphyException as e:
            raise BuildError(f"{label}: TensorRT could not parse {onnx_path}: {e}") from e
        inputs = [_tensor_info(network.get_input(i)) for i in range(network.num_inputs)]
        outputs = [_tensor_info(network.get_output(i)) for i in range(network.num_outputs)]
        problems = check_profile(inputs, profile)
        if problems:
            raise BuildError(f"{label}: the profile does not fit the network:\n  " + "\n  ".join(problems))

        config, progress = _configure(builder, network, profile, flavor, trt, opt_level, timing_cache, compute_capabilities, label, refittable)
        targets = _targets(config, flavor)
        log.info(
            "%s: building %s %s engine (opt level %d, targets %s)",
            label, flavor.module, flavor.version(), opt_level, ", ".join(targets) if targets else "library default",
        )
        progress.start()
        try:
            data = EngineBytesFromNetwork((builder, network, parser), config)()
        except PolygraphyException as e:
            raise BuildError(
                f"{label}: TensorRT failed to build {onnx_path.name}: {e} (see the TensorRT messages above)"
            ) from e
        finally:
            progress.stop()

    plan_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(plan_path, data)
    if timing_cache is not None:  # the config's cache holds the loaded entries plus this build's
        cache = config.get_timing_cache()
        if cache is not None:
            with cache.serialize() as buffer:
                atomic_write(timing_cache, buffer)
    seconds = time.perf_counter() - t0
    log.info("%s: wrote %s (%.1f MB) in %.1f s", label, plan_path, plan_path.stat().st_size / 1e6, seconds)
    return CompileResult(
        plan=plan_path,
        seconds=seconds,
        flavor=flavor.target,
        version=flavor.version(),
        compute_capabilities=targets,
        opt_level=opt_level,
        inputs=inputs,
        outputs=outputs,
        profile={k: [list(s) for s in v] for k, v in profile.items()},
        refittable=refittable,
    )


def _configure(builder: Any, network: Any, profile: Profile, flavor: Flavor, trt: Any, opt_level: int, timing_cache: Path | None,
               compute_capabilities: list[str] | None, label: str, refittable: bool = False) -> tuple[Any, "_Progress"]:
    """The builder config: the one optimization profile, the targets, the timing cache and a progress monitor."""
    from polygraphy.backend.trt import Profile as PolyProfile
    from polygraphy.exception import PolygraphyException

    poly_profile = PolyProfile()
    for name, (lo, opt, hi) in profile.items():
        poly_profile.add(name, tuple(lo), tuple(opt), tuple(hi))
    # Deserializing a timing cache needs CUDA (TensorRT-RTX prints CUDA errors without one), and a
    # build without a GPU times nothing: load the cache only where there is a GPU.
    load_cache = timing_cache is not None and timing_cache.is_file() and trt_flavor.gpu() is not None
    cache_in = timing_cache.read_bytes() if load_cache else None
    progress = _Progress(trt, label)
    loader = trt_flavor.create_config(
        flavor,
        compute_capabilities,
        profiles=[poly_profile],
        builder_optimization_level=opt_level,
        # file-like objects: polygraphy would otherwise leave .lock files next to the cache
        load_timing_cache=_ReadableBytes(cache_in) if cache_in else None,
        progress_monitor=progress.monitor,
        refittable=refittable,
    )
    try:
        config = loader(builder, network)
    except PolygraphyException as e:
        raise BuildError(f"{label}: builder configuration failed: {e}") from e
    return config, progress


def _tensor_info(t: Any) -> dict[str, Any]:
    return {"name": t.name, "dtype": str(t.dtype).rsplit(".", 1)[-1].lower(), "shape": [int(d) for d in t.shape]}


def _targets(config: Any, flavor: Flavor) -> list[str] | None:
    """Compute-capability targets as the builder config holds them; None for library defaults."""
    if not flavor.rtx or not config.num_compute_capabilities:
        return None
    out = []
    for i in range(config.num_compute_capabilities):
        name = config.get_compute_capability(i).name  # "SM86", "CURRENT"
        out.append(trt_flavor.CURRENT if name == "CURRENT" else f"{int(name[2:-1])}.{int(name[-1])}")
    return out


class _ReadableBytes(io.BytesIO):
    mode = "rb"  # polygraphy checks the mode of file-like objects


class _Progress:
    """Logs each top-level builder phase, and a heartbeat line while a long build runs."""

    def __init__(self, trt: Any, label: str) -> None:
        self.label = label
        self.phases: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        self.t0 = time.perf_counter()
        outer = self

        class Monitor(trt.IProgressMonitor):
            # TensorRT calls these from its own threads
            def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                with outer.lock:
                    outer.phases.append(phase_name)
                if parent_phase is None:
                    log.info("%s: %s", outer.label, phase_name)

            def step_complete(self, phase_name: str, step: int) -> bool:
                return True  # False would cancel the build

            def phase_finish(self, phase_name: str) -> None:
                with outer.lock:
                    if phase_name in outer.phases:
                        outer.phases.remove(phase_name)

        self.monitor = Monitor()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()

    def _beat(self) -> None:
        while not self.done.wait(HEARTBEAT_S):
            with self.lock:
                phase = " > ".join(self.phases) or "working"
            elapsed = time.perf_counter() - self.t0
            log.info("%s: still building after %dm%02ds (%s)", self.label, elapsed // 60, elapsed % 60, phase)
