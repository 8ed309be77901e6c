"""The engine dir's manifest.json, typed: what was built, from what, for what.

It is the build cache key (build-engine redoes only what an input change affects) and the
runtime's safety check (serve refuses engines that do not match the model, GPU or TensorRT).
The compiler writes it and the runtime reads it through these classes only; a file that does not
follow the schema (a missing or extra key, a wrong type, a path leaving the engine dir) is
refused with the key at fault and the command that rebuilds. Keys: engines/README.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ManifestError
from ..files import atomic_write, sha256_file
from ..models.base import Point
from .fingerprint import model_fingerprint
from .layout import escapes, is_inside, manifest_path

FORMAT = 1
DType = Literal["bf16", "fp16", "fp32"]


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _inside(rel: str) -> str:
    if not is_inside(rel):
        raise ValueError(f"{rel!r} is not a relative path inside the engine dir")
    return rel


RelPath = Annotated[str, AfterValidator(_inside)]  # what every file name in a manifest must be


class FileEntry(_Entry):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class PointEntry(_Entry):
    """A request point (models.base.Point) as JSON."""

    batch: int = Field(ge=1)
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    text_len: int = Field(ge=1)
    references: int = Field(0, ge=0)  # reference images the transformer's profile covers (Point.references)
    reference_height: int = Field(0, ge=0)  # 0: at the point's size (Point.reference_height)
    reference_width: int = Field(0, ge=0)

    @classmethod
    def of(cls, p: Point) -> "PointEntry":
        return cls(batch=p.batch, height=p.height, width=p.width, text_len=p.text_len, references=p.references,
                   reference_height=p.reference_height, reference_width=p.reference_width)

    @property
    def point(self) -> Point:
        return Point(batch=self.batch, height=self.height, width=self.width, text_len=self.text_len, references=self.references,
                     reference_height=self.reference_height, reference_width=self.reference_width)


class Points(_Entry):
    min: PointEntry
    opt: PointEntry
    max: PointEntry

    @model_validator(mode="after")
    def _ordered(self) -> "Points":
        for f in PointEntry.model_fields:
            lo, opt, hi = (getattr(getattr(self, k), f) for k in ("min", "opt", "max"))
            if not lo <= opt <= hi:
                raise ValueError(f"{f}: min {lo}, opt {opt}, max {hi} are not in order")
        return self


class ShapeRange(_Entry):
    """One input of an optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @model_validator(mode="after")
    def _ordered(self) -> "ShapeRange":
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError("min, opt and max have different ranks")
        if not all(1 <= a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            raise ValueError(f"not 1 <= min <= opt <= max: {self.min} / {self.opt} / {self.max}")
        return self

    @classmethod
    def of(cls, shapes: tuple[tuple[int, ...], ...]) -> "ShapeRange":
        return cls(min=shapes[0], opt=shapes[1], max=shapes[2])

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return self.min, self.opt, self.max


class TensorIO(_Entry):
    """An ONNX or TensorRT input/output: dims are ints, the dim name where dynamic (ONNX) or -1 (TensorRT)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


class Validation(_Entry):
    tolerance: float
    dtype: str
    errors: dict[str, float] = {}
    skipped: str | None = None


class WeightName(_Entry):
    """Where the ONNX graph holds one torch weight (lora.names): the initializer, and whether it is
    stored transposed (W.T). What LoRA merges into (ONNX Runtime) and refits (TensorRT)."""

    onnx: str
    transposed: bool = False


class OnnxEntry(_Entry):
    path: RelPath
    files: tuple[RelPath, ...] = Field(min_length=1)
    config_fingerprint: str
    opset: int
    exporter: str
    seconds: float
    validation: Validation
    exported_at: str
    key: dict[str, Any]  # what the export depends on (the rebuild decision compares it)
    weights: dict[str, WeightName] = {}  # the transformer's: torch weight name -> initializer (LoRA)


class GpuInfo(_Entry):
    name: str
    compute_capability: str


class EngineIO(_Entry):
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]


class EngineEntry(_Entry):
    path: RelPath
    flavor: str
    module: str
    version: str
    compute_capabilities: tuple[str, ...] | None  # None: datacenter TensorRT, the build GPU
    compute_capabilities_source: str
    gpu: GpuInfo | None
    opt_level: int
    io: EngineIO
    onnx_sha256: str
    seconds: float
    built_at: str
    key: dict[str, Any]  # what the build depends on
    refittable: bool = False  # build-engine --refittable: weights can be refit in place (LoRA on TensorRT)


class ComponentEntry(_Entry):
    pipeline_attr: str
    dtype: DType
    dtype_note: str | None = None
    points: Points
    profile: dict[str, ShapeRange] = Field(min_length=1)
    inputs: tuple[TensorIO, ...] = Field(min_length=1)
    outputs: tuple[TensorIO, ...] = Field(min_length=1)
    onnx: OnnxEntry
    engine: EngineEntry | None = None

    @model_validator(mode="after")
    def _profile_names_inputs(self) -> "ComponentEntry":
        names = {t.name for t in self.inputs}
        if set(self.profile) != names:
            raise ValueError(f"profile names {sorted(self.profile)}, the inputs are {sorted(names)}")
        return self

    @property
    def files(self) -> list[str]:
        """The engine-dir files this component names (ONNX, external data, plan)."""
        return [*self.onnx.files, *([self.engine.path] if self.engine else [])]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def shape_ranges(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        return {k: v.shapes for k, v in self.profile.items()}


class ModelEntry(_Entry):
    id: str
    family: str
    pipeline_class: str
    fingerprint: str


class StepCacheEntry(_Entry):
    """The step cache's calibration (runtime.stepcache): per step count, the magnitude ratio of the
    transformer's output at each step to the step before (the first is 1) and its relative change,
    averaged over `prompts` uncached generations at `size`. Written by `omni calibrate-cache`."""

    ratios: dict[int, list[Annotated[float, Field(gt=0)]]] = Field(min_length=1)
    # per step count, each step's relative change of the whole output from the step before (the first 0)
    changes: dict[int, list[Annotated[float, Field(ge=0)]]] = {}
    size: str
    prompts: int = Field(ge=1)
    seconds: float = Field(ge=0)
    calibrated_at: str

    @model_validator(mode="after")
    def _one_ratio_a_step(self) -> "StepCacheEntry":
        for name, table in (("ratios", self.ratios), ("changes", self.changes)):
            for steps, values in table.items():
                if steps < 1 or len(values) != steps:
                    raise ValueError(f"{name} for {steps} steps must list {steps} numbers, not {len(values)}")
        return self


class Manifest(_Entry):
    format: Literal[1] = FORMAT
    model: ModelEntry
    versions: dict[str, str | None]
    gpu: GpuInfo | None
    built_at: str
    components: dict[str, ComponentEntry] = Field(min_length=1)
    files: dict[RelPath, FileEntry]
    step_cache: StepCacheEntry | None = None  # omni calibrate-cache --engine-dir

    # ---- read / write ----

    @classmethod
    def read(cls, engine_dir: Path | str) -> "Manifest":
        path = manifest_path(engine_dir)
        rebuild = f"omni build-engine MODEL --engine-dir {engine_dir} --force"
        if not path.is_file():
            raise ManifestError(f"{path} not found: build engines with `omni build-engine MODEL --engine-dir {engine_dir}`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path} is not valid JSON ({e}); rebuild with `{rebuild}`") from e
        if not isinstance(data, dict):
            raise ManifestError(f"{path} is not a JSON object; rebuild with `{rebuild}`")
        if data.get("format") != FORMAT:
            raise ManifestError(f"{path} has format {data.get('format')!r}, this omni-trt reads {FORMAT}; rebuild with `{rebuild}`")
        model = data.get("model")
        if isinstance(model, dict) and isinstance(model.get("id"), str):
            rebuild = f"omni build-engine {model['id']} --engine-dir {engine_dir} --force"
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ManifestError(f"{path} does not follow the manifest schema: {schema_problems(e)}; rebuild with `{rebuild}`") from None

    @classmethod
    def read_or_none(cls, engine_dir: Path | str) -> "Manifest | None":
        try:
            return cls.read(engine_dir)
        except ManifestError:
            return None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def write(self, engine_dir: Path | str) -> Path:
        """Atomically: a crash mid-write leaves the previous manifest."""
        return atomic_write(manifest_path(engine_dir), json.dumps(self.to_json(), indent=2) + "\n")

    # ---- questions the runtime and the compiler ask ----

    def verify(self, engine_dir: Path | str, only: Iterable[str] | None = None) -> list[str]:
        """Problems with the files the manifest lists (missing, size or sha256 differs), and
        component files it does not list; `only`: check just these files. [] means all good."""
        engine_dir = Path(engine_dir)
        wanted = set(self.files) if only is None else set(only)
        problems = [f"{rel}: not listed in the manifest" for rel in sorted(wanted - set(self.files))]
        for rel in sorted(wanted & set(self.files)):
            want, path = self.files[rel], engine_dir / rel
            why = escapes(engine_dir, rel)
            if why is not None:
                problems.append(f"{rel}: {why}")
                continue
            if not path.is_file():
                problems.append(f"{rel}: missing")
                continue
            size = path.stat().st_size
            if size != want.size:
                problems.append(f"{rel}: size {size} bytes, manifest says {want.size}")
                continue
            got = sha256_file(path)
            if got != want.sha256:
                problems.append(f"{rel}: sha256 {got[:12]}..., manifest says {want.sha256[:12]}...")
        if only is None:
            for name, comp in self.components.items():
                problems += [f"{name}: {rel} is not listed in the manifest's files" for rel in comp.files if rel not in self.files]
        return problems

    def model_mismatches(self, model_dir: Path | str, configs_only: bool = False) -> list[str]:
        """Components whose source in `model_dir` differs from what they were built from (the
        runtime's check before it swaps engines in). [] means all match. configs_only compares the
        JSON files alone, for a hub model whose replaced weights are never downloaded."""
        problems = []
        for name, comp in self.components.items():
            want = comp.onnx.config_fingerprint if configs_only else comp.onnx.key.get("fingerprint")
            if model_fingerprint(model_dir, [comp.pipeline_attr], configs_only=configs_only) != want:
                problems.append(f"{name}: {Path(model_dir) / comp.pipeline_attr} differs from what the engine was built from")
        return problems

    def rebuild_command(self, engine_dir: Path | str) -> str:
        """The command that rebuilds this engine dir for this machine (for error messages)."""
        flavors = {c.engine.flavor for c in self.components.values() if c.engine}
        target = f" --target {flavors.pop()}" if len(flavors) == 1 else ""
        refit = " --refittable" if any(c.engine and c.engine.refittable for c in self.components.values()) else ""
        return f"omni build-engine {self.model.id} --engine-dir {engine_dir}{target}{refit}"

    def add_command(self, engine_dir: Path | str, component: str, like: str) -> str:
        """The command that adds `component` to this engine dir built as the VAE component `like`
        was (dtype, sizes, batch, TensorRT targets and level), so the range the dir serves stays."""
        c = self.components[like]
        lo, opt, hi = c.points.min, c.points.opt, c.points.max
        flags = (
            f" --components {component} --dtype {c.dtype} --min-size {lo.width}x{lo.height}"
            f" --opt-size {opt.width}x{opt.height} --max-size {hi.width}x{hi.height} --max-batch {hi.batch}"
        )
        if c.engine is None:
            flags += " --onnx-only"
        else:
            flags += f" --opt-level {c.engine.opt_level}"
            if c.engine.compute_capabilities_source == "requested" and c.engine.compute_capabilities:
                flags += f" --compute-capability {','.join(c.engine.compute_capabilities)}"
        return self.rebuild_command(engine_dir) + flags


def schema_problems(e: ValidationError, limit: int = 5) -> str:
    """'components.transformer.points.max.foo: Extra inputs are not permitted; ...'"""
    parts = []
    for err in e.errors()[:limit]:
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")



# ---- human-readable form (omni inspect) ----


def _point(p: PointEntry) -> str:
    return f"batch {p.batch}, {p.width}x{p.height}, text {p.text_len}"


def format_manifest(m: Manifest) -> str:
    lines = [
        f"model      {m.model.id}  ({m.model.family}, {m.model.pipeline_class})",
        f"           fingerprint {m.model.fingerprint[:16]}...",
        f"built      {m.built_at}",
        "versions   " + ", ".join(f"{k} {val}" for k, val in m.versions.items() if val),
        f"build GPU  {m.gpu.name} (compute capability {m.gpu.compute_capability})" if m.gpu else "build GPU  none (ahead-of-time build)",
    ]
    for name, c in m.components.items():
        val = c.onnx.validation
        lines.append(f"\n[{name}]  dtype {c.dtype}" + (f"  ({c.dtype_note})" if c.dtype_note else ""))
        for k in ("min", "opt", "max"):
            lines.append(f"  {k:<4} {_point(getattr(c.points, k))}")
        for inp, p in c.profile.items():
            lines.append(f"  profile {inp}: min {list(p.min)}  opt {list(p.opt)}  max {list(p.max)}")
        lines.append(f"  onnx   {c.onnx.path}  opset {c.onnx.opset}, {c.onnx.exporter}, {c.onnx.seconds:.1f} s")
        if val.skipped:
            lines.append(f"  validation skipped: {val.skipped}")
        elif val.errors:
            what = f"{val.dtype} twin" if val.dtype != c.dtype else val.dtype
            lines.append(f"  validation ({what}) max relative error {max(val.errors.values()):.2e} (tolerance {val.tolerance})")
        e = c.engine
        if e:
            cc = e.compute_capabilities
            lines.append(
                f"  engine {e.path}  {e.flavor} {e.version}, targets {', '.join(cc) if cc else 'library default'}, "
                f"opt level {e.opt_level}, {e.seconds:.1f} s"
            )
        else:
            lines.append("  engine none (ONNX only)")
    lines.append("\nfiles")
    for rel, f in m.files.items():
        lines.append(f"  {rel:<32} {f.size / 1e6:10.2f} MB  sha256 {f.sha256[:16]}...")
    return "\n".join(lines)
