"""The engine directory's manifest.json: what was built, from what, for what.

It is the build cache key (build-engine redoes only what an input change affects) and the
runtime's safety check (serve refuses engines that do not match the model, GPU or TensorRT). The
JSON dict is the source of truth; `load()` gives the runtime a typed view of it.

Layout of an engine dir (see engines/README.md):
    manifest.json, onnx/<component>.onnx (+ .onnx.data), <component>.plan, timing-*.cache
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..models.base import Point

FORMAT = 1
MANIFEST = "manifest.json"
ONNX_DIR = "onnx"
# Config files are hashed by content, weights by name and size only: hashing 40 GB of weights
# on every build would take minutes. Weights replaced in place by files of the same sizes go
# unnoticed; rebuild with --force then.
_CONTENT_SUFFIXES = (".json",)
_CHUNK = 1 << 20


class ManifestError(RuntimeError):
    pass


# ---- paths ----


def onnx_relpath(component: str) -> str:
    return f"{ONNX_DIR}/{component}.onnx"


def plan_relpath(component: str) -> str:
    return f"{component}.plan"


def timing_cache_name(flavor: str, version: str) -> str:
    """One cache per TensorRT flavour and version: TensorRT rejects caches from other versions."""
    return f"timing-{flavor}-{version}.cache"


def manifest_path(engine_dir: Path | str) -> Path:
    return Path(engine_dir) / MANIFEST


# ---- hashing ----


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .cache, .git, .huggingface
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def model_fingerprint(model_dir: Path, subfolders: Iterable[str] | None = None, configs_only: bool = False) -> str:
    """sha256 over model_index.json, the content of every JSON config, and the names and sizes of
    every other file (weights, safetensors indexes, tokenizer files), under `subfolders` (all
    when None). With subfolders, model_index.json contributes only their entries, so changing one
    component leaves the other components' fingerprints alone. configs_only: the JSON files alone
    (configs and safetensors indexes), which a server can fetch from the hub without the weights."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    index = json.loads((model_dir / "model_index.json").read_text())
    if subfolders is None:
        roots = [model_dir]
        h.update(json.dumps(index, sort_keys=True).encode())
    else:
        subfolders = sorted(subfolders)
        roots = [model_dir / s for s in subfolders]
        h.update(json.dumps({s: index.get(s) for s in subfolders}, sort_keys=True).encode())
    for root in roots:
        if not root.is_dir():
            h.update(f"missing:{root.name}".encode())
            continue
        for path in _walk(root):
            rel = path.relative_to(model_dir).as_posix()
            if rel == "model_index.json":
                continue
            if path.suffix in _CONTENT_SUFFIXES:
                h.update(f"{rel}:{sha256_file(path)}\n".encode())
            elif not configs_only:
                h.update(f"{rel}:{path.stat().st_size}\n".encode())
    return h.hexdigest()


def combined_fingerprint(components: Mapping[str, Mapping[str, Any]]) -> str:
    """The model fingerprint of a manifest: over its components' own fingerprints, so it does not
    depend on which other parts of a hub model happen to be downloaded."""
    parts = sorted(f"{n}:{c.get('onnx', {}).get('key', {}).get('fingerprint')}" for n, c in components.items())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def model_mismatches(manifest: Mapping[str, Any], model_dir: Path | str, configs_only: bool = False) -> list[str]:
    """Components whose source in `model_dir` differs from what they were built from (the
    runtime's check before it swaps engines in). [] means all match. configs_only compares the
    JSON files alone, for a hub model whose replaced weights are never downloaded."""
    problems = []
    for name, comp in manifest.get("components", {}).items():
        attr = comp.get("pipeline_attr", name)
        onnx = comp.get("onnx", {})
        want = onnx.get("config_fingerprint") if configs_only else onnx.get("key", {}).get("fingerprint")
        got = model_fingerprint(Path(model_dir), [attr], configs_only=configs_only)
        if got != want:
            problems.append(f"{name}: {Path(model_dir) / attr} differs from what the engine was built from")
    return problems


