"""build-engine, carried out: survey what is there, plan (plan.make_plan), then export each
component to ONNX, gate it on validation, compile it, and write the manifest.

    build_engines("Tongyi-MAI/Z-Image-Turbo")  ->  engines/Tongyi-MAI--Z-Image-Turbo/

Only the components that need exporting are loaded, one at a time. Each manifest entry is
written once, when its component is done (an exported ONNX stays listed if its engine build
fails); the manifest is written whatever happens, so it always says what the dir holds.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import hub
from ..dtypes import torch_dtype
from ..enginedir import Action, ComponentEntry, EngineEntry, EngineIO, FileEntry, GpuInfo, Manifest, ModelEntry, OnnxEntry, PointEntry, Points
from ..enginedir import ShapeRange, TensorIO, Validation, combined_fingerprint, manifest_path, model_fingerprint, now, onnx_relpath, plan_relpath, present_sizes, timing_cache_name, trt_flavor
from ..enginedir.manifest import StepCacheEntry, WeightName
from ..errors import BuildError, ModelNotFound
from ..files import sha256_file
from ..models import detect_family
from .plan import TOLERANCE, BuildFacts, BuildOptions, BuildPlan, ComponentPlan, default_engine_dir, fit_profile, make_plan, resolve_components

log = logging.getLogger(__name__)

# Validation holds roughly the fp32 weights twice (torch module + ONNX Runtime session).
VALIDATION_MEMORY_FACTOR = 2.5


@dataclass
class BuildReport:
    engine_dir: Path
    manifest: Manifest
    actions: dict[str, Action]
    wrote: bool
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # component -> stage -> s


def build_engines(model: str, engine_dir: Path | str | None = None, **options: Any) -> BuildReport:
    """Export, validate and compile `model`'s components into `engine_dir` (default
    engines/<slug>/) and write its manifest; `options` are BuildOptions' fields. Redoes only what
    changed since the last run; nothing is written when everything is up to date."""
    opts = BuildOptions(**options)
    engine_dir = Path(engine_dir) if engine_dir is not None else default_engine_dir(str(model))
    facts = survey(str(model), engine_dir, opts)
    plan = make_plan(engine_dir, opts, facts)
    return run(plan)


def survey(model: str, engine_dir: Path, opts: BuildOptions) -> BuildFacts:
    """What planning needs to know: the model's family and files, the machine's GPU and
    TensorRT, and the engine dir's previous manifest."""
    family = detect_family(model)
    names = resolve_components(family, opts.components)
    gpu = trt_flavor.gpu()
    flavor = None if opts.onnx_only else trt_flavor.resolve(opts.target, gpu is not None)
    trt_flavor.check_refittable(flavor, opts.refittable, gpu is not None)
    targets = None
    if flavor is not None:
        cc = opts.compute_capability
        requested = trt_flavor.parse_compute_capabilities(cc if isinstance(cc, str) or cc is None else ",".join(cc))
        targets = trt_flavor.resolve_compute_capabilities(flavor, requested, gpu["compute_capability"] if gpu else None)
        if not flavor.rtx:  # datacenter engines run on the GPU they were built on
            targets = [gpu["compute_capability"]] if gpu else None
    log.info("%s: %s (%s), components %s, engine dir %s", family.name, model, family.pipeline_class, ", ".join(names), engine_dir)
    attrs = sorted({s.pipeline_attr for s in family.components.values()})
    needed = [family.components[n].pipeline_attr for n in names]
    model_dir = hub.model_dir(model, ["model_index.json", *(f"{a}/*" for a in needed)])
    old = Manifest.read_or_none(engine_dir)
    if old is None and manifest_path(engine_dir).is_file():
        log.warning("%s is unreadable or from another omni-trt version; rebuilding everything", manifest_path(engine_dir))
    return BuildFacts(
        model_id=hub.model_id(model),
        family=family,
        model_dir=model_dir,
        gpu=gpu,
        flavor=flavor,
        targets=targets,
        versions=_versions(flavor),
        old=old,
        fingerprints={a: model_fingerprint(model_dir, [a]) for a in attrs},
        sizes=present_sizes(engine_dir, old.files) if old else {},
    )


