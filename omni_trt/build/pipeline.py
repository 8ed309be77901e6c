"""build-engine: export each component to ONNX, gate it on validation, compile it, record it.

    build_engines("Tongyi-MAI/Z-Image-Turbo")  ->  engines/Tongyi-MAI--Z-Image-Turbo/

Decisions (sizes, profile points, dtypes, what is up to date) are pure functions; the
orchestration loads only the components that need exporting, one at a time.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import (
    COMPONENTS,
    Family,
    ModelNotFound,
    Point,
    UnsupportedModel,
    detect_family,
)
from ..models.base import ComponentSpec
from . import manifest as mf
from . import trt_flavor
from .manifest import Action

log = logging.getLogger(__name__)

DTYPE_NAMES = ("bf16", "fp16", "fp32")
TOLERANCE = 1e-4  # fp32 relative error of ONNX Runtime vs the original diffusers forward
# Validation holds roughly the fp32 weights twice (torch module + ONNX Runtime session).
VALIDATION_MEMORY_FACTOR = 2.5
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default
DEFAULT_OPSET = 20  # export.DEFAULT_OPSET, without importing torch (tests check they agree)


class BuildError(RuntimeError):
    pass


# ---- pure decisions ----

Size = tuple[int, int]  # (width, height)


def parse_size(text: str) -> Size:
    """'1024x768' -> (1024, 768) (width x height, as in the API); '512' -> (512, 512)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", text)
    if not m:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


def check_size(family: Family, size: Size, what: str = "size") -> None:
    w, h = size
    rules = family.size
    for side in (w, h):
        if side % rules.multiple_of:
            raise ValueError(f"{what} {w}x{h}: {family.name} needs sides that are multiples of {rules.multiple_of}")
        if not rules.min_side <= side <= rules.max_side:
            raise ValueError(f"{what} {w}x{h}: {family.name} sides must be within {rules.min_side}..{rules.max_side}")


def resolve_sizes(
    family: Family, min_size: Size | str | None, opt_size: Size | str | None, max_size: Size | str | None
) -> tuple[Size, Size, Size]:
    """Profile sizes, defaulting to the family's (min: its smallest side, square; opt and max: its
    default size), checked against its size rules and min <= opt <= max per side."""
    default = (family.defaults.width, family.defaults.height)
    lo_in, opt_in, hi_in = _size(min_size), _size(opt_size), _size(max_size)
    # unset sizes follow the given ones: --max-size 512x512 alone moves opt down to it
    opt = opt_in or tuple(
        min(max(d, lo_in[i] if lo_in else 0), hi_in[i] if hi_in else d) for i, d in enumerate(default)
    )
    hi = hi_in or (max(default[0], opt[0]), max(default[1], opt[1]))
    lo = lo_in or (min(family.size.min_side, opt[0]), min(family.size.min_side, opt[1]))
    for what, s in (("--min-size", lo), ("--opt-size", opt), ("--max-size", hi)):
        check_size(family, s, what)
    if not (lo[0] <= opt[0] <= hi[0] and lo[1] <= opt[1] <= hi[1]):
        raise ValueError(
            f"sizes must satisfy min <= opt <= max per side; got min {lo[0]}x{lo[1]}, opt {opt[0]}x{opt[1]}, max {hi[0]}x{hi[1]}"
        )
    return lo, opt, hi


def _size(s: Size | str | None) -> Size | None:
    if s is None:
        return None
    return parse_size(s) if isinstance(s, str) else (int(s[0]), int(s[1]))


def resolve_text_len(family: Family, text_len: Sequence[int] | None) -> tuple[int, int, int]:
    if text_len is None:
        return tuple(family.text_len)  # type: ignore[return-value]
    lo, opt, hi = (int(x) for x in text_len)
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"text lengths must satisfy 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
    return lo, opt, hi


