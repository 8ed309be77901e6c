"""Load what `omni serve` / `omni generate` run: the plain pipeline, or the pipeline with the
engines of an engine dir swapped in for its transformer and VAE (decoder, and encoder for edits).

`resolve_model` finds the model once (a `ModelRef`: cheap, before a server listens), and
`load_runtime` loads it. Every refusal happens here, before a request is taken, and says what
differs and the command that rebuilds.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import hub, ort
from ..dtypes import torch_dtype
from ..enginedir import Manifest, trt_flavor
from ..errors import EngineDirError, UsageError
from ..models import DEFAULTS_FILE, Defaults, Family, SizeLimits, detect_family, family_by_name, read_model_index
from .compiled import KIND as TORCH_COMPILE
from .engines import MissingEngine, OnnxRuntimeEngine, ProfiledEngine, TensorRTEngine
from .pipeline import EngineSwap, LoadOptions, PipelineRuntime, load_pipeline

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "tensorrt", "onnxruntime", "torch", TORCH_COMPILE)
ENGINE_RUNTIMES = ("auto", "tensorrt", "onnxruntime")  # the ones that run an engine dir's engines


def _rebuild(m: Manifest, engine_dir: Path) -> str:
    return f"{m.rebuild_command(engine_dir)} --force"


def choose_runtime(requested: str, m: Manifest, gpu: dict[str, str] | None, trt_installed: dict[str, str | None]) -> tuple[str, str]:
    """(runtime, reason). auto: TensorRT where every component has a plan, its TensorRT flavour
    and version are installed and the GPU is one the plans target; else ONNX Runtime.
    trt_installed: flavour -> installed version (None: not installed)."""
    if requested not in RUNTIMES:
        raise EngineDirError(f"unknown runtime {requested!r}; choose one of {', '.join(RUNTIMES)}")
    if requested in ("torch", "onnxruntime"):
        return requested, "asked for"
    problems = tensorrt_problems(m, gpu, trt_installed)
    if not problems:
        return "tensorrt", "plans match this GPU and TensorRT"
    if requested == "tensorrt":
        raise EngineDirError("cannot serve these engines with TensorRT: " + "; ".join(problems))
    return "onnxruntime", "no TensorRT: " + "; ".join(problems)


def tensorrt_problems(m: Manifest, gpu: dict[str, str] | None, trt_installed: dict[str, str | None]) -> list[str]:
    """Why the plans of `m` cannot run here ([] when they can)."""
    problems = []
    for name, c in m.components.items():
        engine = c.engine
        if engine is None:
            problems.append(f"{name} has no TensorRT plan (built with --onnx-only)")
            continue
        have = trt_installed.get(engine.flavor)
        if have is None:
            hint = trt_flavor.FLAVORS[engine.flavor].extra if engine.flavor in trt_flavor.FLAVORS else engine.flavor
            problems.append(f"{name} was built with {engine.flavor} {engine.version}, which is not installed (pip install 'omni-trt[{hint}]')")
        elif have != engine.version:
            problems.append(f"{name} was built with {engine.flavor} {engine.version}, this machine has {have}")
        if gpu is None:
            problems.append(f"{name}: no CUDA GPU here")
            continue
        targets = engine.compute_capabilities or ()  # () for datacenter TensorRT: the build GPU
        built_on = engine.gpu
        if targets and gpu["compute_capability"] not in targets:
            problems.append(f"{name} targets compute capability {', '.join(targets)}, this GPU ({gpu['name']}) is {gpu['compute_capability']}")
        elif not targets and built_on and built_on.compute_capability != gpu["compute_capability"]:
            problems.append(f"{name} was built on {built_on.name} ({built_on.compute_capability}), this GPU is {gpu['name']} ({gpu['compute_capability']})")
    return problems


def engine_limits(family: Family, m: Manifest, engine_dir: Path) -> SizeLimits:
    """The family's size rules narrowed to what every component's profile covers."""
    lo = [c.points.min for c in m.components.values()]
    hi = [c.points.max for c in m.components.values()]
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


def check_runtime(runtime: str, engine_dir: str | Path | None) -> None:
    """Refuse a runtime that does not go with the engine dir (or its absence), before loading."""
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == TORCH_COMPILE and engine_dir is not None:
        raise UsageError(f"--runtime {TORCH_COMPILE} compiles the PyTorch modules and runs no engines: drop --engine-dir "
                         "(and give MODEL), or serve the engines with --runtime auto, tensorrt or onnxruntime")


@dataclass(frozen=True)
class ModelRef:
    """The model a runtime loads, found once by `resolve_model`; plain data, so Ray can send it to
    every replica (the family by name: `family` looks it up).

    model: what is loaded: the hub id or local folder given, the engine dir's model (its manifest's
    id), or None for the embedded demo model (built on first use, by `source()`). name: the default
    served model name: the model as given, else the engine dir's model, else the demo's.
    config_dir and manifest (with an engine dir): the model's configs as checked (its local folder,
    or a hub snapshot of model_index.json and the replaced components' configs, no weights) and
    the engine dir's manifest they were checked against. defaults: the request defaults the
    model's folder carries (DEFAULTS_FILE), which replace the family's; None: the family's."""

    model: str | None
    engine_dir: Path | None
    family_name: str
    name: str
    config_dir: Path | None = None
    manifest: Manifest | None = field(default=None, compare=False, repr=False)
    defaults: Defaults | None = None

    @property
    def family(self) -> Family:
        family = family_by_name(self.family_name)
        return family if self.defaults is None else replace(family, defaults=self.defaults)

    def source(self) -> str:
        """What from_pretrained loads: the model, or the demo model's folder (built here on first
        use, so resolving stays cheap)."""
        if self.model is not None:
            return self.model
        from ..demo import ensure_demo_model

        return str(ensure_demo_model())

    def without_engines(self) -> ModelRef:
        """The same model loaded as it is (for the runtimes that run no engines)."""
        return ModelRef(self.model, None, self.family_name, self.name, defaults=self.defaults)


