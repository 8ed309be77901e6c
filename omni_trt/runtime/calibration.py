"""The step cache's calibration: uncached generations record the transformer output's magnitude at
each step; the ratios step to step (runtime.stepcache) are kept with the model, in the engine dir's
manifest (`omni calibrate-cache --engine-dir`) or under $OMNI_TRT_CACHE/step-cache/ (a torch model,
or engines calibrated when served), and a table of thresholds measures what each one costs in
picture (PSNR, SSIM against the uncached images of the same prompts and seeds) and buys in time."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..enginedir.manifest import Manifest, StepCacheEntry, now
from ..files import atomic_write, cache_root
from ..models import Family
from .modulekey import module_key
from .preview import FIT_PROMPTS
from .request import GenerationRequest, ImageAsk, edit_only_input, resolve
from .stepcache import CacheConfig, MagSettings, Plan, nearest_changes, nearest_ratios, plan, ratios_from_norms

log = logging.getLogger(__name__)

# The prompts a calibration averages over when none are given (the preview fit's, in the demo's
# grammar): the ratios barely depend on the prompt, MagCache's observation.
PROMPTS = FIT_PROMPTS[:4]
THRESHOLDS = (0.06, 0.12, 0.24, 0.5)
VERSION = 1  # of the cache folder's files


@dataclass(frozen=True)
class StepCache:
    """A runtime's step cache: the server's settings and the calibrated ratios by step count;
    `source` says where those came from (for /v1/models and the log)."""

    settings: MagSettings
    ratios: dict[int, tuple[float, ...]] = field(default_factory=dict)
    changes: dict[int, tuple[float, ...]] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def of(cls, settings: MagSettings, entry: StepCacheEntry, source: str = "") -> StepCache:
        return cls(settings, {n: tuple(r) for n, r in entry.ratios.items()}, {n: tuple(c) for n, c in entry.changes.items()}, source)

    def plan(self, steps: int, first: int, settings: MagSettings | None) -> Plan | None:
        """The request's plan (None: uncached, every step computes)."""
        if settings is None:
            return None
        return plan(nearest_ratios(self.ratios, steps), steps, settings, first, nearest_changes(self.changes, steps))

    def describe(self) -> dict[str, Any]:
        return {"backend": "mag_cache", **self.settings.describe(), "calibrated_steps": sorted(self.ratios),
                "calibration": self.source}


def _engine_dir(runtime: Any) -> Path | None:
    swap = runtime.swap
    return Path(swap.engine_dir) if swap is not None and swap.engine_dir else None


def cache_path(runtime: Any) -> Path | None:
    """Where a calibration made outside an engine dir's manifest is kept (None: nothing names it)."""
    engine_dir = _engine_dir(runtime)
    engine_id = None
    if engine_dir is not None:
        m = Manifest.read_or_none(engine_dir)
        entry = m.components.get("transformer") if m else None
        engine_id = ",".join(m.files[rel].sha256 for rel in entry.onnx.files if rel in m.files) if entry else None
    key = module_key(runtime.pipe.transformer, VERSION, runtime.family.name, engine_id, runtime.kind == "torch-compile")
    return cache_root() / "step-cache" / f"{key[:32]}.json" if key else None


def load_calibration(runtime: Any) -> tuple[StepCacheEntry, str] | None:
    """The stored calibration and where it is: the engine dir's manifest first, then the cache folder."""
    engine_dir = _engine_dir(runtime)
    if engine_dir is not None:
        m = Manifest.read_or_none(engine_dir)
        if m is not None and m.step_cache is not None:
            return m.step_cache, f"the manifest in {engine_dir}"
    path = cache_path(runtime)
    if path is not None and path.is_file():
        try:
            return StepCacheEntry.model_validate_json(path.read_text()), str(path)
        except (OSError, ValueError) as e:
            log.warning("step cache: ignoring %s (%s); calibrating again", path, e)
    return None


def store_calibration(runtime: Any, entry: StepCacheEntry, manifest: bool) -> str:
    """Keep `entry`: in the engine dir's manifest (merged with the step counts it has) when asked
    and there is one, else in the cache folder. Returns where."""
    engine_dir = _engine_dir(runtime)
    if manifest and engine_dir is not None:
        m = Manifest.read(engine_dir)
        if m.step_cache is not None:
            old = m.step_cache
            entry = entry.model_copy(update={"ratios": {**old.ratios, **entry.ratios}, "changes": {**old.changes, **entry.changes}})
        m.model_copy(update={"step_cache": entry}).write(engine_dir)
        return f"the manifest in {engine_dir}"
    path = cache_path(runtime)
    if path is None:
        return "nowhere (nothing names this transformer)"
    atomic_write(path, entry.model_dump_json() + "\n")
    return str(path)


def _requests(runtime: Any, prompts: Sequence[str], width: int, height: int, steps: int, seed: int,
              settings: MagSettings | None) -> list[GenerationRequest]:
    """The family's own requests (its defaults and checks, as any route's): one a prompt, seeds
    counting up; an edit-only family's edit a plain input image (what its warm-up edits too)."""
    image = edit_only_input(runtime.family, f"{width}x{height}")
    return [resolve(runtime.family, ImageAsk(prompt=p, width=width, height=height, steps=steps, seed=seed + i), cache=settings,
                    image=image) for i, p in enumerate(prompts)]


