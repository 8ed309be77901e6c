"""Export, validation and TensorRT-RTX build times for every family's tiny pipeline, on this
machine (CPU-only builds ahead of time), with the validation errors the manifest records.

    .venv/bin/python benchmarks/build_tiny.py --out benchmarks/results/build-tiny-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni_trt.compiler.execute import build_engines  # noqa: E402
from omni_trt.demo import builders  # noqa: E402
from omni_trt.models import FAMILIES  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--opt-level", type=int, default=3)
    args = ap.parse_args()
    results = {"machine": {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count()}, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in FAMILIES:
            model = Path(tmp) / name
            builders(name)[0](model)
            t0 = time.perf_counter()
            report = build_engines(str(model), Path(tmp) / f"engines-{name}", target="tensorrt-rtx", min_size="64x64",
                                   max_size="256x256", max_batch=2, opt_level=args.opt_level)
            total = time.perf_counter() - t0
            comps = {}
            m = report.manifest
            for comp, c in m.components.items():
                comps[comp] = {
                    "seconds": report.seconds.get(comp, {}),
                    "validation_max_rel_error": max(c.onnx.validation.errors.values()),
                    "validation_errors": c.onnx.validation.errors,
                    "onnx_mb": round(sum(m.files[f].size for f in c.onnx.files) / 1e6, 2),
                    "plan_mb": round(m.files[c.engine.path].size / 1e6, 2),
                    "targets": c.engine.compute_capabilities,
                }
            results["families"][name] = {"total_s": round(total, 1), "components": comps}
            print(f"{name}: {total:.1f} s " + ", ".join(
                f"{k}: " + " ".join(f"{s} {v:.1f}s" for s, v in c["seconds"].items()) + f", max rel err {c['validation_max_rel_error']:.1e}"
                for k, c in comps.items()))
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
