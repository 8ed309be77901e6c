"""The `lora` request field, parsed and checked as pure functions (every refusal names `lora`).

Shapes taken (vLLM's and vLLM-Omni's conventions): an object or a list of objects with `name`
(aliases `lora_name`, `adapter`), `scale` (alias `lora_scale`, default 1) and optionally `path`
(aliases `lora_path`, `local_path`, `lora_local_path`); a bare adapter name (a string); a string
holding that JSON (what an edits form field carries); `[]`, `""` or null for none.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..errors import RequestError

PARAM = "lora"
MAX_LORAS_PER_REQUEST = 4  # --max-loras-per-request's default
# Scales past this are never a useful image, and a huge one overflows fp16 weights once merged.
MIN_SCALE, MAX_SCALE = -4.0, 4.0
MAX_NAME_CHARS = 128
NAME_KEYS = ("name", "lora_name", "adapter")
SCALE_KEYS = ("scale", "lora_scale")
PATH_KEYS = ("path", "lora_path", "local_path", "lora_local_path")

AdapterSet = tuple[tuple[str, float], ...]  # (name, scale), sorted by name, no zero scales: a batch key


@dataclass(frozen=True)
class LoraRef:
    """One adapter a request names: its name, scale and (to load it on first use) a path."""

    name: str
    scale: float = 1.0
    path: str | None = None


def refuse(message: str, status: int = 400) -> RequestError:
    return RequestError(message, PARAM, status=status)


def parse_lora(value: Any, max_per_request: int = MAX_LORAS_PER_REQUEST) -> tuple[LoraRef, ...]:
    """The request's adapters, each name once; () for none."""
    if isinstance(value, str):
        value = _from_text(value)
    if value is None or value == []:
        return ()
    items = value if isinstance(value, list) else [value]
    if len(items) > max_per_request:
        raise refuse(f"lora names {len(items)} adapters; this server applies at most {max_per_request} per request")
    refs = tuple(_one(item, i if isinstance(value, list) else None) for i, item in enumerate(items))
    seen: set[str] = set()
    for r in refs:
        if r.name in seen:
            raise refuse(f"lora names adapter {r.name!r} twice; give it once with the sum of the scales")
        seen.add(r.name)
    return refs


def _from_text(text: str) -> Any:
    """A form field or a bare string: JSON when it looks like an object or a list, else a name."""
    text = text.strip()
    if not text:
        return None
    if text[0] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise refuse(f"lora is not valid JSON ({e.msg} at character {e.pos})", 422) from None
    return {"name": text}


def _pick(item: dict[str, Any], keys: tuple[str, ...], where: str) -> Any:
    given = [k for k in keys if k in item]
    if len(given) > 1:
        raise refuse(f"{where} gives both {given[0]!r} and {given[1]!r}; send one", 422)
    return item[given[0]] if given else None


def _one(item: Any, index: int | None) -> LoraRef:
    where = "lora" if index is None else f"lora[{index}]"
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise refuse(f"{where} must be an object with a name (and a scale), or an adapter name", 422)
    unknown = sorted(set(item) - set(NAME_KEYS + SCALE_KEYS + PATH_KEYS))
    if unknown:
        raise refuse(f"{where} has unknown field(s) {', '.join(map(repr, unknown[:3]))}; it takes name, scale and path", 422)
    return LoraRef(check_name(_pick(item, NAME_KEYS, where), where), check_scale(_pick(item, SCALE_KEYS, where), where),
                   _path(_pick(item, PATH_KEYS, where), where))


def check_name(name: Any, where: str = "lora") -> str:
    """An adapter name: a short printable string with no path in it (it shows in /v1/models and logs)."""
    if not isinstance(name, str) or not name.strip():
        raise refuse(f"{where} needs a name (a non-empty string)", 422)
    if len(name) > MAX_NAME_CHARS or not name.isprintable() or "/" in name or "\\" in name or name != name.strip():
        raise refuse(f"{where}: adapter name {name[:40]!r} must be printable, at most {MAX_NAME_CHARS} characters, "
                     "without slashes or surrounding spaces", 422)
    return name


def check_scale(scale: Any, where: str = "lora") -> float:
    """A finite number in [MIN_SCALE, MAX_SCALE]; None is 1."""
    if scale is None:
        return 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise refuse(f"{where}: scale must be a number, got {type(scale).__name__}", 422)
    if not math.isfinite(scale) or not MIN_SCALE <= scale <= MAX_SCALE:
        raise refuse(f"{where}: scale must be a finite number between {MIN_SCALE:g} and {MAX_SCALE:g}, got {scale}", 422)
    return float(scale)


def _path(path: Any, where: str) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str) or not path or "\x00" in path:
        raise refuse(f"{where}: path must be a non-empty string", 422)
    return path


def adapter_set(refs: tuple[LoraRef, ...] | list[LoraRef]) -> AdapterSet:
    """The batch key's form: sorted by name (a list's order does not matter), zero scales dropped
    (scale 0 is the base model, so such a request batches with plain ones)."""
    return tuple(sorted((r.name, r.scale) for r in refs if r.scale != 0.0))


def with_model(refs: tuple[LoraRef, ...], model: str | None, adapters: set[str] | frozenset[str]) -> tuple[LoraRef, ...]:
    """`model` naming an adapter (vLLM's convention) adds it at scale 1 unless the list names it."""
    if model is None or model not in adapters or any(r.name == model for r in refs):
        return refs
    return refs + (LoraRef(model),)


def describe(adapters: AdapterSet) -> str:
    """For logs and metrics labels: name:scale joined, or "none"."""
    return ",".join(f"{n}:{s:g}" for n, s in adapters) or "none"
