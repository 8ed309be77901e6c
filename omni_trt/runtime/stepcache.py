"""The step cache's rule (MagCache), pure: calibrated magnitude ratios and settings -> which
denoising steps call the transformer and which reuse its last output.

MagCache (Ma et al., 2025) observes that the ratio of the magnitudes of the transformer's outputs at
consecutive steps, gamma_t = ||v_t|| / ||v_{t-1}||, is nearly the same for every prompt, so it can be
measured once ahead of time (calibration) and the error of reusing an output predicted without
running anything: while the accumulated |1 - prod(gamma)| stays under a threshold, a step reuses the
last computed output, scaled by that product. Peers hook block residuals inside a torch transformer;
this rule needs only the whole transformer's output, so it runs around an ONNX Runtime or TensorRT
engine as well, from the same code (runtime.pipeline asks `plan()` once per pipeline call).

What a reuse costs is measured too where it can be: MagCache estimates the error of reusing an
output from magnitudes alone, |1 - prod(gamma)|, which misses a change of direction. Calibration also
records each step's relative change of the whole output, ||v_t - v_{t-1}|| / ||v_{t-1}||, and where a
calibration has those, a reused step's error is their sum since the last computed step (what the
magnitude estimate approximates when only the magnitude moves). On the trained demo model the
changes are 3-10x the magnitude estimate, and the pictures show it (README: Step cache). Operator
`mag_ratios` (vLLM-Omni's key) have no changes: MagCache's own estimate then.

Because the calibration is fixed, the plan is a function of (steps, first step, settings) alone: a
request's images never depend on what it was batched with, and requests with equal settings share
one plan (their batch key holds the settings).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..errors import RequestError, UsageError

BACKENDS = ("none", "mag_cache")
# vLLM-Omni's mag_cache keys. Defaults: the paper's threshold (0.06, SGLang's default) with vLLM-Omni's
# FLUX skip and retention; its FLUX threshold (0.24) measured 3.6x fewer calls at 50 steps on the demo
# but 32 dB against 39 dB at 0.06 (2.3x fewer): benchmarks/results/cache-cpu.json.
DEFAULT_THRESHOLD = 0.06
DEFAULT_MAX_SKIP = 5
DEFAULT_RETENTION = 0.1
# What a request may ask for (`cache: {...}`): wide enough to explore, bounded so no request can
# turn a 50-step image into noise.
MAX_THRESHOLD = 2.0
MAX_SKIP = 10
KEYS = {"mag_threshold": "threshold", "mag_max_skip_steps": "max_skip_steps", "mag_retention_ratio": "retention_ratio"}


@dataclass(frozen=True)
class MagSettings:
    """The rule's knobs: threshold (accumulated error allowed, 0 reuses nothing), max_skip_steps
    (most steps reused in a row), retention_ratio (the share of the steps run that are always
    computed first)."""

    threshold: float = DEFAULT_THRESHOLD
    max_skip_steps: int = DEFAULT_MAX_SKIP
    retention_ratio: float = DEFAULT_RETENTION

    def describe(self) -> dict[str, Any]:
        """vLLM-Omni's keys, as /v1/models and /health show them."""
        return {key: getattr(self, attr) for key, attr in KEYS.items()}


@dataclass(frozen=True)
class CacheConfig:
    """The server's step cache (`--cache-backend`, `--cache-config`): None settings: no cache.
    ratios: given by the operator (vLLM-Omni's optional `mag_ratios`), over as many steps as listed."""

    settings: MagSettings | None = None
    ratios: tuple[float, ...] | None = None

    @property
    def backend(self) -> str:
        return "none" if self.settings is None else "mag_cache"


def _number(param: str, name: str, value: Any, lo: float, hi: float, integer: bool, status: int) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise RequestError(f"{param}.{name} must be {'an integer' if integer else 'a finite number'}, got {value!r}", param, status=status)
    if not lo <= value <= hi:
        raise RequestError(f"{param}.{name} must be between {lo:g} and {hi:g}, got {value}", param, status=status)
    return value if integer else float(value)


def settings_from(data: dict[str, Any], base: MagSettings, param: str, status: int = 422,
                  extra: tuple[str, ...] = ()) -> MagSettings:
    """`base` with the mag_cache keys of `data` applied, each checked; any other key is refused
    (a misspelt knob silently ignored would look like a cache that does nothing)."""
    unknown = sorted(set(data) - set(KEYS) - set(extra))
    if unknown:
        raise RequestError(f"{param} has unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(KEYS)}", param, status=status)
    values: dict[str, Any] = {}
    if "mag_threshold" in data:
        values["threshold"] = _number(param, "mag_threshold", data["mag_threshold"], 0.0, MAX_THRESHOLD, False, status)
    if "mag_max_skip_steps" in data:
        values["max_skip_steps"] = _number(param, "mag_max_skip_steps", data["mag_max_skip_steps"], 0, MAX_SKIP, True, status)
    if "mag_retention_ratio" in data:
        values["retention_ratio"] = _number(param, "mag_retention_ratio", data["mag_retention_ratio"], 0.0, 1.0, False, status)
    return replace(base, **values)