def resolve_model(model: str | None, engine_dir: str | Path | None = None) -> ModelRef:
    """The model to load, and every refusal that needs no loading: a path that is no model, an
    engine dir built for another model or family, or one this omni-trt cannot serve. Cheap: it
    builds no demo model, downloads no weights, and looks a hub model up at most once (configs)."""
    if engine_dir is not None:
        return _resolve_engine_dir(model, Path(engine_dir))
    from ..demo import DEMO_FAMILY, DEMO_NAME, TRAINED_DIR  # lazily: demo/ sits above runtime/

    if model is None or model == DEMO_NAME:  # the embedded demo (by its served name too): package data, nothing built
        return ModelRef(None, None, DEMO_FAMILY, DEMO_NAME, defaults=carried_defaults(family_by_name(DEMO_FAMILY), TRAINED_DIR))
    family = detect_family(model)
    return ModelRef(model, None, family.name, str(model), defaults=carried_defaults(family, model))


def carried_defaults(family: Family, model: str | Path) -> Defaults | None:
    """The family's defaults with the fields a local model folder's DEFAULTS_FILE gives (steps,
    width, height, guidance_scale, true_cfg_scale); None without one (a hub id: none)."""
    # A family with variants (Family.variants) takes the checkpoint's own from its model_index.json.
    defaults = family.defaults if family.variants is None else family.defaults_for(read_model_index(model))
    path = Path(model).expanduser() / DEFAULTS_FILE
    if not path.is_file():
        return None if family.variants is None else defaults
    try:
        return replace(defaults, **json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path} is not a JSON object of request defaults ({e})") from None


