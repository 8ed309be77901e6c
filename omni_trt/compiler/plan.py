"""build-engine's decisions, as pure functions: sizes, profile points, dtypes, cache keys and
what to redo. `make_plan` turns what the user asked (BuildOptions) and what is there (BuildFacts,
gathered by execute.survey) into a BuildPlan; execute.run carries it out. Nothing here reads a
file, imports torch or touches TensorRT.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dtypes import check_dtype, default_dtype
from ..enginedir import Action, ComponentEntry, Manifest, decide
from ..enginedir.trt_flavor import Flavor
from ..errors import UnsupportedModel, UsageError
from ..models import COMPONENTS, Family, Point, SizeLimits, parse_size
from ..models.base import ComponentSpec

TOLERANCE = 1e-4  # fp32 relative error of ONNX Runtime vs the original diffusers forward
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default
DEFAULT_OPSET = 20  # export.DEFAULT_OPSET, without importing torch (tests check they agree)

Size = tuple[int, int]  # (width, height)
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class BuildOptions:
    """What `omni build-engine` was asked (its flags), before any defaulting."""

    components: Sequence[str] | str | None = None
    dtype: str | None = None
    opset: int = DEFAULT_OPSET
    min_size: Size | str | None = None
    opt_size: Size | str | None = None
    max_size: Size | str | None = None
    max_batch: int = 1
    text_len: Sequence[int] | None = None
    static: bool = False
    target: str = "auto"
    compute_capability: str | Sequence[str] | None = None
    onnx_only: bool = False
    force: bool = False
    opt_level: int = DEFAULT_OPT_LEVEL
    validate: bool = True
    refittable: bool = False  # the transformer engine's weights can be refit (LoRA on TensorRT)


@dataclass(frozen=True)
class BuildFacts:
    """What is there, gathered before planning: the model, the machine, the previous manifest.

    fingerprints: pipeline attr -> model_fingerprint of that subfolder; sizes: current size of
    every file the previous manifest lists (None where missing); targets: the resolved
    compute-capability targets (None: the library's defaults, or datacenter TensorRT)."""

    model_id: str
    family: Family
    model_dir: Path
    gpu: dict[str, str] | None
    flavor: Flavor | None
    targets: list[str] | None
    versions: dict[str, Any]
    old: Manifest | None
    fingerprints: Mapping[str, str]
    sizes: Mapping[str, int | None]


@dataclass(frozen=True)
class ComponentPlan:
    name: str
    spec: ComponentSpec
    dtype: str
    note: str | None  # why dtype differs from the one asked for
    points: tuple[Point, Point, Point]
    profile: Profile  # from the spec (the real checkpoint's static dims); fitted to the ONNX later
    onnx_key: dict[str, Any]
    engine_key: dict[str, Any] | None  # None: no engine wanted (--onnx-only)
    action: Action


@dataclass(frozen=True)
class BuildPlan:
    model_id: str
    family: Family
    engine_dir: Path
    model_dir: Path
    opset: int
    opt_level: int
    validate: bool
    flavor: Flavor | None
    targets: list[str] | None
    gpu: dict[str, str] | None
    versions: dict[str, Any]
    components: dict[str, ComponentPlan]  # this run's, in build order
    # Entries of components not in this run, kept because they come from this same model unchanged.
    kept: dict[str, ComponentEntry] = field(default_factory=dict)
    stale_files: tuple[str, ...] = ()  # files of the previous manifest that go (another model, changed source)
    old: Manifest | None = None  # the previous manifest, when it was of this model

    @property
    def up_to_date(self) -> bool:
        """Nothing to do: every component's action is a no-op and nothing goes."""
        if self.old is None or self.stale_files:
            return False
        keep = {**self.kept, **{n: self.old.components.get(n) for n in self.components}}
        return all(c.action.up_to_date for c in self.components.values()) and keep == self.old.components


# ---- sizes, text lengths, points ----


def resolve_sizes(
    family: Family, min_size: Size | str | None, opt_size: Size | str | None, max_size: Size | str | None
) -> tuple[Size, Size, Size]:
    """Profile sizes, defaulting to the family's (min: its smallest side, square; opt and max: its
    default size), checked against its size rules and min <= opt <= max per side."""
    default = (family.defaults.width, family.defaults.height)
    lo_in, opt_in, hi_in = (_size(s, what) for s, what in ((min_size, "--min-size"), (opt_size, "--opt-size"), (max_size, "--max-size")))
    # unset sizes follow the given ones: --max-size 512x512 alone moves opt down to it
    opt = opt_in or tuple(
        min(max(d, lo_in[i] if lo_in else 0), hi_in[i] if hi_in else d) for i, d in enumerate(default)
    )
    hi = hi_in or (max(default[0], opt[0]), max(default[1], opt[1]))
    lo = lo_in or (min(family.size.min_side, opt[0]), min(family.size.min_side, opt[1]))
    limits = SizeLimits.of(family)
    for what, (w, h) in (("--min-size", lo), ("--opt-size", opt), ("--max-size", hi)):
        limits.check(w, h, what)
    if not (lo[0] <= opt[0] <= hi[0] and lo[1] <= opt[1] <= hi[1]):
        raise UsageError(
            f"sizes must satisfy min <= opt <= max per side; got min {lo[0]}x{lo[1]}, opt {opt[0]}x{opt[1]}, max {hi[0]}x{hi[1]}"
        )
    return lo, opt, hi


def _size(s: Size | str | None, what: str) -> Size | None:
    if s is None:
        return None
    return parse_size(s, what) if isinstance(s, str) else (int(s[0]), int(s[1]))


def resolve_text_len(family: Family, text_len: Sequence[int] | None) -> tuple[int, int, int]:
    if text_len is None:
        return tuple(family.text_len)  # type: ignore[return-value]
    if len(text_len) != 3:
        raise UsageError(f"--text-len takes MIN,OPT,MAX, got {list(text_len)}", "--text-len")
    lo, opt, hi = (int(x) for x in text_len)
    if not 1 <= lo <= opt <= hi:
        raise UsageError(f"text lengths must satisfy 1 <= min <= opt <= max, got {lo}/{opt}/{hi}", "--text-len")
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
        raise UsageError(f"--max-batch must be >= 1, got {max_batch}", "--max-batch")
    (lw, lh), (ow, oh), (hw, hh) = sizes
    tlo, topt, thi = text_len
    if component == "transformer":
        batch_lo, batch_opt = 1, family.transformer_batch(1, None)
        batch_hi = family.transformer_batch(max_batch, float("inf"))
        batch_static = family.transformer_batch(max_batch, None)
    else:
        batch_lo, batch_opt, batch_hi, batch_static = 1, 1, max_batch, max_batch
    if static:
        if family.edits.reference_sizes:  # each input's own size, whatever the output's: no one shape serves edits
            raise UsageError("--static builds one shape, but this model's pipeline resizes every input image to a size of "
                             "its own (about 1024x1024 in area, the input's aspect): build without --static", "--static")
        p = Point(batch=batch_static, height=oh, width=ow, text_len=topt)
        return p, p, p
    # References the pipeline resizes itself (Edits.reference_sizes): their own range, per axis, at
    # every ratio the built sizes let a fitted input image have; an edit-only family's opt has one.
    refs = family.edits.reference_sizes((lw, lh), (hw, hh)) if family.edits.reference_sizes else ((0, 0),) * 3
    (rlw, rlh), (row, roh), (rhw, rhh) = refs
    return (
        Point(batch=batch_lo, height=lh, width=lw, text_len=tlo, reference_height=rlh, reference_width=rlw),
        Point(batch=min(batch_opt, batch_hi), height=oh, width=ow, text_len=topt, references=int(not family.edits.generations),
              reference_height=roh, reference_width=row),
        # The most reference images (Edits.references) at the largest size: edits' tokens stay in range.
        Point(batch=batch_hi, height=hh, width=hw, text_len=thi, references=family.edits.references,
              reference_height=rhh, reference_width=rhw),
    )


def fit_profile(spec: ComponentSpec, profile: Mapping[str, tuple[Sequence[int], ...]], onnx_dims: Mapping[str, Sequence[Any]]) -> Profile:
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


def profile_json(profile: Mapping[str, tuple[Sequence[int], ...]]) -> dict[str, dict[str, list[int]]]:
    return {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in profile.items()}


# ---- dtypes, components, names ----


def component_dtype(spec: ComponentSpec, requested: str) -> tuple[str, str | None]:
    """The dtype a component is exported in, and a note where it differs from the request."""
    check_dtype(requested)
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
        raise UsageError(f"unknown component(s) {', '.join(bad) or '(none)'} for {family.name}; choose from: {', '.join(available)}", "--components")
    return [c for c in available if c in names]


def model_slug(model: str) -> str:
    """engines/<slug>: 'org/name' -> 'org--name'; a local folder -> its name."""
    path = Path(model).expanduser()
    raw = path.resolve().name if path.exists() else str(model).strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "model"


def default_engine_dir(model: str) -> Path:
    return Path("engines") / model_slug(model)


# ---- the plan ----


def make_plan(engine_dir: Path, options: BuildOptions, facts: BuildFacts) -> BuildPlan:
    """Every decision of one build-engine run, from what was asked and what is there."""
    family = facts.family
    names = resolve_components(family, options.components)
    sizes = resolve_sizes(family, options.min_size, options.opt_size, options.max_size)
    texts = resolve_text_len(family, options.text_len)
    dtype = options.dtype or default_dtype("cuda" if facts.gpu else "cpu")
    old = facts.old if facts.old is not None and facts.old.model.id == facts.model_id else None
    components: dict[str, ComponentPlan] = {}
    for name in names:
        spec = family.components[name]
        comp_dtype, note = component_dtype(spec, dtype)
        points = profile_points(family, name, sizes, options.max_batch, texts, options.static)
        profile = spec.profile(*points)
        onnx_key = {
            "model": facts.model_id,
            "fingerprint": facts.fingerprints[spec.pipeline_attr],
            "family": family.name,
            "dtype": comp_dtype,
            "opset": options.opset,
            "torch": facts.versions["torch"],
            "diffusers": facts.versions["diffusers"],
            "omni_trt": facts.versions["omni_trt"],
        }
        engine_key = None
        if facts.flavor is not None:
            engine_key = {
                "profile": profile_json(profile),
                "flavor": facts.flavor.target,
                "version": facts.versions["tensorrt"],
                "targets": facts.targets or "default",
                "opt_level": options.opt_level,
            }
            if options.refittable and spec.pipeline_attr == "transformer":
                engine_key["refittable"] = True  # only when asked: existing engine dirs keep their keys
        action = decide(old, name, onnx_key, engine_key, facts.sizes, options.force)
        components[name] = ComponentPlan(name, spec, comp_dtype, note, points, profile, onnx_key, engine_key, action)

    kept: dict[str, ComponentEntry] = {}
    stale: list[str] = []
    if old is not None:
        # Other components' entries survive only if built from this same model, unchanged (a
        # later run with --components vae_decoder must not forget the transformer).
        for name, comp in old.components.items():
            if name in components:
                continue
            spec = family.components.get(name)
            if spec is not None and comp.onnx.key.get("fingerprint") == facts.fingerprints.get(spec.pipeline_attr):
                kept[name] = comp
            else:
                stale += comp.files
    elif facts.old is not None:
        stale = list(facts.old.files)  # another model's engines: they all go
    return BuildPlan(
        model_id=facts.model_id, family=family, engine_dir=Path(engine_dir), model_dir=facts.model_dir,
        opset=options.opset, opt_level=options.opt_level, validate=options.validate, flavor=facts.flavor,
        targets=facts.targets, gpu=facts.gpu, versions=facts.versions, components=components, kept=kept,
        stale_files=tuple(stale), old=old,
    )