def parse_cache_config(backend: str, config: str | None) -> CacheConfig:
    """serve's --cache-backend and --cache-config (a JSON object of vLLM-Omni's mag_cache keys,
    optionally `mag_ratios`, a list of positive numbers, one per step)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown cache backend {backend!r}; choose one of {', '.join(BACKENDS)}", "--cache-backend")
    if backend == "none":
        if config:
            raise UsageError("--cache-config needs --cache-backend mag_cache", "--cache-config")
        return CacheConfig()
    data: Any = {}
    if config:
        try:
            data = json.loads(config)
        except json.JSONDecodeError as e:
            raise UsageError(f"--cache-config is not JSON ({e.msg}); e.g. '{{\"mag_threshold\": 0.24}}'", "--cache-config") from None
        if not isinstance(data, dict):
            raise UsageError("--cache-config must be a JSON object of mag_cache keys", "--cache-config")
    try:
        settings = settings_from(data, MagSettings(), "--cache-config", extra=("mag_ratios",))
        ratios = _ratios(data["mag_ratios"]) if data.get("mag_ratios") is not None else None
    except RequestError as e:
        raise UsageError(str(e), "--cache-config") from None
    return CacheConfig(settings, ratios)


def _ratios(value: Any) -> tuple[float, ...]:
    ok = isinstance(value, list) and len(value) >= 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value)
    if not ok:
        raise RequestError("mag_ratios must be a list of at least 2 positive numbers, one per step", "--cache-config")
    return tuple(float(v) for v in value)


def request_settings(value: Any, server: MagSettings | None) -> MagSettings | None:
    """A request's `cache` field against the server's cache: absent/null/true: the server's
    settings; false: none (the exact uncached image); an object: the server's settings with those
    keys overridden, within limits. A 422 naming `cache` otherwise, or a 400 when the server runs
    no step cache and the request asks for one."""
    if isinstance(value, str):  # a multipart form's field (edits): the same JSON, or true / false
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RequestError(f"cache must be true, false or a JSON object of mag_cache keys, got {value[:40]!r}", "cache",
                               status=422) from None
    if value is None or value is True:
        return server
    if value is False:
        return None
    if not isinstance(value, dict):
        raise RequestError(f"cache must be true, false or an object of mag_cache keys ({', '.join(KEYS)}), got {value!r}", "cache",
                           status=422)
    if server is None:
        raise RequestError("this server runs no step cache: its operator starts it with --cache-backend mag_cache; "
                           "send cache: false or leave cache out", "cache")
    return settings_from(value, server, "cache")


def interpolate(ratios: Sequence[float], steps: int) -> list[float]:
    """Ratios for `steps` steps from ratios calibrated at another count: each step takes the
    calibrated step at the same place in the schedule (nearest index), as MagCache does."""
    n = len(ratios)
    if steps == n:
        return list(ratios)
    if steps == 1:
        return [float(ratios[-1])]
    scale = (n - 1) / (steps - 1)
    return [float(ratios[min(n - 1, round(i * scale))]) for i in range(steps)]


def nearest_ratios(calibrated: dict[int, Sequence[float]], steps: int) -> list[float]:
    """The ratios for `steps`: calibrated at that count, else interpolated from the calibration
    with the most steps (the finest record of the curve)."""
    if steps in calibrated:
        return list(calibrated[steps])
    return interpolate(calibrated[max(calibrated)], steps)


def nearest_changes(calibrated: dict[int, Sequence[float]], steps: int) -> list[float] | None:
    """The per-step changes for `steps` (None: none calibrated): interpolated as the ratios are,
    and scaled by the step size (a step of a 20-step schedule moves as far as 2.5 of a 50-step one)."""
    if not calibrated:
        return None
    if steps in calibrated:
        return list(calibrated[steps])
    most = max(calibrated)
    return [c * most / steps for c in interpolate(calibrated[most], steps)]


def ratios_from_norms(norms: Sequence[float]) -> list[float]:
    """Per-step magnitude ratios from the transformer output's norm at each step (the first
    step has no predecessor: 1)."""
    return [1.0] + [b / a if a > 0 else 1.0 for a, b in zip(norms, norms[1:])]


Plan = tuple[float | None, ...]  # per step of the schedule: None computes; a number reuses, scaled by it


def plan(ratios: Sequence[float], steps: int, settings: MagSettings | None, first: int = 0,
         changes: Sequence[float] | None = None) -> Plan:
    """Which of `steps` steps call the transformer, for a run starting at step `first` (an
    edit's strength skips the schedule's start; skipped steps are None). The first step run and
    the first retention_ratio of the steps run are always computed; then a step is reused while
    the error accumulated since the last computed step stays within the threshold and at most
    max_skip_steps steps were reused in a row. A reused step's error: the sum of the calibrated
    changes since the last computed step, or without them MagCache's |1 - prod(gamma)|."""
    if settings is None or settings.threshold <= 0 or settings.max_skip_steps <= 0:
        return (None,) * steps
    if len(ratios) != steps:
        ratios = interpolate(ratios, steps)
    out: list[float | None] = [None] * steps
    keep = max(1, math.ceil(settings.retention_ratio * (steps - first)))
    acc_ratio, acc_change, acc_err, skipped = 1.0, 0.0, 0.0, 0
    for i in range(first + keep, steps):
        acc_ratio *= ratios[i]
        acc_change += changes[i] if changes is not None else 0.0
        acc_err += acc_change if changes is not None else abs(1.0 - acc_ratio)
        skipped += 1
        if acc_err <= settings.threshold and skipped <= settings.max_skip_steps:
            out[i] = acc_ratio
        else:
            acc_ratio, acc_change, acc_err, skipped = 1.0, 0.0, 0.0, 0
    return tuple(out)


def counts(p: Plan, first: int = 0) -> tuple[int, int]:
    """(computed, reused) steps of a plan run from `first`."""
    reused = sum(1 for s in p[first:] if s is not None)
    return len(p) - first - reused, reused
