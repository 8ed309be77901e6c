"""`omni bench`: latency per stage and end to end, PyTorch against the engines, in one run.

Each runtime is loaded, warmed up, timed, and released before the next, so two copies of a large
model never share the GPU; the ratios compare runs of the same process, size and seeds.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STAGE_KEYS = ("text_encode", "denoise", "vae_decode", "total")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure latency per stage: PyTorch against the engines", description=(
        "Time text encoding, denoising, VAE decoding and the whole pipeline call for each runtime, one after another in "
        "this process, and print (and optionally write as JSON) medians and the speedup of each runtime over the first."))
    p.add_argument("model", nargs="?", default=None, help="hub id or local folder (default: the engine dir's model, or the demo model)")
    p.add_argument("--engine-dir", default=None, help="engine dir from `omni build-engine`, for the engine runtimes")
    p.add_argument("--runtimes", default=None, help="comma-separated, first is the baseline (default: torch, plus auto's choice with --engine-dir)")
    p.add_argument("--size", default=None, help="WxH (default: the family's default size)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the family's)")
    p.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default: 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls (default: 5)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_bench)


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median and min milliseconds per stage over runs."""
    out = {}
    for key in STAGE_KEYS:
        values = [r[key] * 1000 for r in runs if key in r]
        if values:
            out[key] = {"median_ms": statistics.median(values), "min_ms": min(values)}
    return out


def speedups(baseline: dict[str, dict[str, float]], other: dict[str, dict[str, float]]) -> dict[str, float]:
    """baseline median / other median per stage: > 1 means `other` is faster."""
    return {k: baseline[k]["median_ms"] / other[k]["median_ms"] for k in baseline if k in other and other[k]["median_ms"] > 0}


def _runtime_names(args: argparse.Namespace) -> list[str]:
    if args.runtimes:
        return [r.strip() for r in args.runtimes.split(",") if r.strip()]
    return ["torch", "auto"] if args.engine_dir else ["torch"]


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .demo import ensure_demo_model
    from .enginedir import Manifest
    from .runtime.loader import load_runtime
    from .runtime.pipeline import LoadOptions
    from .runtime.request import resolve

    model = args.model or (Manifest.read(args.engine_dir).model.id if args.engine_dir else str(ensure_demo_model()))
    results: dict[str, Any] = {
        "model": model,
        "engine_dir": args.engine_dir,
        "batch": args.batch,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "runtimes": {},
    }
    opts = LoadOptions(device=args.device, dtype=args.dtype)
    for name in _runtime_names(args):
        t0 = time.perf_counter()
        rt = load_runtime(model, args.engine_dir if name != "torch" else None, name, opts)
        load_s = time.perf_counter() - t0
        req = resolve(rt.family, "a photo of a red fox in the snow, detailed fur", size=args.size, steps=args.steps, n=args.batch, seed=0, limits=rt.limits)
        for _ in range(args.warmup):
            rt.generate([req])
        runs = [rt.generate([req]).stages for _ in range(args.repeats)]
        stats = summarize(runs)
        results["size"], results["steps"] = f"{req.width}x{req.height}", req.steps
        results["runtimes"][rt.kind] = {"load_s": load_s, "device": rt.device, "dtype": rt.dtype, "stages": stats,
                                        "denoise_per_step_ms": stats["denoise"]["median_ms"] / req.steps if "denoise" in stats else None}
        line = ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in stats.items())
        print(f"{rt.kind:12s} {line}", file=sys.stderr)
        del rt
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    kinds = list(results["runtimes"])
    base = results["runtimes"][kinds[0]]["stages"]
    results["speedup_vs_" + kinds[0]] = {k: speedups(base, results["runtimes"][k]["stages"]) for k in kinds[1:]}
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
