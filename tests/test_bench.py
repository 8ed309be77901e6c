"""`omni bench --runtimes`: the runtimes that cannot run here are recorded with the reason.

torch, torch-compile and ONNX Runtime compared in one bench JSON, with their ratios, are checked
on the bench the GPU suite's --tiny run makes (tests/test_gpu_suite.py): one bench run serves
both, and make test's time budget is tight."""

from __future__ import annotations

import json

from omni_trt.cli import main


def test_bench_records_why_a_runtime_cannot_run_and_fails_when_none_can(tmp_path, tiny_dir):
    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny_dir("z-image")), "--runtimes", "onnxruntime,tensorrt", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["baseline"] is None
    for name in ("onnxruntime", "tensorrt"):
        assert "give --engine-dir" in report["runtimes"][name]["skipped"], report["runtimes"][name]
    assert main(["bench", "--runtimes", "torch,tensorrtt"]) == 2  # a typo is a usage error, not a skip