def file_entries(engine_dir: Path, relpaths: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {
        rel: {"sha256": sha256_file(engine_dir / rel), "size": (engine_dir / rel).stat().st_size}
        for rel in relpaths
    }


def present_sizes(engine_dir: Path, relpaths: Iterable[str]) -> dict[str, int | None]:
    """Current size of each file, None where missing: the cheap check used to decide rebuilds."""
    out: dict[str, int | None] = {}
    for rel in relpaths:
        p = Path(engine_dir) / rel
        out[rel] = p.stat().st_size if p.is_file() else None
    return out


# ---- read / write / verify ----


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def read(engine_dir: Path | str) -> dict[str, Any]:
    path = manifest_path(engine_dir)
    if not path.is_file():
        raise ManifestError(f"{path} not found: build engines with `omni build-engine MODEL --engine-dir {engine_dir}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); rebuild with `omni build-engine ... --force`") from e
    if data.get("format") != FORMAT:
        raise ManifestError(f"{path} has format {data.get('format')!r}, this omni-trt reads {FORMAT}; rebuild with --force")
    return data


def read_or_none(engine_dir: Path | str) -> dict[str, Any] | None:
    try:
        return read(engine_dir)
    except ManifestError:
        return None


def write(engine_dir: Path | str, manifest: Mapping[str, Any]) -> Path:
    """Write atomically: a crash mid-write leaves the previous manifest."""
    path = manifest_path(engine_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def verify(engine_dir: Path | str, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Problems with the files the manifest lists (missing, size or sha256 differs), and
    components that name files the manifest does not list. [] means all good."""
    engine_dir = Path(engine_dir)
    manifest = read(engine_dir) if manifest is None else manifest
    files: Mapping[str, Mapping[str, Any]] = manifest.get("files", {})
    problems = []
    for rel, want in files.items():
        path = engine_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != want.get("size"):
            problems.append(f"{rel}: size {size} bytes, manifest says {want.get('size')}")
            continue
        got = sha256_file(path)
        if got != want.get("sha256"):
            problems.append(f"{rel}: sha256 {got[:12]}..., manifest says {str(want.get('sha256'))[:12]}...")
    for name, comp in manifest.get("components", {}).items():
        for rel in component_files(comp):
            if rel not in files:
                problems.append(f"{name}: {rel} is not listed in the manifest's files")
    return problems


def component_files(comp: Mapping[str, Any]) -> list[str]:
    """The engine-dir files one component entry names (ONNX, external data, plan)."""
    out = list(comp.get("onnx", {}).get("files", []))
    if comp.get("engine"):
        out.append(comp["engine"]["path"])
    return out


# ---- the up-to-date decision (pure) ----


@dataclass(frozen=True)
class Action:
    """What to do for one component. drop_engine: an existing engine is stale and nothing
    replaces it in this run (--onnx-only after the ONNX changed)."""

    export: bool
    build: bool
    reasons: tuple[str, ...] = ()
    drop_engine: bool = False

    @property
    def up_to_date(self) -> bool:
        return not (self.export or self.build or self.drop_engine)


def diff_keys(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two cache keys ('opset: 18 -> 20')."""
    old = old or {}
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a != b:
            a, b = _short(a), _short(b)
            out.append(f"{k} changed" if a == b == "..." else f"{k}: {a} -> {b}")
    return out


def _short(v: Any) -> Any:
    """Values short enough for a log line; '...' for long profiles."""
    return v if not isinstance(v, (dict, list)) or len(json.dumps(v)) < 60 else "..."


def decide(
    old: Mapping[str, Any] | None,
    component: str,
    onnx_key: Mapping[str, Any],
    engine_key: Mapping[str, Any] | None,
    sizes: Mapping[str, int | None],
    force: bool = False,
) -> Action:
    """Decide what to redo for `component`.

    old: the previous manifest (None if none); onnx_key / engine_key: everything the ONNX / the
    engine depends on (engine_key None: no engine wanted, --onnx-only); sizes: current size of
    each file the old manifest lists (None where missing). A changed ONNX key re-exports and so
    rebuilds the engine; a changed engine key (profile, TensorRT version, targets, opt level)
    rebuilds only the engine.
    """
    comp = (old or {}).get("components", {}).get(component)
    files = (old or {}).get("files", {})
    want_engine = engine_key is not None
    if force:
        return Action(export=True, build=want_engine, reasons=("--force",), drop_engine=not want_engine and bool(comp and comp.get("engine")))
    if comp is None:
        return Action(export=True, build=want_engine, reasons=("not built yet",))

    def stale_files(rels: Iterable[str]) -> list[str]:
        out = []
        for rel in rels:
            size, want = sizes.get(rel), files.get(rel, {}).get("size")
            if size is None:
                out.append(f"{rel} missing")
            elif size != want:
                out.append(f"{rel} size changed")
        return out

    export_reasons = diff_keys(comp.get("onnx", {}).get("key"), onnx_key)
    export_reasons += stale_files(comp.get("onnx", {}).get("files", []) or [onnx_relpath(component)])
    if export_reasons:
        return Action(
            export=True,
            build=want_engine,
            reasons=tuple(export_reasons),
            drop_engine=not want_engine and bool(comp.get("engine")),
        )
    if not want_engine:
        return Action(export=False, build=False)
    engine = comp.get("engine")
    if not engine:
        return Action(export=False, build=True, reasons=("no engine yet",))
    build_reasons = diff_keys(engine.get("key"), engine_key)
    build_reasons += stale_files([engine["path"]])
    onnx_sha = files.get(onnx_relpath(component), {}).get("sha256")
    if engine.get("onnx_sha256") != onnx_sha:
        build_reasons.append("the ONNX changed since the engine was built")
    return Action(export=False, build=bool(build_reasons), reasons=tuple(build_reasons))


# ---- typed view for the runtime ----


@dataclass(frozen=True)
class ComponentEntry:
    name: str
    dtype: str
    onnx: Path
    plan: Path | None  # None: exported only (--onnx-only)
    points: dict[str, Point]  # "min" / "opt" / "max"
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    tensorrt: dict[str, Any] | None  # {"flavor", "version", "compute_capabilities", "gpu"} of the engine


@dataclass(frozen=True)
class Built:
    """What an engine dir holds, for the runtime: `load(dir).components["transformer"].plan`."""

    engine_dir: Path
    model: str
    fingerprint: str
    family: str
    components: dict[str, ComponentEntry]
    raw: dict[str, Any] = field(repr=False)


def load(engine_dir: Path | str) -> Built:
    engine_dir = Path(engine_dir)
    m = read(engine_dir)
    comps = {}
    for name, c in m["components"].items():
        engine = c.get("engine")
        comps[name] = ComponentEntry(
            name=name,
            dtype=c["dtype"],
            onnx=engine_dir / c["onnx"]["path"],
            plan=engine_dir / engine["path"] if engine else None,
            points={k: Point(**v) for k, v in c["points"].items()},
            profile={k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in c["profile"].items()},
            input_names=tuple(t["name"] for t in c["inputs"]),
            output_names=tuple(t["name"] for t in c["outputs"]),
            tensorrt={k: engine[k] for k in ("flavor", "version", "compute_capabilities", "gpu")} if engine else None,
        )
    return Built(
        engine_dir=engine_dir,
        model=m["model"]["id"],
        fingerprint=m["model"]["fingerprint"],
        family=m["model"]["family"],
        components=comps,
        raw=m,
    )


def rebuild_command(manifest: Mapping[str, Any], engine_dir: Path | str) -> str:
    """The command that rebuilds an engine dir for this machine (for error messages)."""
    flavors = {c["engine"]["flavor"] for c in manifest.get("components", {}).values() if c.get("engine")}
    target = f" --target {flavors.pop()}" if len(flavors) == 1 else ""
    return f"omni build-engine {manifest.get('model', {}).get('id', 'MODEL')} --engine-dir {engine_dir}{target}"


# ---- human-readable form (omni inspect) ----


def _size(points: Mapping[str, Any]) -> str:
    return f"batch {points['batch']}, {points['width']}x{points['height']}, text {points['text_len']}"


def format_manifest(m: Mapping[str, Any]) -> str:
    model = m.get("model", {})
    v = m.get("versions", {})
    lines = [
        f"model      {model.get('id')}  ({model.get('family')}, {model.get('pipeline_class')})",
        f"           fingerprint {str(model.get('fingerprint'))[:16]}...",
        f"built      {m.get('built_at')}",
        "versions   " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
    ]
    gpu = m.get("gpu")
    lines.append(f"build GPU  {gpu['name']} (compute capability {gpu['compute_capability']})" if gpu else "build GPU  none (ahead-of-time build)")
    for name, c in m.get("components", {}).items():
        onnx = c.get("onnx", {})
        val = onnx.get("validation") or {}
        lines.append(f"\n[{name}]  dtype {c.get('dtype')}" + (f"  ({c['dtype_note']})" if c.get("dtype_note") else ""))
        for k in ("min", "opt", "max"):
            if k in c.get("points", {}):
                lines.append(f"  {k:<4} {_size(c['points'][k])}")
        for inp, p in c.get("profile", {}).items():
            lines.append(f"  profile {inp}: min {p['min']}  opt {p['opt']}  max {p['max']}")
        lines.append(
            f"  onnx   {onnx.get('path')}  opset {onnx.get('opset')}, {onnx.get('exporter')}, "
            f"{onnx.get('seconds', 0):.1f} s"
        )
        if val.get("skipped"):
            lines.append(f"  validation skipped: {val['skipped']}")
        elif val.get("errors"):
            worst = max(val["errors"].values())
            what = f"{val.get('dtype')} twin" if val.get("dtype") != c.get("dtype") else val.get("dtype")
            lines.append(f"  validation ({what}) max relative error {worst:.2e} (tolerance {val.get('tolerance')})")
        engine = c.get("engine")
        if engine:
            cc = engine.get("compute_capabilities")
            lines.append(
                f"  engine {engine['path']}  {engine['flavor']} {engine['version']}, targets "
                f"{', '.join(cc) if cc else 'library default'}, opt level {engine.get('opt_level')}, "
                f"{engine.get('seconds', 0):.1f} s"
            )
        else:
            lines.append("  engine none (ONNX only)")
    lines.append("\nfiles")
    for rel, f in m.get("files", {}).items():
        lines.append(f"  {rel:<32} {f['size'] / 1e6:10.2f} MB  sha256 {f['sha256'][:16]}...")
    return "\n".join(lines)
