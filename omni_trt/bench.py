"""`omni bench`: latency per stage and end to end, PyTorch eager, torch.compile and the engines,
in one run and one JSON.

Each runtime is loaded, warmed up, timed, and released before the next, so two copies of a large
model never share the GPU; the ratios compare runs of the same process, size and seeds. A runtime
that cannot run here (TensorRT without a GPU, an engine runtime without --engine-dir) is recorded
as skipped with the reason; one that fails is recorded with its error, and the others still run.
With --out the JSON is rewritten after each runtime, so a run that is killed keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runtime.loader import ModelRef

log = logging.getLogger(__name__)

STAGE_KEYS = ("text_encode", "denoise", "vae_decode", "total")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure latency per stage: PyTorch eager, torch.compile and the engines", description=(
        "Time text encoding, denoising, VAE decoding and the whole pipeline call for each runtime, one after another in "
        "this process, and print (and optionally write as JSON) medians and the speedup of each runtime over the first "
        "one that ran. Runtimes that cannot run here are recorded as skipped, with the reason."))
    p.add_argument("model", nargs="?", default=None, help="hub id or local folder (default: the engine dir's model, or the demo model)")
    p.add_argument("--engine-dir", default=None, help="engine dir from `omni build-engine`, for the engine runtimes")
    p.add_argument("--runtimes", default=None, help=(
        "comma-separated, first is the baseline: torch (eager PyTorch), torch-compile (torch.compile of the transformer's "
        "repeated blocks and the VAE decoder, compiled and warmed up at --size before timing; the compile time is "
        "recorded as compile_warmup_s), onnxruntime, tensorrt, auto (these three run --engine-dir's engines). "
        "Default: torch, plus auto's choice with --engine-dir"))
    p.add_argument("--size", default=None, help="WxH (default: the family's default size)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the family's)")
    p.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default: 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls (default: 5)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    from .flags import add_cache_args

    add_cache_args(p)
    p.set_defaults(func=cmd_bench)


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median and min milliseconds per stage over runs (and the VAE encoder's, where an edit ran it:
    an edit-only family's bench)."""
    out = {}
    for key in (*STAGE_KEYS, "vae_encode"):
        values = [r[key] * 1000 for r in runs if key in r]
        if values:
            out[key] = {"median_ms": statistics.median(values), "min_ms": min(values)}
    return out


def speedups(baseline: dict[str, dict[str, float]], other: dict[str, dict[str, float]]) -> dict[str, float]:
    """baseline median / other median per stage: > 1 means `other` is faster."""
    return {k: baseline[k]["median_ms"] / other[k]["median_ms"] for k in baseline if k in other and other[k]["median_ms"] > 0}


def compare(runtimes: dict[str, dict[str, Any]]) -> tuple[str | None, dict[str, dict[str, float]]]:
    """(baseline, runtime -> speedups over it): the baseline is the first runtime that ran
    (entries with "stages"); skipped and failed ones get no ratios."""
    ran = [k for k, v in runtimes.items() if "stages" in v]
    if not ran:
        return None, {}
    base = runtimes[ran[0]]["stages"]
    return ran[0], {k: speedups(base, runtimes[k]["stages"]) for k in ran[1:]}


def _runtime_names(args: argparse.Namespace) -> list[str]:
    from .errors import UsageError
    from .runtime.loader import RUNTIMES

    if not args.runtimes:
        return ["torch", "auto"] if args.engine_dir else ["torch"]
    names = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown or not names:
        raise UsageError(f"--runtimes: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(RUNTIMES)}")
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .runtime.loader import resolve_model

    names = _runtime_names(args)
    ref = resolve_model(args.model, args.engine_dir)
    results: dict[str, Any] = {
        "model": args.model or ref.source(),
        "engine_dir": args.engine_dir,
        "batch": args.batch,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cpu_count": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0]},  # CPU figures mean little on a loaded machine
        "runtimes": {},
    }
    for name in names:
        kind, entry = bench_runtime(name, ref, args)
        results["runtimes"][name if kind in results["runtimes"] else kind] = entry
        if "stages" in entry:
            results["size"], results["steps"] = entry.pop("size"), entry.pop("steps")
        _write(with_ratios(results), args.out)  # after each runtime: a killed run keeps what it measured
    report = with_ratios(results)
    print(json.dumps(report, indent=2))
    failed = [k for k, v in report["runtimes"].items() if "error" in v]
    if failed or report["baseline"] is None:
        print(f"error: {'failed: ' + ', '.join(failed) if failed else 'no runtime could run here'}", file=sys.stderr)
        return 1
    return 0


