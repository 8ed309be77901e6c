"""LoRA adapters on engines: the export's weight-name map in the manifest, ONNX Runtime sessions
with merged initializers (images match torch's with the same adapters, within the export bound
the engine-serving tests use), the LRU of sessions, TensorRT --refittable builds (on CPU with
TensorRT-RTX), the refusal of a non-refittable TensorRT dir, and the refit itself on a GPU."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

from serving import images, live_server

SIZE = {"size": "64x64", "num_inference_steps": 2}
# The engine-serving tests' bound between fp32 ONNX engines and torch: mean pixel gap of 255.
MEAN_GAP = 1.0


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    import torch
    from diffusers import DiffusionPipeline

    from omni_trt.demo.lora import make_adapter

    root = tmp_path_factory.mktemp("engine-loras")
    pipe = DiffusionPipeline.from_pretrained(tiny_dir("z-image"), dtype=torch.float32)
    make_adapter(pipe, root / "a", seed=11)
    make_adapter(pipe, root / "b", seed=12, rank=2, targets=("to_q", "to_v", "w2"))
    return root


def lora_options(root, **kw):
    from omni_trt.runtime.pipeline import LoraOptions

    return LoraOptions((("a", str(root / "a")), ("b", str(root / "b"))), str(root), **kw)


@pytest.fixture(scope="module")
def torch_lora(tiny_dir, adapters):
    from omni_trt.runtime.pipeline import LoadOptions, load_pipeline

    return load_pipeline(str(tiny_dir("z-image")), LoadOptions(lora=lora_options(adapters)))


def test_the_manifest_maps_every_transformer_weight_to_an_initializer(built, tiny_pipeline):
    _, engine_dir, report = built("z-image")
    weights = report.manifest.components["transformer"].onnx.weights
    module = tiny_pipeline("z-image").transformer
    linear = {n for n, p in module.named_parameters() if p.ndim == 2}
    assert set(weights) == linear, sorted(linear - set(weights))[:5]
    assert any(w.transposed for w in weights.values())  # the exporter folds W.T into MatMul constants
    assert not report.manifest.components["vae_decoder"].onnx.weights


def test_onnxruntime_serves_adapters_as_torch_does(built, adapters, torch_lora):
    from omni_trt.runtime.loader import load_runtime
    from omni_trt.runtime.pipeline import LoadOptions
    from omni_trt.runtime.request import ImageAsk, resolve

    _, engine_dir, _ = built("z-image")
    rt = load_runtime(None, engine_dir, "onnxruntime", LoadOptions(lora=lora_options(adapters, max_sessions=1)))
    assert rt.adapters.kind == "onnxruntime session"
    base = resolve(rt.family, ImageAsk("a blue square", size="64x64", steps=2, seed=5))
    with live_server(lambda: rt, served_model_name="tiny-ort") as live, live.client() as c:
        for lora in ([], {"name": "a"}, [{"name": "b", "scale": -0.7}, {"name": "a", "scale": 0.5}], {"name": "a"}, None):
            got = images(c.post("/v1/images/generations", json={"prompt": "a blue square", "seed": 5, **SIZE, "lora": lora}))[0]
            key = () if not lora else (("a", 1.0),) if lora == {"name": "a"} else (("a", 0.5), ("b", -0.7))
            want = np.asarray(torch_lora.generate([dataclasses.replace(base, lora=key)]).images[0][0], dtype=float)
            gap = np.abs(got - want).mean()
            assert gap < MEAN_GAP, f"adapters {key}: mean pixel gap {gap:.3f} of 255 between onnxruntime and torch"
        plain = images(c.post("/v1/images/generations", json={"prompt": "a blue square", "seed": 5, **SIZE}))[0]
        with_a = images(c.post("/v1/images/generations", json={"prompt": "a blue square", "seed": 5, **SIZE, "model": "a"}))[0]
        assert np.abs(plain - with_a).mean() > MEAN_GAP  # the adapter's change is far above the engines' bound
        assert c.get("/health").json()["lora"]["applied_by"] == "onnxruntime session"
        metrics = c.get("/metrics").text
        assert "omni_lora_switches_total" in metrics
    # --max-lora-sessions 1: one merged session kept (the base one besides), the latest set's.
    assert rt.adapters.memory()["sessions"] == 1 and list(rt.adapters.sessions) == [(("a", 1.0),)]
    assert rt.adapters.memory()["merged_mb"] > 0


def test_a_non_refittable_tensorrt_dir_is_refused_with_the_rebuild_command(built):
    from omni_trt.enginedir import Manifest
    from omni_trt.runtime.loader import _lora_fields

    _, engine_dir, _ = built("z-image")
    m = Manifest.read(engine_dir)

    class Engine:
        engine = object()

    why = _lora_fields(m, engine_dir, "tensorrt", {"transformer": Engine()})["lora_unavailable"]
    assert f"rebuild: {m.rebuild_command(engine_dir)} --refittable --force" in why
    assert "lora_unavailable" not in _lora_fields(m, engine_dir, "onnxruntime", {"transformer": Engine()})


def test_refittable_builds_are_recorded_or_refused_where_they_cannot_be_made(tiny_dir, tmp_path):
    """TensorRT-RTX's CPU-only builder cannot compile a refittable network (Myelin needs CUDA): on a
    machine without a GPU --refittable is refused before anything is exported; with one, the
    manifest records it, the rebuild command keeps the flag and the same build is up to date."""
    from omni_trt.compiler.execute import build_engines
    from omni_trt.enginedir import trt_flavor
    from omni_trt.errors import UsageError

    args = dict(target="tensorrt-rtx", opt_level=0, min_size="64x64", max_size="64x64", max_batch=1, components="transformer",
                refittable=True, validate=False)
    if trt_flavor.gpu() is None:
        with pytest.raises(UsageError) as e:
            build_engines(str(tiny_dir("z-image")), tmp_path, **args)
        assert e.value.param == "--refittable" and "GPU" in e.value.message
        assert not list(tmp_path.iterdir())  # refused before anything was written
        return
    report = build_engines(str(tiny_dir("z-image")), tmp_path, **args)
    entry = report.manifest.components["transformer"]
    assert entry.engine.refittable and entry.engine.key["refittable"] is True and entry.onnx.weights
    assert "--refittable" in report.manifest.rebuild_command(tmp_path)
    assert build_engines(str(tiny_dir("z-image")), tmp_path, **args).manifest == report.manifest  # nothing redone


@pytest.mark.gpu
@pytest.mark.skipif(not importlib.util.find_spec("torch") or not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_tensorrt_refit_serves_adapters_as_torch_does(tiny_dir, adapters, tmp_path):
    """On a GPU: a refittable engine refit with each adapter set makes torch's image (fp32, the GPU
    tests' bound), and refit back to base makes the base image again: no weight (or GEMM bias,
    TensorRT 11.3's known kREFIT issue) is lost on the way."""
    from omni_trt.compiler.execute import build_engines
    from omni_trt.enginedir import trt_flavor
    from omni_trt.runtime.loader import load_runtime
    from omni_trt.runtime.pipeline import LoadOptions, load_pipeline
    from omni_trt.runtime.request import ImageAsk, resolve

    gpu = trt_flavor.gpu()
    if not trt_flavor.TENSORRT.installed() and gpu["compute_capability"] not in trt_flavor.supported_compute_capabilities(trt_flavor.TENSORRT_RTX):
        pytest.skip(f"only TensorRT-RTX is installed and it cannot target {gpu['name']} ({gpu['compute_capability']})")
    model = tiny_dir("z-image")
    build_engines(str(model), tmp_path, target="auto", dtype="fp32", min_size="64x64", max_size="128x128", max_batch=2,
                  refittable=True)
    opts = LoadOptions(device="cuda", dtype="fp32", lora=lora_options(adapters))
    trt_rt = load_runtime(None, tmp_path, "tensorrt", opts)
    torch_rt = load_pipeline(str(model), opts)
    req = resolve(trt_rt.family, ImageAsk("a lighthouse", size="64x64", steps=2, seed=3))
    first_base = None
    for key in ((), (("a", 1.0),), (("a", 0.5), ("b", -1.0)), ()):
        r = dataclasses.replace(req, lora=key)
        got = np.asarray(trt_rt.generate([r]).images[0][0], dtype=float)
        want = np.asarray(torch_rt.generate([r]).images[0][0], dtype=float)
        assert np.abs(got - want).mean() < MEAN_GAP, key
        if key == ():
            first_base = got if first_base is None else first_base
            assert np.abs(got - first_base).mean() < 1e-6, "refit back to base must give the base image"


