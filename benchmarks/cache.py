"""The step cache (MagCache around the whole transformer) and the prompt cache, measured: per model,
runtime and step count, uncached against mag_cache at three thresholds, one run, the same prompts
and seeds: transformer calls, seconds end to end and in the transformer, the speed-ups, PSNR/SSIM
against the uncached images and, on the trained demo model, the quality checker's answers. Then
the prompt cache's hit against its miss.

    python benchmarks/cache.py [--cases demo,demo-onnxruntime,z-image-1layer,qwen-image-1layer] [--steps 20 50]
        [--prompts 8] [--out benchmarks/results/cache-cpu.json]

The one-layer real-shape models are the published widths with one transformer layer and random
weights (omni demo-model --real-shapes): their pictures mean nothing, their costs do. The ONNX
Runtime case builds the demo's engines first (ONNX only) into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.06, 0.12, 0.24)


def _checker(rows: list[dict[str, Any]], prompts: list[tuple[str, int]]) -> None:
    """Each row's images read back by the demo's checker (fg, bg, shape right, as fractions)."""
    from omni_trt.demo.quality import parse_caption, read_picture, score

    asked = [parse_caption(p) for p, _ in prompts]
    for row in rows:
        s = score(asked, [read_picture(im) for im in row["images"]])
        row["checker"] = {"fg": s.fg, "bg": s.bg, "shape": s.shape}


def _model(case: str, work: Path) -> tuple[str | None, str | None, str, tuple[int, int] | None]:
    """(model, engine dir, runtime, size) of a case."""
    if case == "demo":
        return None, None, "torch", None
    if case == "demo-onnxruntime":
        engines = work / "demo-engines"
        subprocess.run([sys.executable, "-m", "omni_trt", "--log-level", "WARNING", "build-engine", "--engine-dir", str(engines),
                        "--onnx-only", "--min-size", "64x64", "--max-size", "128x128", "--max-batch", "1"], check=True, cwd=ROOT)
        return None, str(engines), "onnxruntime", None
    family = case.removesuffix("-1layer")
    from omni_trt.demo import z_image, qwen_image

    builder, overrides = {"z-image": (z_image, {"n_layers": 1, "n_refiner_layers": 1}), "qwen-image": (qwen_image, {"num_layers": 1})}[family]
    out = work / case
    builder.build_real_shapes(out, "bf16", overrides=overrides)
    return str(out), None, "torch", (128, 128)


def run_case(case: str, steps: list[int], count: int, work: Path) -> dict[str, Any]:
    from omni_trt.demo.quality import benchmark_prompts
    from omni_trt.runtime.calibration import calibrate, evaluate
    from omni_trt.runtime.loader import load_runtime, resolve_model
    from omni_trt.runtime.pipeline import LoadOptions

    t0 = time.perf_counter()
    model, engine_dir, runtime, size = _model(case, work)
    rt = load_runtime(resolve_model(model, engine_dir), runtime=runtime, options=LoadOptions(device="cpu", dtype="fp32"))
    out: dict[str, Any] = {"runtime": rt.kind, "family": rt.family.name, "setup_s": round(time.perf_counter() - t0, 1), "by_steps": {}}
    pairs = benchmark_prompts(count)
    prompts = [p for p, _ in pairs]
    for n in steps:
        entry = calibrate(rt, [n], prompts[:4], size)
        rows = evaluate(rt, entry, n, prompts, THRESHOLDS, size, seed=pairs[0][1])
        if rt.family.name == "z-image" and model is None:
            _checker(rows, pairs)
        base = rows[0]
        for row in rows:
            row.pop("images")
            row["call_ratio"] = round(base["calls"] / row["calls"], 3)
            row["denoise_speedup"] = round(base["denoise_seconds"] / row["denoise_seconds"], 3) if row["denoise_seconds"] else None
            row["loop_speedup"] = round(base["loop_seconds"] / row["loop_seconds"], 3) if row["loop_seconds"] else None
            row["psnr"] = None if row["psnr"] == float("inf") else row["psnr"]
        out["by_steps"][str(n)] = {"calibration_s": entry.seconds, "ratios": [round(r, 4) for r in entry.ratios[n]], "thresholds": rows}
    out["prompt_cache"] = prompt_cache(rt, prompts[0])
    return out


def prompt_cache(rt: Any, prompt: str, repeats: int = 5) -> dict[str, float]:
    """encode_prompt through an 8-entry prompt cache: the first call (a miss) against repeats (hits)."""
    import torch

    from omni_trt.runtime.promptcache import PromptCache

    cache = PromptCache(8)
    encode = cache.wrap(rt.pipe.encode_prompt, "bench")
    device = torch.device(rt.device)
    with torch.inference_mode():  # a fresh list each call, as requests give: Z-Image writes its template into the list
        t0 = time.perf_counter()
        encode(prompt=[prompt], device=device)
        miss = time.perf_counter() - t0
        hits = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encode(prompt=[prompt], device=device)
            hits.append(time.perf_counter() - t0)
    return {"miss_ms": round(miss * 1000, 3), "hit_ms": round(float(np.median(hits)) * 1000, 3), "hits": cache.hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="demo,demo-onnxruntime,z-image-1layer,qwen-image-1layer")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--prompts", type=int, default=8, help="prompts (and seeds) a threshold runs (the checker's, in order)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    from common import write_result

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "command": "python benchmarks/cache.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_avg_1m": os.getloadavg()[0]},
        "thresholds": list(THRESHOLDS), "settings": {"mag_max_skip_steps": 5, "mag_retention_ratio": 0.1},
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("OMNI_TRT_CACHE", str(Path(tmp) / "cache"))
        for case in args.cases.split(","):
            print(f"{case} ...", file=sys.stderr, flush=True)
            result["cases"][case] = run_case(case, args.steps, args.prompts, Path(tmp))
            write_result(result, args.out)
    raise SystemExit(write_result(result, args.out))


if __name__ == "__main__":
    main()