def run(plan: BuildPlan) -> BuildReport:
    """Carry out a plan; the manifest is written at the end, even after a failure."""
    engine_dir = plan.engine_dir
    actions = {n: c.action for n, c in plan.components.items()}
    for name, c in plan.components.items():
        if c.note:
            log.warning("%s: %s", name, c.note)
        log.info("%s: %s", name, c.action.describe())
    if plan.up_to_date:
        log.info("everything in %s is up to date; nothing to do (--force rebuilds)", engine_dir)
        return BuildReport(engine_dir, plan.old, actions, wrote=False)

    if plan.stale_files:
        what = "engines of another model" if plan.old is None else "files built from another version of the model"
        log.warning("%s: removing %s", engine_dir, what)
    for rel in plan.stale_files:
        (engine_dir / rel).unlink(missing_ok=True)
    old_files = plan.old.files if plan.old else {}
    files: dict[str, FileEntry] = {rel: old_files[rel] for c in plan.kept.values() for rel in c.files if rel in old_files}
    components: dict[str, ComponentEntry] = dict(plan.kept)
    seconds: dict[str, dict[str, float]] = {}
    engine_dir.mkdir(parents=True, exist_ok=True)
    try:
        for name, c in plan.components.items():
            old = plan.old.components.get(name) if plan.old else None
            if c.action.up_to_date:
                components[name] = old
                files.update({rel: old_files[rel] for rel in old.files if rel in old_files})
                continue
            seconds[name] = {}
            # The old engine is stale from here on, whatever happens next.
            (engine_dir / plan_relpath(name)).unlink(missing_ok=True)
            if c.action.export:
                onnx, io = _export(plan, c, seconds[name], files)
            else:
                onnx, io = old.onnx, (old.inputs, old.outputs)
                files.update({rel: old_files[rel] for rel in onnx.files})
            profile = fit_profile(c.spec, c.profile, {t.name: list(t.shape) for t in io[0]})
            engine = None
            try:
                if c.action.build:
                    engine = _build(plan, c, profile, seconds[name], files)
            finally:
                components[name] = ComponentEntry(
                    pipeline_attr=c.spec.pipeline_attr,
                    dtype=c.dtype,
                    dtype_note=c.note,
                    points=Points(**{k: PointEntry.of(p) for k, p in zip(("min", "opt", "max"), c.points)}),
                    profile={k: ShapeRange.of(v) for k, v in profile.items()},
                    inputs=io[0],
                    outputs=io[1],
                    onnx=onnx,
                    engine=engine,
                )
    finally:
        manifest = _write_manifest(plan, components, files)
    log.info("engines in %s (manifest %s)", engine_dir, manifest_path(engine_dir))
    return BuildReport(engine_dir, manifest, actions, wrote=True, seconds=seconds)


def _write_manifest(plan: BuildPlan, components: dict[str, ComponentEntry], files: dict[str, FileEntry]) -> Manifest | None:
    """What the engine dir holds now; with no component left, no manifest (an old one would
    name files that are gone)."""
    if not components:
        manifest_path(plan.engine_dir).unlink(missing_ok=True)
        return None
    manifest = Manifest(
        model=ModelEntry(
            id=plan.model_id,
            family=plan.family.name,
            pipeline_class=plan.family.pipeline_class,
            fingerprint=combined_fingerprint({n: c.onnx.key.get("fingerprint") for n, c in components.items()}),
        ),
        versions=plan.versions,
        gpu=GpuInfo(**plan.gpu) if plan.gpu else None,
        built_at=now(),
        components=components,
        files=files,
        step_cache=_kept_calibration(Manifest.read_or_none(plan.engine_dir), components, files),
    )
    manifest.write(plan.engine_dir)
    return manifest


def _kept_calibration(old: Manifest | None, components: dict[str, ComponentEntry], files: dict[str, FileEntry]) -> StepCacheEntry | None:
    """The step cache's calibration survives a rerun that left the transformer's graph as it was
    (its ratios describe that graph's outputs); any change to it drops them."""
    if old is None or old.step_cache is None or "transformer" not in components or "transformer" not in old.components:
        return None
    shas = [files[rel].sha256 if rel in files else None for rel in components["transformer"].onnx.files]
    old_shas = [old.files[rel].sha256 if rel in old.files else None for rel in old.components["transformer"].onnx.files]
    return old.step_cache if shas == old_shas else None


def _file_entries(engine_dir: Path, rels: list[str]) -> dict[str, FileEntry]:
    return {rel: FileEntry(sha256=sha256_file(engine_dir / rel), size=(engine_dir / rel).stat().st_size) for rel in rels}