def test_torch_compile_merges_in_place_without_recompiling(tiny_dir, adapters, torch_lora):
    """--runtime torch-compile: a switch copies the merged weights into the compiled modules'
    parameters, so the compiled graphs run on (dynamo's count of graphs does not move) and make
    torch's images with the same adapters (the torch-compile tests' bound against eager)."""
    import torch
    from torch._dynamo.utils import counters

    from omni_trt.runtime.loader import load_runtime
    from omni_trt.runtime.pipeline import LoadOptions
    from omni_trt.runtime.request import ImageAsk, resolve

    rt = load_runtime(str(tiny_dir("z-image")), None, "torch-compile", LoadOptions(warmup_size="64x64", lora=lora_options(adapters)))
    try:
        assert rt.adapters.kind == "in-place merge"
        req = resolve(rt.family, ImageAsk("a green triangle", size="64x64", steps=2, seed=9))
        rt.generate([req])
        graphs = counters["stats"]["unique_graphs"]
        for key in ((("a", 1.0),), (("a", 0.5), ("b", -0.7)), (), (("b", 1.0),)):
            r = dataclasses.replace(req, lora=key)
            got = np.asarray(rt.generate([r]).images[0][0], dtype=float)
            want = np.asarray(torch_lora.generate([r]).images[0][0], dtype=float)
            assert np.abs(got - want).mean() < MEAN_GAP, key
        assert counters["stats"]["unique_graphs"] == graphs, "an adapter switch recompiled"
        assert rt.adapters.switches == 4
    finally:
        torch._dynamo.reset()