def _resolve_engine_dir(model: str | None, engine_dir: Path) -> ModelRef:
    m = Manifest.read(engine_dir)
    if model is not None and not hub.same_model(model, m.model.id):
        raise EngineDirError(
            f"{engine_dir} was built for {m.model.id}, not {model}; serve it without MODEL, or build for {model}: "
            f"omni build-engine {model} --engine-dir DIR"
        )
    family = _manifest_family(m, engine_dir)
    config_dir = _model_configs(m, family)
    if detect_family(config_dir).name != family.name:
        raise EngineDirError(f"{m.model.id} is no longer a {family.pipeline_class}; rebuild: {_rebuild(m, engine_dir)}")
    _check_owners(m, family, engine_dir)
    return ModelRef(m.model.id, engine_dir, family.name, str(model) if model is not None else m.model.id, config_dir, m,
                    carried_defaults(family, m.model.id))


def _manifest_family(m: Manifest, engine_dir: Path) -> Family:
    """The family the manifest names, refused when unknown or when it lists components the family lacks."""
    try:
        family = family_by_name(m.model.family)
    except Exception:
        raise EngineDirError(f"{engine_dir} names family {m.model.family!r}, which this omni-trt does not know; rebuild: {_rebuild(m, engine_dir)}") from None
    unknown = [n for n in m.components if n not in family.components]
    if unknown:
        raise EngineDirError(f"{engine_dir} lists components {family.name} does not have ({', '.join(unknown)}); rebuild: {_rebuild(m, engine_dir)}")
    return family


def _check_owners(m: Manifest, family: Family, engine_dir: Path) -> None:
    """A part of a stand-in (the VAE encoder) runs only beside the component that owns it."""
    for name in m.components:
        owner = family.components[name].part_of
        if owner is not None and owner not in m.components:
            raise EngineDirError(
                f"{engine_dir} has {name} but not {owner}, whose stand-in runs it; add it: {m.add_command(engine_dir, owner, like=name)}"
            )


def _model_configs(m: Manifest, family: Family) -> Path:
    """A local model's folder; for a hub model, one snapshot of model_index.json and the replaced
    components' configs: their weights are never downloaded, the configs are what is compared."""
    attrs = [family.components[name].pipeline_attr for name in m.components]
    return hub.model_dir(m.model.id, ["model_index.json", *(f"{a}/*.json" for a in attrs)])


def load_runtime(model: str | ModelRef | None, engine_dir: str | Path | None = None, runtime: str = "auto",
                 options: LoadOptions | None = None) -> PipelineRuntime:
    """The runtime `serve`, `generate` and `bench` use. `model`: a ModelRef from resolve_model
    (then nothing is resolved again, and its engine dir is the one used: give no engine_dir), or
    a model and engine dir to resolve here (no demo fallback: None and no engine dir is refused).
    Without an engine dir: the plain pipeline (torch-compile: compiled and warmed up)."""
    if isinstance(model, ModelRef) and engine_dir is not None:
        raise TypeError("load_runtime: a ModelRef carries its engine dir; give it to resolve_model")
    engine_dir = model.engine_dir if isinstance(model, ModelRef) else engine_dir
    check_runtime(runtime, engine_dir)
    if engine_dir is None and runtime not in ("auto", "torch", TORCH_COMPILE):
        raise EngineDirError(f"--runtime {runtime} runs built engines: give --engine-dir DIR (made by omni build-engine)")
    ref = model if isinstance(model, ModelRef) else _resolve_given(model, engine_dir, runtime)
    options = options or LoadOptions()
    if ref.engine_dir is None:
        return load_pipeline(ref.source(), options, ref.family, torch_compile=runtime == TORCH_COMPILE)
    if runtime == "torch":
        log.info("--runtime torch: serving %s without the engines in %s", ref.model, ref.engine_dir)
        return load_pipeline(ref.model, options, ref.family)
    return _load_with_engines(ref, runtime, options)


def _resolve_given(model: str | None, engine_dir: str | Path | None, runtime: str) -> ModelRef:
    if model is None and engine_dir is None:  # the demo fallback is the caller's: resolve_model(None)
        if runtime == TORCH_COMPILE:
            raise UsageError("no model: give MODEL")
        raise EngineDirError("no model: give MODEL or --engine-dir")
    return resolve_model(model, engine_dir)