def with_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """The results with "baseline" and "speedup_vs_<baseline>" (runtime -> stage -> ratio)."""
    baseline, ratios = compare(results["runtimes"])
    out = {**results, "baseline": baseline}
    if baseline is not None:
        out[f"speedup_vs_{baseline}"] = ratios
    return out


def _write(results: dict[str, Any], out: str | None) -> None:
    if out:
        from .files import atomic_write

        atomic_write(out, json.dumps(results, indent=2) + "\n")


def bench_runtime(name: str, ref: ModelRef, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(what ran, its entry): stages and load time, or "skipped" (an OmniError: it cannot run
    here, and why), or "error" (a fault, logged with its traceback)."""
    import torch

    from .errors import OmniError
    from .runtime.loader import ENGINE_RUNTIMES, load_runtime
    from .runtime.pipeline import LoadOptions
    from .runtime.request import ImageAsk, edit_only_input, resolve

    from .runtime.stepcache import parse_cache_config

    opts = LoadOptions(device=args.device, dtype=args.dtype, warmup_size=args.size, cache=parse_cache_config(args.cache_backend, args.cache_config))
    rt = None
    t0 = time.perf_counter()
    try:
        rt = load_runtime(ref if name in ENGINE_RUNTIMES else ref.without_engines(), runtime=name, options=opts)
        load_s = time.perf_counter() - t0
        ask = ImageAsk("a photo of a red fox in the snow, detailed fur", size=args.size, steps=args.steps, n=args.batch, seed=0)
        # An edit-only family (Qwen-Image-Edit) is timed on an edit of a plain input image at the size.
        req = resolve(rt.family, ask, limits=rt.limits, cache=rt.cache_settings, image=edit_only_input(rt.family, args.size))
        for _ in range(args.warmup):
            rt.generate([req])
        results = [rt.generate([req]) for _ in range(args.repeats)]
        stats = summarize([r.stages for r in results])
        kind = rt.kind
        entry: dict[str, Any] = {"load_s": load_s, "device": rt.device, "dtype": rt.dtype, "stages": stats,
                                 "denoise_per_step_ms": stats["denoise"]["median_ms"] / req.steps if "denoise" in stats else None,
                                 "size": f"{req.width}x{req.height}", "steps": req.steps}
        if rt.step_cache is not None:
            entry["cache"] = rt.step_cache.describe()
            entry["denoise_steps"] = dict(zip(("computed", "reused"), results[-1].steps))
        if rt.compiled:
            entry["compile_warmup_s"] = rt.compiled.warmup_s
            entry["compile"] = rt.compiled.describe()
        if rt.swap:
            entry["components"] = dict(rt.swap.components)
    except OmniError as e:
        print(f"{name:13s} skipped: {e}", file=sys.stderr)
        return name, {"skipped": str(e)}
    except Exception as e:  # a fault in one runtime: recorded, the others still run
        log.exception("%s failed", name)
        return name, {"error": f"{type(e).__name__}: {e}"}
    finally:
        compiled = rt is not None and rt.compiled is not None
        del rt
        gc.collect()
        if compiled:
            torch._dynamo.reset()  # drop the compiled graphs, and what they hold, before the next runtime
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{kind:13s} " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in stats.items()), file=sys.stderr)
    return kind, entry
