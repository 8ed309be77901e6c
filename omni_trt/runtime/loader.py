"""Load what `omni serve` / `omni generate` run: the plain pipeline, or the pipeline with the
engines of an engine dir swapped in for its transformer and VAE decoder.

Every refusal happens here, before a request is taken, and says what differs and the command
that rebuilds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any


from ..build import manifest as mf
from ..build import trt_flavor
from ..models import Family, detect_family, family_by_name
from .engines import OnnxRuntimeEngine, ProfiledEngine, TensorRTEngine
from .pipeline import DTYPES, LoadOptions, PipelineRuntime, default_device, load_pipeline
from .request import SizeLimits

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "tensorrt", "onnxruntime", "torch")


class EngineDirError(RuntimeError):
    """An engine dir that cannot be served as asked; the message says why and what to run."""


def _rebuild(built: mf.Built) -> str:
    return f"{mf.rebuild_command(built.raw, built.engine_dir)} --force"


def choose_runtime(requested: str, built: mf.Built, gpu: dict[str, str] | None, trt_installed: dict[str, str | None]) -> tuple[str, str]:
    """(runtime, reason). auto: TensorRT where every component has a plan, its TensorRT flavour
    and version are installed and the GPU is one the plans target; else ONNX Runtime.
    trt_installed: flavour -> installed version (None: not installed)."""
    if requested not in RUNTIMES:
        raise EngineDirError(f"unknown runtime {requested!r}; choose one of {', '.join(RUNTIMES)}")
    if requested in ("torch", "onnxruntime"):
        return requested, "asked for"
    problems = tensorrt_problems(built, gpu, trt_installed)
    if not problems:
        return "tensorrt", "plans match this GPU and TensorRT"
    if requested == "tensorrt":
        raise EngineDirError("cannot serve these engines with TensorRT: " + "; ".join(problems))
    return "onnxruntime", "no TensorRT: " + "; ".join(problems)


def tensorrt_problems(built: mf.Built, gpu: dict[str, str] | None, trt_installed: dict[str, str | None]) -> list[str]:
    """Why the plans of `built` cannot run here ([] when they can)."""
    problems = []
    for name, c in built.components.items():
        if c.plan is None or c.tensorrt is None:
            problems.append(f"{name} has no TensorRT plan (built with --onnx-only)")
            continue
        flavor, version = c.tensorrt["flavor"], c.tensorrt["version"]
        have = trt_installed.get(flavor)
        if have is None:
            hint = trt_flavor.FLAVORS[flavor].extra if flavor in trt_flavor.FLAVORS else flavor
            problems.append(f"{name} was built with {flavor} {version}, which is not installed (pip install 'omni-trt[{hint}]')")
        elif have != version:
            problems.append(f"{name} was built with {flavor} {version}, this machine has {have}")
        if gpu is None:
            problems.append(f"{name}: no CUDA GPU here")
            continue
        targets = c.tensorrt.get("compute_capabilities") or []  # [] for datacenter TensorRT: the build GPU
        built_gpu = c.tensorrt.get("gpu") or {}
        if targets and gpu["compute_capability"] not in targets:
            problems.append(f"{name} targets compute capability {', '.join(targets)}, this GPU ({gpu['name']}) is {gpu['compute_capability']}")
        elif not targets and built_gpu and built_gpu.get("compute_capability") != gpu["compute_capability"]:
            problems.append(f"{name} was built on {built_gpu.get('name')} ({built_gpu.get('compute_capability')}), this GPU is {gpu['name']} ({gpu['compute_capability']})")
    return problems


def engine_limits(family: Family, built: mf.Built, engine_dir: Path) -> SizeLimits:
    """The family's size rules narrowed to what every component's profile covers."""
    lo = [c.points["min"] for c in built.components.values()]
    hi = [c.points["max"] for c in built.components.values()]
    return SizeLimits(
        multiple_of=family.size.multiple_of,
        min_side=family.size.min_side,
        max_side=family.size.max_side,
        min_width=max(p.width for p in lo),
        max_width=min(p.width for p in hi),
        min_height=max(p.height for p in lo),
        max_height=min(p.height for p in hi),
        source=f"the engine profile in {engine_dir}; rebuild with wider --min-size/--max-size for more",
    )


def _installed_trt() -> dict[str, str | None]:
    return {f.target: (f.version() if f.installed() else None) for f in trt_flavor.FLAVORS.values()}


def _component_config(model_dir: Path, attr: str) -> dict[str, Any]:
    return json.loads((Path(model_dir) / attr / "config.json").read_text())


def load_runtime(model: str | None, engine_dir: str | Path | None = None, runtime: str = "auto", options: LoadOptions | None = None) -> PipelineRuntime:
    """The runtime `serve` and `generate` use. Without an engine dir: the plain pipeline."""
    options = options or LoadOptions()
    if engine_dir is None:
        if runtime not in ("auto", "torch"):
            raise EngineDirError(f"--runtime {runtime} runs built engines: give --engine-dir DIR (made by omni build-engine)")
        if model is None:
            raise EngineDirError("no model: give MODEL or --engine-dir")
        return load_pipeline(model, options)
    engine_dir = Path(engine_dir)
    try:
        built = mf.load(engine_dir)
    except (mf.ManifestError, FileNotFoundError, KeyError, ValueError) as e:
        raise EngineDirError(f"{engine_dir} is not a usable engine dir ({e}); build one with: omni build-engine MODEL --engine-dir {engine_dir}") from e
    if model is not None and not _same_model(model, built.model):
        raise EngineDirError(
            f"{engine_dir} was built for {built.model}, not {model}; serve it without MODEL, or build for {model}: "
            f"omni build-engine {model} --engine-dir DIR"
        )
    model = built.model
    family = family_by_name(built.family)
    if detect_family(model).name != family.name:
        raise EngineDirError(f"{model} is no longer a {family.pipeline_class}; rebuild: {_rebuild(built)}")
    if runtime == "torch":
        log.info("--runtime torch: serving %s without the engines in %s", model, engine_dir)
        return load_pipeline(model, options, family)

    device = options.device or default_device()
    gpu = trt_flavor.gpu() if device.startswith("cuda") else None
    kind, why = choose_runtime(runtime, built, gpu, _installed_trt())
    log.info("runtime %s (%s)", kind, why)
    used = [str(c.plan.relative_to(engine_dir)) if kind == "tensorrt" else str(c.onnx.relative_to(engine_dir)) for c in built.components.values()]
    files = built.raw.get("files", {})
    used += [rel for rel in files if any(rel.startswith(u) for u in used) and rel not in used]  # external data
    problems = mf.verify(engine_dir, {"files": {rel: files[rel] for rel in used if rel in files}, "components": {}})
    problems += [f"{rel}: not listed in the manifest" for rel in used if rel not in files]
    if problems:
        raise EngineDirError(f"{engine_dir} does not match its manifest: {'; '.join(problems)}. Rebuild: {_rebuild(built)}")

    attrs = [family.components[name].pipeline_attr for name in built.components]
    local = Path(model).expanduser().is_dir()
    model_dir = Path(model).expanduser() if local else _hub_configs(model, attrs)
    # A hub model's replaced weights are never downloaded, so only its configs can be compared.
    changed = mf.model_mismatches(built.raw, model_dir, configs_only=not local)
    if changed:
        raise EngineDirError(f"the model changed since the engines were built: {'; '.join(changed)}. Rebuild: {_rebuild(built)}")

    trt = None
    if kind == "tensorrt":
        flavors = {c.tensorrt["flavor"] for c in built.components.values()}
        if len(flavors) != 1:
            raise EngineDirError(f"components were built with different TensorRT flavours ({', '.join(sorted(flavors))}); rebuild: {_rebuild(built)}")
        trt = trt_flavor.FLAVORS[flavors.pop()].import_module()
    replacements: dict[str, Any] = {}
    for name, entry in built.components.items():
        spec = family.components[name]
        if spec.standin is None:
            raise EngineDirError(f"{family.name} {name} has no engine stand-in yet; serve with --runtime torch")
        engine = TensorRTEngine(entry.plan, trt, device) if kind == "tensorrt" else OnnxRuntimeEngine(entry.onnx, _ort_providers(device))
        standin = spec.standin(_component_config(model_dir, spec.pipeline_attr), ProfiledEngine(engine, entry.profile, name))
        replacements[spec.pipeline_attr] = standin.with_dtype(DTYPES[entry.dtype])
    opts = LoadOptions(options.device, options.dtype, options.vae_slicing, options.vae_tiling, replacements)
    rt = load_pipeline(str(model_dir) if local else model, opts, family)
    rt.model = model
    rt.kind = kind
    rt.components = {name: kind for name in built.components}
    rt.batch_limits = {name: c.points["max"].batch for name, c in built.components.items()}
    rt.limits = engine_limits(family, built, engine_dir)
    rt.profile = {name: {k: vars(p) for k, p in c.points.items() if k in ("min", "max")} for name, c in built.components.items()}
    text = built.components.get("transformer")
    if text is not None and family.text_len[0] != family.text_len[2]:
        # The pipeline truncates prompts to max_sequence_length: cap it at the built text range.
        rt.call_kwargs["max_sequence_length"] = text.points["max"].text_len
    return rt


def _hub_configs(model: str, attrs: list[str]) -> Path:
    """model_index.json and the replaced components' JSON files from the hub: not their weights."""
    from huggingface_hub import snapshot_download

    from ..models import ModelNotFound

    try:
        return Path(snapshot_download(model, allow_patterns=["model_index.json", *(f"{a}/*.json" for a in attrs)]))
    except Exception as e:
        raise ModelNotFound(f"could not fetch {model!r} from the hub: {e}") from e


def _ort_providers(device: str) -> list[str] | None:
    return ["CPUExecutionProvider"] if device == "cpu" else None


def _same_model(given: str, recorded: str) -> bool:
    a, b = Path(given).expanduser(), Path(recorded).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return given == recorded
