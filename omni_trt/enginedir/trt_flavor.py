"""The one place that knows the two TensorRT flavours apart.

Datacenter `tensorrt` and `tensorrt_rtx` share a Python API; polygraphy picks one when its
TensorRT backend is first imported, from env POLYGRAPHY_USE_TENSORRT_RTX. Everything that differs
lives here: module name, pip extra, how to read the version, whether engines can be built without
a GPU, and how compute-capability targets are set (RTX only). The compiler and the runtime import
this module instead of `tensorrt` directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import TensorRTNotInstalled, UsageError

ENV = "POLYGRAPHY_USE_TENSORRT_RTX"


@dataclass(frozen=True)
class Flavor:
    """target: the name on the command line and in manifests; module: what to import;
    extra: the pip extra of omni-trt that installs it; rtx: TensorRT-RTX (its builder runs on a
    CPU-only machine, and engines target a list of compute capabilities)."""

    target: str
    module: str
    extra: str
    rtx: bool

    @property
    def builds_without_gpu(self) -> bool:
        return self.rtx

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def version(self) -> str:
        return str(importlib.import_module(self.module).__version__)

    def import_module(self) -> Any:
        """The TensorRT module, with polygraphy switched to this flavour first."""
        activate(self)
        return importlib.import_module(self.module)


TENSORRT = Flavor("tensorrt", "tensorrt", "tensorrt", rtx=False)
TENSORRT_RTX = Flavor("tensorrt-rtx", "tensorrt_rtx", "rtx", rtx=True)
FLAVORS: dict[str, Flavor] = {f.target: f for f in (TENSORRT, TENSORRT_RTX)}
TARGETS = (*FLAVORS, "auto")


def install_hint() -> str:
    return (
        "install one: pip install 'omni-trt[tensorrt]' (datacenter GPUs, builds need a GPU) or "
        "pip install 'omni-trt[rtx]' (RTX GPUs; builds ahead of time without a GPU); "
        "--onnx-only needs neither"
    )


def resolve(target: str, has_gpu: bool) -> Flavor:
    """The flavour for `--target`. auto: with a GPU, datacenter TensorRT if installed (its engines
    run on every recent GPU), else TensorRT-RTX; without a GPU only TensorRT-RTX can build."""
    if target != "auto":
        if target not in FLAVORS:
            raise UsageError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
        flavor = FLAVORS[target]
        if not flavor.installed():
            raise TensorRTNotInstalled(
                f"--target {target} needs the {flavor.module} package: pip install 'omni-trt[{flavor.extra}]' "
                "(--onnx-only needs no TensorRT)"
            )
        if not has_gpu and not flavor.builds_without_gpu:
            raise TensorRTNotInstalled(
                f"{flavor.module} builds engines only on a machine with a GPU; build ahead of time without "
                "one with --target tensorrt-rtx, or export with --onnx-only"
            )
        return flavor
    order = (TENSORRT, TENSORRT_RTX) if has_gpu else (TENSORRT_RTX,)
    for flavor in order:
        if flavor.installed():
            return flavor
    if not has_gpu and TENSORRT.installed():
        raise TensorRTNotInstalled(
            "no GPU here and datacenter TensorRT cannot build without one: "
            "pip install 'omni-trt[rtx]' to build TensorRT-RTX engines ahead of time, or use --onnx-only"
        )
    raise TensorRTNotInstalled(f"no TensorRT installed; {install_hint()}")


def activate(flavor: Flavor) -> None:
    """Point polygraphy at `flavor`. Its TensorRT backend binds the module when first imported,
    so one process can use one flavour only."""
    want = flavor.rtx
    os.environ[ENV] = "1" if want else "0"
    if "polygraphy.config" in sys.modules:
        config = sys.modules["polygraphy.config"]
        if "polygraphy.backend.trt" in sys.modules and bool(config.USE_TENSORRT_RTX) != want:
            raise RuntimeError(
                f"polygraphy is already bound to {'tensorrt_rtx' if config.USE_TENSORRT_RTX else 'tensorrt'} "
                f"in this process; use one TensorRT flavour per process (wanted {flavor.module})"
            )
        config.USE_TENSORRT_RTX = want


# ---- compute-capability targets (TensorRT-RTX only) ----

CURRENT = "current"
# What TensorRT-RTX builds for when no target is set (its documentation; the builder config
# cannot be asked). Recorded in manifests so the runtime knows where such an engine runs.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")


def recorded_targets(flavor: Flavor, ccs: list[str] | None) -> list[str] | None:
    """The compute capabilities an engine was built for, as the manifest records them."""
    if not flavor.rtx:
        return None
    return list(ccs) if ccs else list(RTX_DEFAULT_TARGETS)


def parse_compute_capabilities(text: str | None) -> list[str] | None:
    """'8.6,8.9' -> ['8.6', '8.9']; 'current' -> ['current']; None/'' -> None (library default)."""
    if not text:
        return None
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.lower() == CURRENT:
            out.append(CURRENT)
            continue
        major, dot, minor = part.partition(".")
        if not (dot and major.isdigit() and minor.isdigit()):
            raise UsageError(f"compute capability {part!r} is not MAJOR.MINOR (e.g. 8.6) or 'current'")
        out.append(f"{int(major)}.{int(minor)}")
    if CURRENT in out and len(out) > 1:
        raise UsageError("'current' cannot be combined with other compute capabilities")
    return sorted(set(out), key=lambda s: tuple(int(x) for x in s.split("."))) if CURRENT not in out else out


def supported_compute_capabilities(flavor: Flavor) -> list[str]:
    """MAJOR.MINOR values the installed flavour can target ([] where targets cannot be set)."""
    if not flavor.rtx:
        return []
    trt = flavor.import_module()
    out = []
    for name in trt.ComputeCapability.__members__:
        if name.startswith("SM") and name[2:].isdigit():
            digits = name[2:]
            out.append(f"{int(digits[:-1])}.{int(digits[-1])}")
    return out


def resolve_compute_capabilities(flavor: Flavor, requested: list[str] | None, gpu_cc: str | None) -> list[str] | None:
    """Concrete engine targets ('8.6', ...) from --compute-capability; None means the library's
    defaults. Default: the current GPU where there is one. 'current' becomes the GPU's number so
    the manifest records what the engine runs on. Datacenter TensorRT builds for the GPU it runs
    on and takes no targets."""
    if not flavor.rtx:
        if requested:
            raise UsageError(
                "--compute-capability applies to --target tensorrt-rtx only; "
                "datacenter TensorRT builds for the GPU it runs on"
            )
        return None
    ccs = requested or ([gpu_cc] if gpu_cc else None)
    if ccs is None:
        return None
    if CURRENT in ccs:
        if not gpu_cc:
            raise UsageError("--compute-capability current needs a GPU; name the targets instead, e.g. 8.6,8.9")
        ccs = [gpu_cc]
    supported = supported_compute_capabilities(flavor)
    bad = [c for c in ccs if c not in supported]
    if bad:
        hint = " (for this GPU use --target tensorrt)" if gpu_cc in bad and not requested else ""
        raise UsageError(
            f"{flavor.module} {flavor.version()} cannot target compute capability {', '.join(bad)}{hint}; "
            f"it supports: {', '.join(supported)}"
        )
    return ccs


def create_config(flavor: Flavor, ccs: list[str] | None, **common: Any) -> Any:
    """polygraphy's builder-config loader for `flavor`; `common` are the options both share
    (profiles, builder_optimization_level, load_timing_cache, progress_monitor, ...)."""
    activate(flavor)
    if not flavor.rtx:
        from polygraphy.backend.trt import CreateConfig

        return CreateConfig(**common)
    from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

    if ccs == [CURRENT]:
        return CreateConfigRTX(use_gpu=True, **common)
    pairs = [tuple(int(x) for x in cc.split(".")) for cc in ccs] if ccs else None
    return CreateConfigRTX(compute_capabilities=pairs, **common)


def gpu() -> dict[str, str] | None:
    """Name and compute capability of the current CUDA GPU, or None on a CPU-only machine."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:  # a broken driver is the same as no GPU for building
        return None


def refitter(trt: Any, engine: Any, logger: Any) -> Any:
    """A refitter of a deserialized engine built with --refittable (BuilderFlag.REFIT): trt.Refitter
    in both flavours, by ONNX initializer name (set_named_weights). TensorRT-RTX refits only on a
    GPU, like it deserializes."""
    return trt.Refitter(engine, logger)


def check_refittable(flavor: Flavor | None, refittable: bool, has_gpu: bool) -> None:
    """Refuse a refittable build this machine cannot make: TensorRT-RTX compiles a refittable
    network's kernels on the GPU (its builder fails in Myelin without CUDA), unlike a plain one."""
    from ..errors import UsageError

    if refittable and flavor is not None and flavor.rtx and not has_gpu:
        raise UsageError("--refittable: TensorRT-RTX builds refittable engines only on a GPU machine (its CPU-only builder "
                         "cannot compile them); build there, or serve LoRA adapters from these engines with --runtime onnxruntime",
                         "--refittable")