def _export(plan: BuildPlan, c: ComponentPlan, seconds: dict[str, float], files: dict[str, FileEntry]) -> tuple[OnnxEntry, tuple[tuple[TensorIO, ...], tuple[TensorIO, ...]]]:
    """Export one component (and validate it): its ONNX entry and ONNX inputs/outputs."""
    import torch

    from .export import check_dynamic_dims, export_component

    engine_dir, name, spec = plan.engine_dir, c.name, c.spec
    dtype = torch_dtype(c.dtype)
    rel = onnx_relpath(name)
    out = engine_dir / rel
    for r in (rel, rel + ".data"):
        (engine_dir / r).unlink(missing_ok=True)
        files.pop(r, None)

    t0 = time.perf_counter()
    log.info("%s: loading %s from %s (%s)", name, spec.pipeline_attr, plan.model_dir, c.dtype)
    module = load_component(plan.model_dir, spec.pipeline_attr, dtype)
    seconds["load"] = time.perf_counter() - t0
    errors: dict[str, float] = {}
    skipped = None
    try:
        numel = sum(p.numel() for p in module.parameters())
        if not plan.validate:
            skipped = "--no-validate"
        elif not _fits_in_memory(numel * 4 * VALIDATION_MEMORY_FACTOR):
            skipped = (
                f"the fp32 model ({numel * 4 / 1e9:.1f} GB) does not fit in host memory twice; "
                "validate on a larger machine or trust the family's exporter tests"
            )
        if skipped:
            log.warning("%s: validation skipped: %s", name, skipped)

        if not skipped and dtype != torch.float32:
            # ONNX Runtime on CPU cannot run bf16 MatMul: validate an fp32 twin of the same graph.
            # It proves the export (wrapper, dynamic dims); the precision is checked on a GPU.
            log.info("%s: validating an fp32 twin first (ONNX Runtime CPU cannot run %s)", name, c.dtype)
            with tempfile.TemporaryDirectory(dir=engine_dir, prefix=".twin-") as tmp:
                t0 = time.perf_counter()
                with quiet():
                    twin = export_component(plan.family, name, module, Path(tmp) / f"{name}.onnx", torch.float32, plan.opset)
                seconds["twin_export"] = time.perf_counter() - t0
                errors = _validate(plan, c, module, twin.path, twin.dynamic_inputs, seconds)

        log.info("%s: exporting ONNX (%s, opset %d)", name, c.dtype, plan.opset)
        t0 = time.perf_counter()
        with quiet():
            result = export_component(plan.family, name, module, out, dtype, plan.opset)
        seconds["export"] = time.perf_counter() - t0
        log.info("%s: exported %s in %.1f s", name, out, seconds["export"])
        check_dynamic_dims(spec, result.dynamic_inputs)  # the real export's dims are what engines get
        if not skipped and dtype == torch.float32:
            errors = _validate(plan, c, module, out, result.dynamic_inputs, seconds)
        weights = _weight_names(module, out) if spec.pipeline_attr == "transformer" else {}
    except Exception:
        for r in (rel, rel + ".data"):
            (engine_dir / r).unlink(missing_ok=True)
        raise
    finally:
        del module
        gc.collect()

    onnx_files = [r for r in (rel, rel + ".data") if (engine_dir / r).is_file()]
    files.update(_file_entries(engine_dir, onnx_files))
    entry = OnnxEntry(
        path=rel,
        files=tuple(onnx_files),
        config_fingerprint=model_fingerprint(plan.model_dir, [spec.pipeline_attr], configs_only=True),
        opset=plan.opset,
        exporter=f"torch.onnx dynamo (optimize) torch {torch.__version__}",
        seconds=round(seconds["export"], 3),
        validation=Validation(tolerance=TOLERANCE, dtype="fp32", errors=errors, skipped=skipped),
        exported_at=now(),
        key=c.onnx_key,
        weights=weights,
    )
    return entry, (_onnx_io(out, "input"), _onnx_io(out, "output"))


def _weight_names(module: Any, path: Path) -> dict[str, WeightName]:
    """The transformer's torch weight name -> ONNX initializer map (lora.names), for LoRA adapters."""
    import onnx

    from ..lora.names import onnx_digests, torch_digests, weight_map

    found = weight_map(torch_digests(module), onnx_digests(onnx.load(str(path))))
    log.info("transformer: %d weights mapped to ONNX initializers (LoRA merges into these)", len(found))
    return {name: WeightName(onnx=init, transposed=flipped) for name, (init, flipped) in sorted(found.items())}