def profile_points(
    family: Family,
    component: str,
    sizes: tuple[Size, Size, Size],
    max_batch: int,
    text_len: tuple[int, int, int],
    static: bool = False,
) -> tuple[Point, Point, Point]:
    """min/opt/max request points of one component's engine profile.

    Batch is in images for the VAE. The transformer's batch doubles where the family runs CFG as
    one batch: max assumes CFG on, min assumes it off (guidance 0 is a valid request), opt
    follows the family's default guidance. static: one shape, the opt size with max_batch images.
    """
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    (lw, lh), (ow, oh), (hw, hh) = sizes
    tlo, topt, thi = text_len
    if component == "transformer":
        batch_lo, batch_opt = 1, family.transformer_batch(1, None)
        batch_hi = family.transformer_batch(max_batch, float("inf"))
        batch_static = family.transformer_batch(max_batch, None)
    else:
        batch_lo, batch_opt, batch_hi, batch_static = 1, 1, max_batch, max_batch
    if static:
        p = Point(batch=batch_static, height=oh, width=ow, text_len=topt)
        return p, p, p
    return (
        Point(batch=batch_lo, height=lh, width=lw, text_len=tlo),
        Point(batch=min(batch_opt, batch_hi), height=oh, width=ow, text_len=topt),
        Point(batch=batch_hi, height=hh, width=hw, text_len=thi),
    )


