"""ONNX Runtime I/O binding: torch tensors bound by pointer, outputs handed back through DLPack.

On CPU the bound path runs over the same session as the numpy path, so its images must be the
same bit for bit; on CUDA (onnxruntime-gpu, marked gpu) the outputs stay on the GPU and match
the CPU session within the fp32 export tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_trt import ort
from omni_trt.runtime.engines import OnnxRuntimeEngine
from omni_trt.runtime.loader import load_runtime
from omni_trt.runtime.request import ImageAsk, resolve


def _engines(rt) -> list[OnnxRuntimeEngine]:
    return [getattr(rt.pipe, attr).engine.engine for attr in ("transformer", "vae")]


def _no_numpy_run(*args, **kwargs):
    raise AssertionError("the numpy path ran: I/O binding should have")


def test_io_binding_on_cpu_tensors_gives_the_numpy_paths_images(built, monkeypatch):
    _, engine_dir, _ = built("z-image")
    rt = load_runtime(None, engine_dir, "onnxruntime")
    engines = _engines(rt)
    assert [e.io_binding for e in engines] == [False, False], "the CPU path stays numpy by default"
    # CFG doubles the transformer batch: bool, float and int inputs, two images.
    req = resolve(rt.family, ImageAsk("a boat on a lake", size="64x128", steps=2, n=2, seed=11, guidance_scale=2.0))
    want = rt.generate([req]).images[0]
    for e in engines:
        e.io_binding = True
        monkeypatch.setattr(e.session, "run", _no_numpy_run)
    got = rt.generate([req]).images[0]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert np.array_equal(np.asarray(g), np.asarray(w)), "same session, same inputs: the bound path must match exactly"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not ort.has_cuda(), reason="needs onnxruntime-gpu (pip install 'omni-trt[ort-gpu]')")
def test_io_binding_on_cuda_keeps_tensors_on_the_gpu(built, monkeypatch):
    from omni_trt.compiler.export import relative_error
    from omni_trt.runtime.pipeline import LoadOptions, load_pipeline

    model, engine_dir, _ = built("z-image")  # fp32 exports: a build without a GPU
    onnx = engine_dir / "onnx" / "vae_decoder.onnx"
    cuda, cpu = OnnxRuntimeEngine(onnx, "cuda"), OnnxRuntimeEngine(onnx)
    assert cuda.io_binding and "CUDAExecutionProvider" in cuda.session.get_providers()
    monkeypatch.setattr(cuda.session, "run", _no_numpy_run)
    latent = torch.randn(2, 16, 8, 16, generator=torch.Generator().manual_seed(0))
    out = cuda({"latent": latent.cuda()})["image"]
    assert out.device.type == "cuda" and out.shape == (2, 3, 64, 128)
    assert relative_error(out.cpu(), cpu({"latent": latent})["image"]) < 1e-4  # the export gate's fp32 bound

    opts = LoadOptions(device="cuda", dtype="fp32")
    rt = load_runtime(None, engine_dir, "onnxruntime", opts)
    assert all(e.io_binding and e.device.type == "cuda" for e in _engines(rt))
    req = resolve(rt.family, ImageAsk("a lighthouse at dusk", size="64x128", steps=2, n=2, seed=3))
    got = rt.generate([req]).images[0]
    want = load_pipeline(str(model), opts).generate([req]).images[0]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        gap = np.abs(np.asarray(g, dtype=float) - np.asarray(w, dtype=float)).mean()
        assert gap < 1.0, f"mean pixel gap {gap:.3f} of 255 between ONNX Runtime CUDA and torch"