def calibrate(runtime: Any, steps: Sequence[int], prompts: Sequence[str] = PROMPTS, size: tuple[int, int] | None = None,
              seed: int = 0) -> StepCacheEntry:
    """Uncached generations, one prompt a call, per step count: the mean of their per-step ratios."""
    family: Family = runtime.family
    width, height = size or (family.defaults.width, family.defaults.height)
    t0 = time.perf_counter()
    ratios: dict[int, list[float]] = {}
    changes: dict[int, list[float]] = {}
    for n in steps:
        hooks = [runtime.trace([r], record=True).hook for r in _requests(runtime, prompts, width, height, n, seed, None)]
        ratios[n] = [float(v) for v in np.mean([ratios_from_norms(h.norms) for h in hooks], axis=0)]
        changes[n] = [0.0] + [float(v) for v in np.mean([h.changes for h in hooks], axis=0)] if n > 1 else [0.0]
    return StepCacheEntry(ratios=ratios, changes=changes, size=f"{width}x{height}", prompts=len(prompts),
                          seconds=round(time.perf_counter() - t0, 3), calibrated_at=now())


def step_cache_for(runtime: Any, config: CacheConfig) -> StepCache | None:
    """The runtime's step cache at load: the operator's mag_ratios, else a stored calibration,
    else one made now at the default size and steps (logged with its time) and stored."""
    if config.settings is None:
        return None
    if config.ratios is not None:
        return StepCache(config.settings, {len(config.ratios): config.ratios}, source="--cache-config mag_ratios")
    found = load_calibration(runtime)
    if found is None:
        entry = calibrate(runtime, [runtime.family.defaults.steps])
        where = store_calibration(runtime, entry, manifest=False)
        log.info("step cache: calibrated at load in %.1fs (%d prompts, %s, %s steps), kept in %s", entry.seconds, entry.prompts,
                 entry.size, ",".join(map(str, entry.ratios)), where)
        found = entry, f"calibrated at load ({entry.seconds:.1f} s)"
    entry, source = found
    log.info("step cache: mag_cache %s, ratios from %s", config.settings.describe(), source)
    return StepCache.of(config.settings, entry, source)


# ---- the table a user chooses a threshold from ----

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity of two uint8 RGB images (a uniform 7x7 window per channel,
    the usual constants), in [-1, 1]."""
    x = torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None]
    y = torch.from_numpy(b.astype(np.float64)).permute(2, 0, 1)[None]
    window = min(window, x.shape[-1], x.shape[-2])
    pool = lambda t: torch.nn.functional.avg_pool2d(t, window, stride=1)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx, vy, cxy = pool(x * x) - mx * mx, pool(y * y) - my * my, pool(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def _cost(trace: Any, seconds: float) -> dict[str, Any]:
    """What one traced call cost: seconds end to end and in the transformer (denoise) and in the
    denoising loop (the call less text encoding and VAE decoding: the rule and its reuses
    included), transformer calls, steps computed and reused."""
    hook, stages = trace.hook, trace.stages
    return {"seconds": seconds, "denoise_seconds": stages.get("denoise", 0.0),
            "loop_seconds": stages["total"] - stages.get("text_encode", 0.0) - stages.get("vae_decode", 0.0),
            "calls": hook.calls, "computed": hook.computed, "reused": hook.reused}


def evaluate(runtime: Any, entry: StepCacheEntry, steps: int, prompts: Sequence[str] = PROMPTS,
             thresholds: Sequence[float] = THRESHOLDS, size: tuple[int, int] | None = None, seed: int = 0,
             base: MagSettings | None = None) -> list[dict[str, Any]]:
    """Per threshold (0 first: the uncached reference): steps computed and reused, seconds (each
    prompt runs at every threshold back to back, so a burst of load on a shared machine falls on
    all of them), speed-up over uncached, mean PSNR and SSIM against the uncached images."""
    family: Family = runtime.family
    width, height = size or (family.defaults.width, family.defaults.height)
    base = base or MagSettings()
    settings = [None, *(replace(base, threshold=t) for t in thresholds)]
    saved = runtime.step_cache
    runtime.set_step_cache(StepCache.of(base, entry))
    images: list[list[np.ndarray]] = [[] for _ in settings]
    totals: list[dict[str, Any]] = [{} for _ in settings]
    try:
        for i, prompt in enumerate(prompts):
            for j, s in enumerate(settings):
                request = _requests(runtime, [prompt], width, height, steps, seed + i, s)
                t0 = time.perf_counter()
                traced = runtime.trace(request)
                cost = _cost(traced, time.perf_counter() - t0)
                totals[j] = {k: totals[j].get(k, 0) + v for k, v in cost.items() if k not in ("computed", "reused")}
                totals[j].update(computed=cost["computed"], reused=cost["reused"])
                images[j] += [np.asarray(im.convert("RGB")) for im in traced.images]
    finally:
        runtime.set_step_cache(saved)
    reference = images[0]
    rows = []
    for t, cost, imgs in zip((0.0, *thresholds), totals, images):
        rows.append({"threshold": t, **cost, "speedup": round(totals[0]["seconds"] / cost["seconds"], 3) if cost["seconds"] else None,
                     "psnr": round(float(np.mean([psnr(a, b) for a, b in zip(reference, imgs)])), 2) if t else float("inf"),
                     "ssim": round(float(np.mean([ssim(a, b) for a, b in zip(reference, imgs)])), 4) if t else 1.0, "images": imgs})
    return rows


def format_table(rows: list[dict[str, Any]], steps: int) -> str:
    lines = [f"{'mag_threshold':>13}  {'computed':>8}  {'reused':>6}  {'calls saved':>11}  {'speed-up':>8}  {'PSNR dB':>7}  {'SSIM':>6}"]
    for r in rows:
        saved = steps / r["computed"] if r["computed"] else float("inf")
        lines.append(f"{r['threshold']:>13g}  {r['computed']:>8}  {r['reused']:>6}  {saved:>10.2f}x  {r['speedup'] or 0:>7.2f}x  "
                     f"{r['psnr']:>7.2f}  {r['ssim']:>6.3f}")
    return "\n".join(lines)
