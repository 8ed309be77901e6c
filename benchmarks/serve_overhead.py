"""What the server adds to a generation: HTTP round trip against a direct pipeline call, measured
side by side in one run on the same loaded pipeline, plus the cost of encoding the response.

    .venv/bin/python benchmarks/serve_overhead.py [MODEL] --out benchmarks/results/serve-overhead-cpu.json

MODEL defaults to the embedded demo model. Results are JSON (medians and all samples).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from omni_trt.demo import ensure_demo_model  # noqa: E402
from omni_trt.runtime.pipeline import load_pipeline  # noqa: E402
from omni_trt.runtime.request import resolve  # noqa: E402
from omni_trt.server.encoding import encode_image  # noqa: E402
from serving import live_server  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(samples: list[float]) -> dict:
    return {"median_ms": statistics.median(samples) * 1000, "min_ms": min(samples) * 1000, "samples_ms": [s * 1000 for s in samples]}


def bench_case(runtime, client: httpx.Client, size: str, steps: int, repeats: int) -> dict:
    body = {"prompt": "a dragon over green mountains", "size": size, "num_inference_steps": steps, "seed": 42}
    req = resolve(runtime.family, body["prompt"], size=size, steps=steps, seed=42)
    direct = lambda: runtime.generate([req])  # noqa: E731
    http = lambda: client.post("/v1/images/generations", json=body).raise_for_status()  # noqa: E731
    direct(), http()  # warm-up
    # Interleave so drift (thermal, other load) hits both the same.
    d, h = [], []
    for _ in range(repeats):
        d += timed(direct, 1)
        h += timed(http, 1)
    return {
        "size": size,
        "steps": steps,
        "direct_pipeline": summary(d),
        "http_round_trip": summary(h),
        "overhead_ms": (statistics.median(h) - statistics.median(d)) * 1000,
        "ratio": statistics.median(h) / statistics.median(d),
    }


def bench_encode(repeats: int) -> dict:
    # A smooth gradient with noise: compresses like a generated picture, not like flat colour.
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 1024)
    arr = np.clip(np.add.outer(x, x)[..., None] / 2 + rng.normal(0, 6, (1024, 1024, 3)), 0, 255).astype("uint8")
    image = Image.fromarray(arr)
    out = {}
    for name, kw in {"png_level1(default)": dict(fmt="png"), "png_level6(pillow default)": dict(fmt="png", compression=67),
                     "png_level0": dict(fmt="png", compression=0), "jpeg_q90": dict(fmt="jpeg"), "webp_q90": dict(fmt="webp")}.items():
        data = encode_image(image, **kw)
        out[name] = {**summary(timed(lambda: encode_image(image, **kw), repeats)), "bytes": len(data)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None, help="write JSON here (default: stdout only)")
    args = ap.parse_args()
    model = args.model or str(ensure_demo_model())
    runtime = load_pipeline(model)
    result = {"model": args.model or "demo (tiny z-image)", "device": runtime.device, "dtype": runtime.dtype,
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "cases": [], "encode_1024": bench_encode(args.repeats)}
    with live_server(lambda: runtime, max_batch_size=1) as live, live.client(timeout=600) as client:
        for size, steps, repeats in (("64x64", 2, args.repeats), ("512x512", 2, max(3, args.repeats // 2))):
            result["cases"].append(bench_case(runtime, client, size, steps, repeats))
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    for c in result["cases"]:
        print(f"{c['size']} {c['steps']} steps: direct {c['direct_pipeline']['median_ms']:.1f} ms, HTTP {c['http_round_trip']['median_ms']:.1f} ms, "
              f"overhead {c['overhead_ms']:.1f} ms (x{c['ratio']:.2f})")
    for k, v in result["encode_1024"].items():
        print(f"encode 1024x1024 {k}: {v['median_ms']:.1f} ms, {v['bytes'] // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
