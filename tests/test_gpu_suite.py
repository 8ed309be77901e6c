"""benchmarks/gpu_suite.py --tiny, end to end: the GPU suite's every step (probe, model, engines,
bench, concurrency through a real `omni serve`) on the tiny demo model on CPU, so the command a
GPU session runs cannot rot between GPU sessions."""

from __future__ import annotations

import json
import numbers
import subprocess
import sys
from pathlib import Path

import pytest

from omni_trt.bench import STAGE_KEYS

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"probe", "model", "engines", "bench", "concurrency", "cache"}


def _numbers(value, path="figures"):
    """Every leaf of a nested figures dict, with its path."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")
    else:
        yield path, value


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    """One `gpu_suite.py --tiny` run: (its report, its work dir, the process result)."""
    tmp = tmp_path_factory.mktemp("suite")
    out, work = tmp / "suite.json", tmp / "work"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny", "--cache", "--out", str(out), "--work", str(work)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.is_file(), r.stderr[-3000:]
    return json.loads(out.read_text()), work, r


def test_gpu_suite_tiny_runs_every_step_into_one_json(tiny_suite):
    report, _, r = tiny_suite
    steps = report["steps"]
    assert set(steps) == STEPS and all(s["ok"] for s in steps.values()), (r.stderr[-3000:], {k: s.get("error") for k, s in steps.items()})
    assert r.returncode == 0, r.stderr[-3000:]
    assert report["tiny"] is True and report["wall_s"] > 0
    machine = report["machine"]
    assert {"torch", "diffusers", "onnxruntime"} <= set(machine["versions"]) and "gpu" in machine

    rtx = steps["probe"]["flavors"]["tensorrt-rtx"]
    assert rtx["build"]["ok"] and rtx["version"], rtx  # TensorRT-RTX builds without a GPU
    assert "no CUDA GPU" in rtx["deserialize"]["skipped"] and rtx["runs"] is False
    assert steps["model"]["real_shapes"] is False and steps["model"]["gb"] > 0
    assert steps["engines"]["onnx_only"] is True  # no TensorRT runs on a CPU; ONNX Runtime does

    bench = steps["bench"]
    assert list(bench["runtimes"]) == ["torch", "torch-compile", "onnxruntime", "tensorrt"]
    assert "onnx-only" in bench["runtimes"]["tensorrt"]["skipped"] and "bench tensorrt" in report["skipped"]
    assert bench["baseline"] == "torch" and set(bench["speedup_vs_torch"]) == {"torch-compile", "onnxruntime"}
    conc = steps["concurrency"]
    assert conc["requests"] == 4 and conc["runtime"] == "torch" and 1 <= conc["concurrent_pipeline_calls"] <= 4, conc
    cache = steps["cache"]  # --cache: omni calibrate-cache's table, kept in the engine dir's manifest
    assert set(cache["by_steps"]) == {"2", "4"} and cache["kept_in"].startswith("the manifest"), cache
    for n, rows in cache["by_steps"].items():
        assert [r["threshold"] for r in rows] == [0.0, 0.06, 0.12, 0.24]
        assert rows[0]["computed"] == int(n) and rows[0]["reused"] == 0 and all(r["computed"] + r["reused"] == int(n) for r in rows)

    figures = report["figures"]
    assert set(figures["bench_total_ms"]) == {"torch", "torch-compile", "onnxruntime"}
    assert set(figures["speedup_vs_torch"]) == {"torch-compile", "onnxruntime"}
    assert {"torch_compile_warmup_s", "concurrency"} <= set(figures)
    leaves = list(_numbers(figures))
    assert leaves and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 for _, v in leaves), leaves


def test_its_bench_json_compares_torch_torch_compile_and_onnxruntime(tiny_suite):
    # What `omni bench --runtimes torch,torch-compile,onnxruntime,tensorrt --engine-dir E` wrote
    # itself (E: the suite's --onnx-only build), not the suite's summary of it.
    _, work, _ = tiny_suite
    report = json.loads((work / "bench-1.json").read_text())
    runtimes = report["runtimes"]
    assert list(runtimes) == ["torch", "torch-compile", "onnxruntime", "tensorrt"]
    assert report["size"] == "64x64" and report["steps"] == 2 and report["baseline"] == "torch"
    for name in ("torch", "torch-compile", "onnxruntime"):
        stages = runtimes[name]["stages"]
        assert set(stages) == set(STAGE_KEYS), (name, stages)
        assert all(s["median_ms"] > 0 and 0 < s["min_ms"] <= s["median_ms"] for s in stages.values()), (name, stages)
    assert runtimes["torch-compile"]["compile_warmup_s"] > 0 and runtimes["torch-compile"]["compile"]["warmup_size"] == "64x64"
    assert runtimes["onnxruntime"]["components"] == {"vae_decoder": "onnxruntime"}  # the rehearsal exports the VAE decoder alone
    assert "onnx-only" in runtimes["tensorrt"]["skipped"]
    ratios = report["speedup_vs_torch"]
    assert set(ratios) == {"torch-compile", "onnxruntime"}
    for name, per_stage in ratios.items():
        assert set(per_stage) == set(STAGE_KEYS)
        for stage, ratio in per_stage.items():
            want = runtimes["torch"]["stages"][stage]["median_ms"] / runtimes[name]["stages"][stage]["median_ms"]
            assert ratio == pytest.approx(want, rel=1e-12), (name, stage)