def _load_with_engines(ref: ModelRef, runtime: str, options: LoadOptions) -> PipelineRuntime:
    engine_dir, family = ref.engine_dir, ref.family
    m = ref.manifest or Manifest.read(engine_dir)
    device = options.target_device
    kind = _engine_runtime(m, runtime, device)
    _verify_files(m, engine_dir, kind)
    local = hub.local_dir(ref.model) is not None
    # A replica on another machine lacks the hub snapshot resolve_model made: it fetches its own.
    config_dir = ref.config_dir if ref.config_dir is not None and ref.config_dir.is_dir() else _model_configs(m, family)
    changed = m.model_mismatches(config_dir, configs_only=not local)
    if changed:
        raise EngineDirError(f"the model changed since the engines were built: {'; '.join(changed)}. Rebuild: {_rebuild(m, engine_dir)}")
    engines = _open_engines(m, family, engine_dir, kind, device)
    swap = _engine_swap(m, family, engine_dir, kind, engines, config_dir)
    return load_pipeline(ref.model, options, family, swap, source=str(config_dir) if local else None)


def _engine_runtime(m: Manifest, runtime: str, device: str) -> str:
    """tensorrt or onnxruntime, as asked or as auto chooses, refused where it cannot run."""
    gpu = trt_flavor.gpu() if device.startswith("cuda") else None
    kind, why = choose_runtime(runtime, m, gpu, _installed_trt())
    log.info("runtime %s (%s)", kind, why)
    if kind == "onnxruntime" and device.startswith("cuda") and not ort.has_cuda():
        # Not ONNX Runtime on the CPU of a GPU host: every step would copy through host memory.
        raise EngineDirError(
            f"ONNX Runtime here has no CUDAExecutionProvider, so it cannot run these engines on {device} "
            f"(runtime {kind}: {why}): pip uninstall -y onnxruntime && pip install 'omni-trt[ort-gpu]', or --device cpu"
        )
    return kind


def _verify_files(m: Manifest, engine_dir: Path, kind: str) -> None:
    """The files `kind` runs (plans, or ONNX graphs and their external data) match the manifest."""
    used = [c.engine.path if kind == "tensorrt" else c.onnx.path for c in m.components.values()]
    used += [rel for c in m.components.values() for rel in c.onnx.files if kind != "tensorrt" and rel not in used]  # external data
    problems = m.verify(engine_dir, only=used)
    if problems:
        raise EngineDirError(f"{engine_dir} does not match its manifest: {'; '.join(problems)}. Rebuild: {_rebuild(m, engine_dir)}")


def _open_engines(m: Manifest, family: Family, engine_dir: Path, kind: str, device: str) -> dict[str, ProfiledEngine]:
    trt = None
    if kind == "tensorrt":
        flavors = {c.engine.flavor for c in m.components.values()}
        if len(flavors) != 1:
            raise EngineDirError(f"components were built with different TensorRT flavours ({', '.join(sorted(flavors))}); rebuild: {_rebuild(m, engine_dir)}")
        trt = trt_flavor.FLAVORS[flavors.pop()].import_module()
    engines: dict[str, ProfiledEngine] = {}
    for name, entry in m.components.items():
        spec = family.components[name]
        if spec.part_of is None and spec.standin is None:
            raise EngineDirError(f"{family.name} {name} has no engine stand-in yet; serve with --runtime torch")
        if kind == "tensorrt":
            engine = TensorRTEngine(engine_dir / entry.engine.path, trt, device)
        else:
            engine = OnnxRuntimeEngine(engine_dir / entry.onnx.path, device)
        engines[name] = ProfiledEngine(engine, entry.shape_ranges(), name)
    return engines


