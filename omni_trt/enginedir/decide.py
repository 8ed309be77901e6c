"""The rebuild decision (pure): what to redo for one component, given the previous manifest."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .layout import onnx_relpath
from .manifest import Manifest


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

    def describe(self) -> str:
        if self.up_to_date:
            return "up to date"
        todo = " + ".join(s for s, on in (("export", self.export), ("build", self.build), ("drop stale engine", self.drop_engine)) if on)
        return f"{todo} ({'; '.join(self.reasons)})"


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
    old: Manifest | None,
    component: str,
    onnx_key: Mapping[str, Any],
    engine_key: Mapping[str, Any] | None,
    sizes: Mapping[str, int | None],
    force: bool = False,
) -> Action:
    """Decide what to redo for `component`.

    old: the previous manifest of the same model (None if none); onnx_key / engine_key: everything
    the ONNX / the engine depends on (engine_key None: no engine wanted, --onnx-only); sizes:
    current size of each file the old manifest lists (None where missing). A changed ONNX key
    re-exports and so rebuilds the engine; a changed engine key (profile, TensorRT version,
    targets, opt level) rebuilds only the engine.
    """
    comp = old.components.get(component) if old else None
    files = old.files if old else {}
    want_engine = engine_key is not None
    if force:
        return Action(export=True, build=want_engine, reasons=("--force",), drop_engine=not want_engine and bool(comp and comp.engine))
    if comp is None:
        return Action(export=True, build=want_engine, reasons=("not built yet",))

    def stale_files(rels: Iterable[str]) -> list[str]:
        out = []
        for rel in rels:
            size, want = sizes.get(rel), files[rel].size if rel in files else None
            if size is None:
                out.append(f"{rel} missing")
            elif size != want:
                out.append(f"{rel} size changed")
        return out

    export_reasons = diff_keys(comp.onnx.key, onnx_key) + stale_files(comp.onnx.files)
    if export_reasons:
        return Action(export=True, build=want_engine, reasons=tuple(export_reasons), drop_engine=not want_engine and bool(comp.engine))
    if not want_engine:
        return Action(export=False, build=False)
    engine = comp.engine
    if engine is None:
        return Action(export=False, build=True, reasons=("no engine yet",))
    build_reasons = diff_keys(engine.key, engine_key) + stale_files([engine.path])
    onnx = files.get(onnx_relpath(component))
    if onnx is None or engine.onnx_sha256 != onnx.sha256:
        build_reasons.append("the ONNX changed since the engine was built")
    return Action(export=False, build=bool(build_reasons), reasons=tuple(build_reasons))
