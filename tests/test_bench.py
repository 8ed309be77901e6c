"""`omni bench --runtimes`: several runtimes in one run and one JSON, ratios against the first,
and the ones that cannot run here recorded with the reason."""

from __future__ import annotations

import json

import pytest

from omni_trt.bench import STAGE_KEYS
from omni_trt.cli import main


def test_bench_compares_torch_torch_compile_and_onnxruntime_in_one_json(built, tmp_path):
    _, engine_dir, _ = built("z-image")
    out = tmp_path / "bench.json"
    rc = main(["bench", "--engine-dir", str(engine_dir), "--runtimes", "torch,torch-compile,onnxruntime,tensorrt",
               "--size", "64x64", "--steps", "2", "--warmup", "1", "--repeats", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    runtimes = report["runtimes"]
    assert list(runtimes) == ["torch", "torch-compile", "onnxruntime", "tensorrt"]
    assert report["size"] == "64x64" and report["steps"] == 2 and report["baseline"] == "torch"
    for name in ("torch", "torch-compile", "onnxruntime"):
        stages = runtimes[name]["stages"]
        assert set(stages) == set(STAGE_KEYS), (name, stages)
        assert all(s["median_ms"] > 0 and 0 < s["min_ms"] <= s["median_ms"] for s in stages.values()), (name, stages)
    assert runtimes["torch-compile"]["compile_warmup_s"] > 0 and runtimes["torch-compile"]["compile"]["warmup_size"] == "64x64"
    assert runtimes["onnxruntime"]["components"] == {"transformer": "onnxruntime", "vae_decoder": "onnxruntime"}
    assert "no CUDA GPU" in runtimes["tensorrt"]["skipped"]  # this machine has none
    ratios = report["speedup_vs_torch"]
    assert set(ratios) == {"torch-compile", "onnxruntime"}
    for name, per_stage in ratios.items():
        assert set(per_stage) == set(STAGE_KEYS)
        for stage, ratio in per_stage.items():
            want = runtimes["torch"]["stages"][stage]["median_ms"] / runtimes[name]["stages"][stage]["median_ms"]
            assert ratio == pytest.approx(want, rel=1e-12), (name, stage)


def test_bench_records_why_a_runtime_cannot_run_and_fails_when_none_can(tmp_path, tiny_dir):
    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny_dir("z-image")), "--runtimes", "onnxruntime,tensorrt", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["baseline"] is None
    for name in ("onnxruntime", "tensorrt"):
        assert "give --engine-dir" in report["runtimes"][name]["skipped"], report["runtimes"][name]
    assert main(["bench", "--runtimes", "torch,tensorrtt"]) == 2  # a typo is a usage error, not a skip