def _engine_swap(m: Manifest, family: Family, engine_dir: Path, kind: str, engines: dict[str, ProfiledEngine],
                 config_dir: Path) -> EngineSwap:
    """The stand-ins over the engines, and what the runtime reports and limits by them."""
    missing = _missing_parts(m, family, engine_dir)
    configs = {family.components[n].pipeline_attr: _component_config(config_dir, family.components[n].pipeline_attr) for n in m.components}
    standins = family.standins(configs, engines, lambda name: MissingEngine(name, missing[name]))
    owners = {family.components[n].pipeline_attr: entry for n, entry in m.components.items() if family.components[n].part_of is None}
    # The stand-in feeds its engines in the dtype of the component that owns the attribute.
    replacements = {attr: standin.with_dtype(torch_dtype(owners[attr].dtype)) for attr, standin in standins.items()}
    return EngineSwap(
        kind=kind,
        replacements=replacements,
        components={name: kind for name in m.components},
        batch_limits={name: c.points.max.batch for name, c in m.components.items()},
        limits=engine_limits(family, m, engine_dir),
        profile={name: {k: getattr(c.points, k).model_dump() for k in ("min", "max")} for name, c in m.components.items()},
        call_kwargs=_text_kwargs(family, m),
        edit_unavailable=missing.get("vae_encoder"),
        decoder_id=_decoder_id(m),
        engine_dir=str(engine_dir),
        **_lora_fields(m, engine_dir, kind, engines),
    )


def _lora_fields(m: Manifest, engine_dir: Path, kind: str, engines: dict[str, ProfiledEngine]) -> dict[str, Any]:
    """What LoRA adapters need of the engines (EngineSwap's lora_* fields): the transformer's engine,
    ONNX file and weight map, or why they cannot take adapters, with the command that fixes it."""
    entry = m.components.get("transformer")
    if entry is None:
        return {"lora_unavailable": f"{engine_dir} has no transformer engine to merge LoRA adapters into"}
    fields = {"lora_engine": engines["transformer"].engine, "lora_onnx": str(engine_dir / entry.onnx.path),
              "lora_weights": {name: (w.onnx, w.transposed) for name, w in entry.onnx.weights.items()}}
    if not entry.onnx.weights:
        fields["lora_unavailable"] = (f"the engines in {engine_dir} were built without the transformer's weight map that LoRA "
                                      f"adapters merge into; rebuild: {_rebuild(m, engine_dir)}")
    elif kind == "tensorrt" and not (entry.engine and entry.engine.refittable):
        fields["lora_unavailable"] = (f"the TensorRT transformer engine in {engine_dir} is not refittable, so LoRA adapters cannot be "
                                      f"switched into it; rebuild: {m.rebuild_command(engine_dir)} --refittable --force "
                                      "(or serve these engines with --runtime onnxruntime)")
    return fields


def _decoder_id(m: Manifest) -> str | None:
    """The VAE decoder's ONNX files by sha256 (the plans are built from them): what names its preview map."""
    entry = m.components.get("vae_decoder")
    return ",".join(m.files[rel].sha256 for rel in entry.onnx.files if rel in m.files) if entry else None


def _missing_parts(m: Manifest, family: Family, engine_dir: Path) -> dict[str, str]:
    """Parts of a stand-in this dir was built without (today only the VAE encoder, which only edits
    use): generations serve, and a call that needs one says what to build."""
    return {
        name: f"{engine_dir} was built without the {name}, so this server cannot edit images (it still generates them); "
              f"add it: {m.add_command(engine_dir, name, like=spec.part_of)}"
        for name, spec in family.components.items()
        if spec.part_of in m.components and name not in m.components
    }


def _text_kwargs(family: Family, m: Manifest) -> dict[str, Any]:
    """The pipeline truncates prompts to max_sequence_length: cap it at the built text range."""
    text = m.components.get("transformer")
    if text is not None and family.text_len[0] != family.text_len[2]:
        return {"max_sequence_length": text.points.max.text_len}
    return {}


def _component_config(model_dir: Path, attr: str) -> dict[str, Any]:
    return json.loads((Path(model_dir) / attr / "config.json").read_text())