def fit_profile(spec: ComponentSpec, profile: Mapping[str, tuple[Sequence[int], ...]], onnx_dims: Mapping[str, Sequence[Any]]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The engine profile: dynamic axes from the spec's points, static axes from the exported
    ONNX. A family's specs carry the real checkpoint's static sizes (hidden sizes, channels); the
    ONNX of the model actually loaded (a tiny test model, a variant) is the authority on those."""
    out = {}
    for t in spec.inputs:
        dims = onnx_dims.get(t.name)
        shapes = [list(s) for s in profile[t.name]]
        if dims is not None and len(dims) == len(shapes[0]):
            for axis, d in enumerate(dims):
                if axis not in t.dynamic and isinstance(d, int) and d > 0:
                    for s in shapes:
                        s[axis] = d
        out[t.name] = tuple(tuple(s) for s in shapes)
    return out


def default_dtype(has_gpu: bool) -> str:
    return "bf16" if has_gpu else "fp32"


def component_dtype(spec: ComponentSpec, requested: str) -> tuple[str, str | None]:
    """The dtype a component is exported in, and a note where it differs from the request."""
    if requested not in DTYPE_NAMES:
        raise ValueError(f"dtype {requested!r}: choose one of {', '.join(DTYPE_NAMES)}")
    if requested == "fp16" and not spec.allow_fp16:
        return "fp32", f"fp16 is inaccurate for {spec.name}; exported in fp32 instead"
    return requested, None


def resolve_components(family: Family, requested: Sequence[str] | str | None) -> list[str]:
    available = [c for c in COMPONENTS if c in family.components] + [c for c in family.components if c not in COMPONENTS]
    if not available:
        raise UnsupportedModel(f"{family.name}: no component can be exported yet")
    if requested is None:
        return available
    names = [c.strip() for c in (requested.split(",") if isinstance(requested, str) else requested) if c.strip()]
    bad = [c for c in names if c not in family.components]
    if bad or not names:
        raise ValueError(f"unknown component(s) {', '.join(bad) or '(none)'} for {family.name}; choose from: {', '.join(available)}")
    return [c for c in available if c in names]


def model_slug(model: str) -> str:
    """engines/<slug>: 'org/name' -> 'org--name'; a local folder -> its name."""
    path = Path(model).expanduser()
    raw = path.resolve().name if path.exists() else str(model).strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "model"


def default_engine_dir(model: str) -> Path:
    return Path("engines") / model_slug(model)


def model_id(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def profile_json(profile: Mapping[str, tuple[Sequence[int], ...]]) -> dict[str, dict[str, list[int]]]:
    return {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in profile.items()}


def point_json(p: Point) -> dict[str, int]:
    return {"batch": p.batch, "height": p.height, "width": p.width, "text_len": p.text_len}


# ---- orchestration ----


@dataclass
class BuildReport:
    engine_dir: Path
    manifest: dict[str, Any]
    actions: dict[str, Action]
    wrote: bool
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # component -> stage -> s


def build_engines(
    model: str,
    engine_dir: Path | str | None = None,
    components: Sequence[str] | str | None = None,
    dtype: str | None = None,
    opset: int | None = None,
    min_size: Size | str | None = None,
    opt_size: Size | str | None = None,
    max_size: Size | str | None = None,
    max_batch: int = 1,
    text_len: Sequence[int] | None = None,
    static: bool = False,
    target: str = "auto",
    compute_capability: str | Sequence[str] | None = None,
    onnx_only: bool = False,
    force: bool = False,
    opt_level: int = DEFAULT_OPT_LEVEL,
    validate: bool = True,
) -> BuildReport:
    """Export, validate and compile `model`'s components into `engine_dir` and write its manifest.
    Redoes only what changed since the last run (see manifest.decide); nothing is written when
    everything is up to date."""
    model = str(model)
    family = detect_family(model)
    names = resolve_components(family, components)
    sizes = resolve_sizes(family, min_size, opt_size, max_size)
    texts = resolve_text_len(family, text_len)
    opset = opset or DEFAULT_OPSET
    gpu = trt_flavor.gpu()
    dtype = dtype or default_dtype(gpu is not None)
    flavor = None if onnx_only else trt_flavor.resolve(target, gpu is not None)
    if isinstance(compute_capability, str) or compute_capability is None:
        requested_cc = trt_flavor.parse_compute_capabilities(compute_capability)
    else:
        requested_cc = trt_flavor.parse_compute_capabilities(",".join(compute_capability))
    if flavor is None:
        ccs = None
    else:
        ccs = trt_flavor.resolve_compute_capabilities(flavor, requested_cc, gpu["compute_capability"] if gpu else None)
        if not flavor.rtx:  # datacenter engines run on the GPU they were built on
            ccs = [gpu["compute_capability"]] if gpu else None
    engine_dir = Path(engine_dir) if engine_dir is not None else default_engine_dir(model)
    log.info("%s: %s (%s), components %s, engine dir %s", family.name, model, family.pipeline_class, ", ".join(names), engine_dir)

    model_dir = resolve_model_dir(model, [family.components[n].pipeline_attr for n in names])
    versions = _versions(flavor)
    old = mf.read_or_none(engine_dir)
    if old is None and mf.manifest_path(engine_dir).is_file():
        log.warning("%s is unreadable or from another omni-trt version; rebuilding everything", mf.manifest_path(engine_dir))
    same_model = old is not None and old.get("model", {}).get("id") == model_id(model)

    # what each component needs, and what to redo
    plans: dict[str, dict[str, Any]] = {}
    actions: dict[str, Action] = {}
    for name in names:
        spec = family.components[name]
        comp_dtype, note = component_dtype(spec, dtype)
        if note:
            log.warning("%s: %s", name, note)
        points = profile_points(family, name, sizes, max_batch, texts, static)
        profile = spec.profile(*points)
        fingerprint = mf.model_fingerprint(model_dir, [spec.pipeline_attr])
        onnx_key = {
            "model": model_id(model),
            "fingerprint": fingerprint,
            "family": family.name,
            "dtype": comp_dtype,
            "opset": opset,
            "torch": versions["torch"],
            "diffusers": versions["diffusers"],
            "omni_trt": versions["omni_trt"],
        }
        engine_key = None
        if flavor is not None:
            engine_key = {
                "profile": profile_json(profile),
                "flavor": flavor.target,
                "version": versions["tensorrt"],
                "targets": ccs or "default",
                "opt_level": opt_level,
            }
        old_comp = (old or {}).get("components", {}).get(name, {}) if same_model else {}
        sizes_now = mf.present_sizes(engine_dir, mf.component_files(old_comp)) if old_comp else {}
        action = mf.decide(old if same_model else None, name, onnx_key, engine_key, sizes_now, force)
        actions[name] = action
        plans[name] = dict(spec=spec, dtype=comp_dtype, note=note, points=points, profile=profile, onnx_key=onnx_key, engine_key=engine_key)
        if action.up_to_date:
            log.info("%s: up to date", name)
        else:
            todo = " + ".join(s for s, on in (("export", action.export), ("build", action.build), ("drop stale engine", action.drop_engine)) if on)
            log.info("%s: %s (%s)", name, todo, "; ".join(action.reasons))

    # entries of components not in this run survive only if built from this same model
    new = _carry_over(old, names, model_dir, family) if same_model else _fresh(old, engine_dir)
    if all(a.up_to_date for a in actions.values()) and same_model and new["components"] == old.get("components"):
        log.info("everything in %s is up to date; nothing to do (--force rebuilds)", engine_dir)
        return BuildReport(engine_dir, old, actions, wrote=False)

    new.update(
        format=mf.FORMAT,
        model={"id": model_id(model), "family": family.name, "pipeline_class": family.pipeline_class},
        versions=versions,
        gpu=gpu,
        built_at=mf.now(),
    )
    seconds: dict[str, dict[str, float]] = {}
    engine_dir.mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            action, plan = actions[name], plans[name]
            if action.up_to_date:
                new["components"][name] = old["components"][name]
                continue
            seconds[name] = {}
            entry = dict(new["components"].get(name) or {})
            if action.export or action.drop_engine or action.build:
                # the old engine is stale from here on, whatever happens next
                _remove(engine_dir, [mf.plan_relpath(name)], new["files"])
                entry["engine"] = None
                new["components"][name] = entry
            if action.export:
                new["components"].pop(name, None)  # its ONNX is being replaced
                entry = _export_component(family, name, plan, model_dir, engine_dir, opset, validate, seconds[name], new["files"])
                new["components"][name] = entry  # kept even if the engine build below fails
            if action.build:
                engine, profile = _build_component(name, plan, flavor, engine_dir, opt_level, ccs, gpu, versions, seconds[name], new["files"])
                entry.update(
                    engine=engine,
                    points={k: point_json(p) for k, p in zip(("min", "opt", "max"), plan["points"])},
                    profile=profile_json(profile),
                )
    finally:
        new["model"]["fingerprint"] = mf.combined_fingerprint(new["components"])
        mf.write(engine_dir, new)
    log.info("engines in %s (manifest %s)", engine_dir, mf.manifest_path(engine_dir))
    return BuildReport(engine_dir, new, actions, wrote=True, seconds=seconds)


def _carry_over(old: Mapping[str, Any], names: Sequence[str], model_dir: Path, family: Family) -> dict[str, Any]:
    """The old manifest's other components, kept when their source is unchanged (a later run
    with --components vae_decoder must not forget the transformer)."""
    new: dict[str, Any] = {"components": {}, "files": dict(old.get("files", {}))}
    for name, comp in old.get("components", {}).items():
        if name in names:
            new["components"][name] = comp
            continue
        spec = family.components.get(name)
        key = comp.get("onnx", {}).get("key", {})
        if spec is not None and key.get("fingerprint") == mf.model_fingerprint(model_dir, [spec.pipeline_attr]):
            new["components"][name] = comp
        else:
            log.warning("%s: built from another version of the model; removing its stale files", name)
            for rel in mf.component_files(comp):
                new["files"].pop(rel, None)
    return new


def _fresh(old: Mapping[str, Any] | None, engine_dir: Path) -> dict[str, Any]:
    """A different model (or no manifest): start over; files of the old model go."""
    if old:
        log.warning("%s held engines of %s; replacing them", engine_dir, old.get("model", {}).get("id"))
        for rel in old.get("files", {}):
            (engine_dir / rel).unlink(missing_ok=True)
    return {"components": {}, "files": {}}


def _remove(engine_dir: Path, rels: Sequence[str], files: dict[str, Any]) -> None:
    for rel in rels:
        (engine_dir / rel).unlink(missing_ok=True)
        files.pop(rel, None)


def _export_component(
    family: Family,
    name: str,
    plan: Mapping[str, Any],
    model_dir: Path,
    engine_dir: Path,
    opset: int,
    validate: bool,
    seconds: dict[str, float],
    files: dict[str, Any],
) -> dict[str, Any]:
    import torch

    from .export import DTYPES, check_dynamic_dims, export_component

    spec: ComponentSpec = plan["spec"]
    dtype = DTYPES[plan["dtype"]]
    rel = mf.onnx_relpath(name)
    out = engine_dir / rel
    _remove(engine_dir, [rel, rel + ".data"], files)

    t0 = time.perf_counter()
    log.info("%s: loading %s from %s (%s)", name, spec.pipeline_attr, model_dir, plan["dtype"])
    module = load_component(model_dir, spec.pipeline_attr, dtype)
    seconds["load"] = time.perf_counter() - t0
    validation: dict[str, Any] = {"tolerance": TOLERANCE, "dtype": "fp32", "errors": {}, "skipped": None}
    try:
        numel = sum(p.numel() for p in module.parameters())
        fits = _fits_in_memory(numel * 4 * VALIDATION_MEMORY_FACTOR)
        if not validate:
            validation["skipped"] = "--no-validate"
        elif not fits:
            validation["skipped"] = (
                f"the fp32 model ({numel * 4 / 1e9:.1f} GB) does not fit in host memory twice; "
                "validate on a larger machine or trust the family's exporter tests"
            )
        if validation["skipped"]:
            log.warning("%s: validation skipped: %s", name, validation["skipped"])

        if not validation["skipped"] and dtype != torch.float32:
            # ONNX Runtime on CPU cannot run bf16 MatMul: validate an fp32 twin of the same graph.
            # It proves the export (wrapper, dynamic dims); the precision is checked on a GPU.
            log.info("%s: validating an fp32 twin first (ONNX Runtime CPU cannot run %s)", name, plan["dtype"])
            with tempfile.TemporaryDirectory(dir=engine_dir, prefix=".twin-") as tmp:
                t0 = time.perf_counter()
                with _quiet():
                    twin = export_component(family, name, module, Path(tmp) / f"{name}.onnx", torch.float32, opset)
                seconds["twin_export"] = time.perf_counter() - t0
                validation["errors"] = _validate(family, name, spec, module, twin.path, twin.dynamic_inputs, seconds)

        log.info("%s: exporting ONNX (%s, opset %d)", name, plan["dtype"], opset)
        t0 = time.perf_counter()
        with _quiet():
            result = export_component(family, name, module, out, dtype, opset)
        seconds["export"] = time.perf_counter() - t0
        log.info("%s: exported %s in %.1f s", name, out, seconds["export"])
        check_dynamic_dims(spec, result.dynamic_inputs)  # the real export's dims are what engines get
        if not validation["skipped"] and dtype == torch.float32:
            validation["errors"] = _validate(family, name, spec, module, out, result.dynamic_inputs, seconds)
    except Exception:
        _remove(engine_dir, [rel, rel + ".data"], files)
        raise
    finally:
        del module
        gc.collect()

    onnx_files = [r for r in (rel, rel + ".data") if (engine_dir / r).is_file()]
    files.update(mf.file_entries(engine_dir, onnx_files))
    return {
        "pipeline_attr": spec.pipeline_attr,
        "dtype": plan["dtype"],
        **({"dtype_note": plan["note"]} if plan["note"] else {}),
        "points": {k: point_json(p) for k, p in zip(("min", "opt", "max"), plan["points"])},
        "profile": profile_json(fit_profile(spec, plan["profile"], result.dynamic_inputs)),
        "inputs": _onnx_io(out, "input"),
        "outputs": _onnx_io(out, "output"),
        "onnx": {
            "path": rel,
            "files": onnx_files,
            "config_fingerprint": mf.model_fingerprint(model_dir, [spec.pipeline_attr], configs_only=True),
            "opset": opset,
            "exporter": f"torch.onnx dynamo (optimize) torch {torch.__version__}",
            "seconds": round(seconds["export"], 3),
            "validation": validation,
            "exported_at": mf.now(),
            "key": plan["onnx_key"],
        },
        "engine": None,
    }


def _validate(
    family: Family, name: str, spec: ComponentSpec, module: Any, path: Path, dims: Mapping[str, Any], seconds: dict[str, float]
) -> dict[str, float]:
    """The gate: dynamic dims really dynamic, and ONNX Runtime within TOLERANCE of the original
    diffusers forward at two distinct shapes."""
    import torch

    from .export import check_dynamic_dims, sample_points, validate_onnx

    check_dynamic_dims(spec, dims)
    t0 = time.perf_counter()
    with _quiet():
        errors = validate_onnx(family, name, module, path, torch.float32, sample_points(family))
    seconds["validate"] = time.perf_counter() - t0
    worst = max(errors.values())
    detail = ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    if not worst < TOLERANCE:
        raise BuildError(
            f"{name}: the ONNX graph does not match the diffusers forward: relative errors {detail} "
            f"(must be < {TOLERANCE:g}); nothing was built. This is an exporter bug for {family.name}."
        )
    log.info("%s: validated against diffusers at %d shapes: %s (%.1f s)", name, len(errors), detail, seconds["validate"])
    return errors


def _build_component(
    name: str,
    plan: Mapping[str, Any],
    flavor: trt_flavor.Flavor,
    engine_dir: Path,
    opt_level: int,
    ccs: list[str] | None,
    gpu: dict[str, str] | None,
    versions: Mapping[str, Any],
    seconds: dict[str, float],
    files: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], ...]]]:
    """Compile one engine; returns its manifest entry and the profile it was built with."""
    from .compile import compile_engine
    from .export import onnx_input_dims

    rel = mf.plan_relpath(name)
    onnx_rel = mf.onnx_relpath(name)
    _remove(engine_dir, [rel], files)
    profile = fit_profile(plan["spec"], plan["profile"], onnx_input_dims(engine_dir / onnx_rel))
    result = compile_engine(
        engine_dir / onnx_rel,
        engine_dir / rel,
        profile,
        flavor,
        opt_level=opt_level,
        timing_cache=engine_dir / mf.timing_cache_name(flavor.target, versions["tensorrt"]),
        compute_capabilities=ccs if flavor.rtx else None,
        label=name,
    )
    seconds["build"] = result.seconds
    files.update(mf.file_entries(engine_dir, [rel]))
    return {
        "path": rel,
        "flavor": flavor.target,
        "module": flavor.module,
        "version": result.version,
        "compute_capabilities": trt_flavor.recorded_targets(flavor, ccs),
        "compute_capabilities_source": "requested" if ccs else ("library default" if flavor.rtx else "build GPU"),
        "gpu": gpu,
        "opt_level": opt_level,
        "io": {"inputs": result.inputs, "outputs": result.outputs},
        "onnx_sha256": files[onnx_rel]["sha256"],
        "seconds": round(result.seconds, 3),
        "built_at": mf.now(),
        "key": plan["engine_key"],
    }, profile


def _onnx_io(path: Path, which: str) -> list[dict[str, Any]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    values = model.graph.input if which == "input" else model.graph.output
    return [
        {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            if v.type.tensor_type.elem_type != onnx.TensorProto.BFLOAT16
            else "bfloat16",
            "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        }
        for v in values
    ]


# ---- model loading ----


def resolve_model_dir(model: str, subfolders: Sequence[str]) -> Path:
    """A local pipeline folder as is; a hub id downloaded (model_index.json and only the
    needed component folders)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["model_index.json", *(f"{s}/*" for s in subfolders)]))
    except Exception as e:
        raise ModelNotFound(f"could not download {model!r} from the hub: {e}") from e


def load_component(model_dir: Path, attr: str, dtype: Any) -> Any:
    """One pipeline component from its subfolder, by the class model_index.json names."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    entry = index.get(attr)
    if not entry or entry[0] is None:
        raise ModelNotFound(f"{model_dir} has no {attr!r} component in model_index.json")
    library, class_name = entry
    cls = getattr(importlib.import_module(library), class_name)
    with _quiet():
        return cls.from_pretrained(model_dir, subfolder=attr, torch_dtype=dtype).eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide diffusers' dtype-cast notes and the exporter's torchvision notices during export."""
    loggers = [logging.getLogger(n) for n in ("diffusers", "torch.onnx", "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        from diffusers.utils import logging as dlog

        dlevel = dlog.get_verbosity()
        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover - diffusers is a dependency
        dlog, dlevel = None, None
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if dlog is not None:
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