def _validate(plan: BuildPlan, c: ComponentPlan, module: Any, path: Path, dims: dict[str, Any], seconds: dict[str, float]) -> dict[str, float]:
    """The gate: dynamic dims really dynamic, and ONNX Runtime within TOLERANCE of the original
    diffusers forward at two distinct shapes."""
    import torch

    from .export import check_dynamic_dims, sample_points, validate_onnx

    check_dynamic_dims(c.spec, dims)
    t0 = time.perf_counter()
    with quiet():
        errors = validate_onnx(plan.family, c.name, module, path, torch.float32, sample_points(plan.family))
    seconds["validate"] = time.perf_counter() - t0
    worst = max(errors.values())
    detail = ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    if not worst < TOLERANCE:
        raise BuildError(
            f"{c.name}: the ONNX graph does not match the diffusers forward: relative errors {detail} "
            f"(must be < {TOLERANCE:g}); nothing was built. This is an exporter bug for {plan.family.name}."
        )
    log.info("%s: validated against diffusers at %d shapes: %s (%.1f s)", c.name, len(errors), detail, seconds["validate"])
    return errors


def _build(plan: BuildPlan, c: ComponentPlan, profile: dict, seconds: dict[str, float], files: dict[str, FileEntry]) -> EngineEntry:
    """Compile one engine with the fitted profile; its manifest entry."""
    from .compile import compile_engine

    engine_dir, flavor, name = plan.engine_dir, plan.flavor, c.name
    rel, onnx_rel = plan_relpath(name), onnx_relpath(name)
    files.pop(rel, None)
    result = compile_engine(
        engine_dir / onnx_rel,
        engine_dir / rel,
        profile,
        flavor,
        opt_level=plan.opt_level,
        timing_cache=engine_dir / timing_cache_name(flavor.target, plan.versions["tensorrt"]),
        compute_capabilities=plan.targets if flavor.rtx else None,
        label=name,
        refittable=bool(c.engine_key and c.engine_key.get("refittable")),
    )
    seconds["build"] = result.seconds
    files.update(_file_entries(engine_dir, [rel]))
    return EngineEntry(
        path=rel,
        flavor=flavor.target,
        module=flavor.module,
        version=result.version,
        compute_capabilities=trt_flavor.recorded_targets(flavor, plan.targets),
        compute_capabilities_source="requested" if plan.targets else ("library default" if flavor.rtx else "build GPU"),
        gpu=GpuInfo(**plan.gpu) if plan.gpu else None,
        opt_level=plan.opt_level,
        io=EngineIO(inputs=tuple(TensorIO(**t) for t in result.inputs), outputs=tuple(TensorIO(**t) for t in result.outputs)),
        onnx_sha256=files[onnx_rel].sha256,
        seconds=round(result.seconds, 3),
        built_at=now(),
        key=c.engine_key,
        refittable=result.refittable,
    )


def _onnx_io(path: Path, which: str) -> tuple[TensorIO, ...]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    values = model.graph.input if which == "input" else model.graph.output
    return tuple(
        TensorIO(
            name=v.name,
            dtype="bfloat16" if v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
            else onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            shape=tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim),
        )
        for v in values
    )


# ---- model loading ----


def load_component(model_dir: Path, attr: str, dtype: Any) -> Any:
    """One pipeline component from its subfolder, by the class model_index.json names."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    entry = index.get(attr)
    if not entry or entry[0] is None:
        raise ModelNotFound(f"{model_dir} has no {attr!r} component in model_index.json")
    library, class_name = entry
    cls = getattr(importlib.import_module(library), class_name)
    with quiet():
        return cls.from_pretrained(model_dir, subfolder=attr, torch_dtype=dtype).eval()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide diffusers' dtype-cast notes and the exporter's torchvision notices during export."""
    loggers = [logging.getLogger(n) for n in ("diffusers", "torch.onnx", "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    from diffusers.utils import logging as dlog

    dlevel = dlog.get_verbosity()
    dlog.set_verbosity_error()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        dlog.set_verbosity(dlevel)


def _fits_in_memory(nbytes: float) -> bool:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return nbytes < int(line.split()[1]) * 1024
    except OSError:
        pass
    return True  # unknown: try, the OS will say


def _versions(flavor: trt_flavor.Flavor | None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import diffusers
    import onnx
    import onnxruntime
    import torch

    try:
        ours = version("omni-trt")
    except PackageNotFoundError:
        ours = "dev"
    return {
        "omni_trt": ours,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tensorrt_flavor": flavor.target if flavor else None,
        "tensorrt": flavor.version() if flavor else None,
    }
