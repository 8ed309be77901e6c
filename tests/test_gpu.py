"""TensorRT engines on a real GPU: built for this GPU, swapped into the pipeline, compared with
PyTorch. Skipped without CUDA and TensorRT; run on a GPU host (see ../shared/gpu/README.md):

    python3 -m pytest -q -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")), reason="needs tensorrt or tensorrt_rtx"
    ),
]


@pytest.fixture(scope="module")
def gpu_engines(tiny_dir, tmp_path_factory):
    from omni_trt.enginedir import trt_flavor
    from omni_trt.compiler.execute import build_engines

    gpu = trt_flavor.gpu()
    if not trt_flavor.TENSORRT.installed():
        supported = trt_flavor.supported_compute_capabilities(trt_flavor.TENSORRT_RTX)
        if gpu["compute_capability"] not in supported:
            pytest.skip(f"only TensorRT-RTX is installed and it cannot target {gpu['name']} "
                        f"(compute capability {gpu['compute_capability']}; it supports {', '.join(supported)})")
    model = tiny_dir("z-image")
    engine_dir = tmp_path_factory.mktemp("gpu-engines")
    # fp32 so the comparison with PyTorch measures the engine, not bf16 rounding.
    build_engines(str(model), engine_dir, target="auto", dtype="fp32", min_size="64x64", max_size="128x128", max_batch=2, opt_level=3)
    return model, engine_dir


def test_tensorrt_engines_match_torch_on_the_gpu(gpu_engines):
    from omni_trt.runtime.loader import load_runtime
    from omni_trt.runtime.pipeline import LoadOptions, load_pipeline
    from omni_trt.runtime.request import ImageAsk, resolve

    model, engine_dir = gpu_engines
    opts = LoadOptions(device="cuda", dtype="fp32")
    trt_rt = load_runtime(None, engine_dir, "tensorrt", opts)
    assert trt_rt.kind == "tensorrt"
    torch_rt = load_pipeline(str(model), opts)
    req = resolve(trt_rt.family, ImageAsk("a lighthouse at dusk", size="64x128", steps=2, n=2, seed=3))
    got = trt_rt.generate([req]).images[0]
    want = torch_rt.generate([req]).images[0]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        gap = np.abs(np.asarray(g, dtype=float) - np.asarray(w, dtype=float)).mean()
        assert gap < 1.0, f"mean pixel gap {gap:.3f} of 255 between TensorRT and torch"
