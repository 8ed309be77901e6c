"""How well the demo model draws, through the serving code: the checker (omni_trt/demo/quality.py)
over its 30 fixed prompts and seeds at the model's own defaults (omni_trt_defaults.json), on
torch and on ONNX Runtime engines built from the same folder (`omni build-engine --onnx-only`,
timed), and whether the checker gives both the same answer per image. Also, on torch, 60 other
prompts and seeds (benchmark_prompts(60, seed=1), seeds from 11000): a model picked on the 30 must score there too.

    python benchmarks/demo_quality.py [MODEL_DIR] [--threads 1] [--out benchmarks/results/demo-quality-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def drawn(rt, prompts) -> list:
    """What the checker reads in each image the runtime draws at its defaults (batches of 10)."""
    from omni_trt.demo.quality import read_picture
    from omni_trt.runtime.request import ImageAsk, resolve

    reqs = [resolve(rt.family, ImageAsk(p, seed=seed), limits=rt.limits) for p, seed in prompts]
    seen = []
    for start in range(0, len(reqs), 10):
        images = [im for per in rt.generate(reqs[start:start + 10]).images for im in per]
        seen += [read_picture(np.asarray(im.convert("RGB"))) for im in images]
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="a pipeline folder (default: the committed demo model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/demo-quality-cpu.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from omni_trt.demo import TRAINED_DIR, quality
    from omni_trt.runtime.loader import load_runtime, resolve_model

    model = Path(args.model or TRAINED_DIR)
    prompts = quality.benchmark_prompts(30)
    asked = [quality.parse_caption(p) for p, _ in prompts]
    rt = load_runtime(resolve_model(str(model)))
    d = rt.family.defaults
    on_torch = drawn(rt, prompts)
    others = [(p, seed + 10_000) for p, seed in quality.benchmark_prompts(60, seed=1)]  # other noise as well
    held_out = quality.score([quality.parse_caption(p) for p, _ in others], drawn(rt, others))
    with tempfile.TemporaryDirectory(prefix="demo-quality-") as tmp:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "omni_trt.cli", "build-engine", str(model), "--onnx-only", "--engine-dir", tmp,
                        "--max-size", f"{d.width}x{d.height}"], check=True, capture_output=True)
        build_s = time.monotonic() - t0
        on_ort = drawn(load_runtime(resolve_model(str(model), tmp), runtime="onnxruntime"), prompts)
    out = {"model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
           "size": f"{d.width}x{d.height}", "steps": d.steps, "prompts": len(prompts), "threads": args.threads,
           "torch": quality.score(asked, on_torch).__dict__, "onnxruntime": quality.score(asked, on_ort).__dict__,
           "same_answer": sum(a == b for a, b in zip(on_torch, on_ort)), "onnx_build_seconds": round(build_s, 1),
           "torch_other_60_prompts": held_out.__dict__}
    print(json.dumps(out))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
