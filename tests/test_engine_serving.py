"""Engines swapped into the pipeline: build (real export, real TensorRT-RTX build) -> serve with
ONNX Runtime over the same exports -> images equal the torch runtime's, through the HTTP API."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from omni_trt.models import FAMILIES
from omni_trt.runtime.loader import EngineDirError, choose_runtime, load_runtime
from omni_trt.runtime.pipeline import load_pipeline
from omni_trt.runtime.request import ImageAsk, resolve
from serving import images, live_server

SIZE = {"size": "64x64", "num_inference_steps": 2}
# Per family: a request that exercises its CFG path (Qwen/Flux true CFG needs a negative prompt).
CFG = {
    "z-image": {"guidance_scale": 2.0, "negative_prompt": "blurry"},
    "qwen-image": {"true_cfg_scale": 3.0, "negative_prompt": "blurry"},
    "flux": {"true_cfg_scale": 2.0, "negative_prompt": "blurry"},
    "sd3": {"guidance_scale": 4.0},
    "flux2-klein": {"guidance_scale": 4.0},  # distilled: the pipeline ignores it (one call); the base variant's CFG is a second call
}


@pytest.fixture(scope="module")
def torch_runtimes(tiny_dir):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_pipeline(str(tiny_dir(family)))
        return cache[family]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnxruntime_engines_serve_the_same_images_as_torch(family, built, torch_runtimes):
    model, engine_dir, _ = built(family)
    rt = load_runtime(None, engine_dir, "onnxruntime")
    assert rt.kind == "onnxruntime" and set(rt.components) == {"transformer", "vae_decoder", "vae_encoder"}
    assert rt.edit_unavailable is None
    for attr in ("transformer", "vae"):
        module = getattr(rt.pipe, attr)
        assert type(module).__name__.endswith("StandIn") and not list(module.parameters()), "replaced weights must not be loaded"
    reference = torch_runtimes(family)
    with live_server(lambda: rt, served_model_name=family, max_batch_size=4) as live, live.client() as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["runtime"] == "onnxruntime" and card["engine_profile"]["transformer"]["max"]["width"] == 128
        if FAMILIES[family].edits.generations:
            _generations_equal_torch(c, family, reference)
        else:  # an edit-only family (Edits.generations False): a 400 that names the edits route
            for r in (c.post("/v1/images/generations", json={"prompt": "x", **SIZE}),
                      c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a house"}], "extra_body": SIZE})):
                assert r.status_code == 400 and "/v1/images/edits" in r.json()["error"]["message"], r.text
            # Its edits on these engines (several references, true CFG, through the OpenAI SDK) are its
            # own module's test: each of its calls costs seconds on CPU (references at ~1024x1024 area).
            return
        # Edits on the engines (VAE encoder included), image-to-image and inpainting, as torch makes them.
        source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        # A family editing through its own pipeline's `image` (Edits.references) takes no mask: its reference edit.
        for m in (None,) if FAMILIES[family].edits.references else (None, mask):
            files = [("image", ("a.png", _png(source)))]
            if m is not None:
                alpha = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
                alpha.putalpha(m.point(lambda v: 0 if v else 255))
                files.append(("mask", ("m.png", _png(alpha))))
            got = images(c.post("/v1/images/edits", data={"prompt": "a small red house", "size": "64x64", "num_inference_steps": "6",
                                                          "seed": "3"}, files=files))[0]
            want = reference.generate([resolve(reference.family, ImageAsk("a small red house", size="64x64", steps=6, seed=3), image=source,
                                               mask=m)]).images[0][0]
            gap = np.abs(got - np.asarray(want, dtype=float)).mean()
            assert gap < 1.0, f"{family} {'inpaint' if m else 'img2img'}: mean pixel gap {gap:.3f} of 255 between engines and torch"


def _generations_equal_torch(c, family: str, reference) -> None:
    """Generations on the engines (one of n=2, one with CFG) equal torch's; out-of-profile sizes and chat."""
    for extra in ({"n": 2, "seed": 7}, {"seed": 8, **CFG[family]}):
        body = {"prompt": "a small red house by a lake", **SIZE, **extra}
        got = images(c.post("/v1/images/generations", json=body))
        ask = ImageAsk(body["prompt"], size="64x64", steps=2, n=body.get("n", 1), seed=body["seed"], guidance_scale=extra.get("guidance_scale"),
                       true_cfg_scale=extra.get("true_cfg_scale"), negative_prompt=extra.get("negative_prompt"))
        want = reference.generate([resolve(reference.family, ask)]).images[0]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            gap = np.abs(g - np.asarray(w, dtype=float)).mean()
            assert gap < 1.0, f"{family}: mean pixel gap {gap:.3f} of 255 between engines and torch"
    r = c.post("/v1/images/generations", json={"prompt": "x", "size": "256x256"})
    assert r.status_code == 400 and "64..128" in r.json()["error"]["message"] and "engine profile" in r.json()["error"]["message"]
    chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a house"}], "extra_body": SIZE})
    assert chat.status_code == 200


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_requests_beyond_the_engine_batch_are_chunked_with_the_same_images(built, torch_runtimes):
    _, engine_dir, _ = built("z-image")
    rt = load_runtime(None, engine_dir, "onnxruntime")
    # max batch 2 images: the transformer profile goes to 4 so CFG (batch doubled) still takes 2.
    assert rt.swap.batch_limits == {"transformer": 4, "vae_decoder": 2, "vae_encoder": 2}
    assert rt.max_images(0.0) == 2 and rt.max_images(3.0) == 2
    req = resolve(rt.family, ImageAsk("a boat", size="64x64", steps=2, n=5, seed=40))
    result = rt.generate([req])
    got = result.images[0]
    assert result.calls == [2, 2, 1]
    want = torch_runtimes("z-image").generate([req]).images[0]
    assert len(got) == 5
    for g, w in zip(got, want):
        assert np.abs(np.asarray(g, dtype=float) - np.asarray(w, dtype=float)).mean() < 1.0


def test_auto_runtime_without_a_gpu_is_onnxruntime_and_tensorrt_is_refused_with_reasons(built):
    _, engine_dir, _ = built("z-image")
    from omni_trt.enginedir import Manifest

    b = Manifest.read(engine_dir)
    installed = {"tensorrt": None, "tensorrt-rtx": "1.7.1.116"}
    kind, why = choose_runtime("auto", b, None, installed)
    assert kind == "onnxruntime" and "no CUDA GPU" in why
    with pytest.raises(EngineDirError, match="no CUDA GPU"):
        choose_runtime("tensorrt", b, None, installed)
    cc = b.components["transformer"].engine.compute_capabilities
    flavor_version = b.components["transformer"].engine.version
    on_target = {"name": "Some RTX", "compute_capability": cc[0]}
    assert choose_runtime("auto", b, on_target, {"tensorrt-rtx": flavor_version})[0] == "tensorrt"
    with pytest.raises(EngineDirError, match="this GPU .* is 9.0"):
        choose_runtime("tensorrt", b, {"name": "H100", "compute_capability": "9.0"}, {"tensorrt-rtx": flavor_version})
    with pytest.raises(EngineDirError, match="this machine has 0.1"):
        choose_runtime("tensorrt", b, on_target, {"tensorrt-rtx": "0.1"})


def test_mismatched_or_tampered_engine_dirs_are_refused_with_the_rebuild_command(built, tiny_dir, tmp_path):
    model, engine_dir, _ = built("z-image")
    with pytest.raises(EngineDirError, match=r"was built for .*omni build-engine"):
        load_runtime(str(tiny_dir("qwen-image")), engine_dir, "onnxruntime")
    copy = tmp_path / "copy"
    shutil.copytree(engine_dir, copy)
    onnx = copy / "onnx" / "vae_decoder.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(EngineDirError, match=r"vae_decoder.onnx: sha256 .* Rebuild: omni build-engine"):
        load_runtime(None, copy, "onnxruntime")
    # The CLI stops the start with that message and a non-zero exit.
    r = subprocess.run([sys.executable, "-m", "omni_trt", "serve", "--engine-dir", str(copy), "--runtime", "onnxruntime", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "sha256" in r.stderr and "omni build-engine" in r.stderr
    # A model whose config changed after the build.
    changed_model = tmp_path / "model"
    shutil.copytree(model, changed_model)
    cfg = changed_model / "vae" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "scaling_factor": 0.5}))
    other = tmp_path / "other"
    shutil.copytree(engine_dir, other)
    m = json.loads((other / "manifest.json").read_text())
    m["model"]["id"] = str(changed_model)
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineDirError, match="model changed since the engines were built"):
        load_runtime(None, other, "onnxruntime")
    # What a hub model is checked by (configs only, no weights downloaded): the same verdicts.
    from omni_trt.enginedir import Manifest

    typed = Manifest.model_validate(m)
    assert typed.model_mismatches(model, configs_only=True) == []
    assert [p.split(":")[0] for p in typed.model_mismatches(changed_model, configs_only=True)] == ["vae_decoder", "vae_encoder"]
    with pytest.raises(EngineDirError, match="not found: build engines with `omni build-engine"):
        load_runtime(None, tmp_path, "onnxruntime")


def test_generate_cli_with_engines(built, tmp_path):
    _, engine_dir, _ = built("z-image")
    out = tmp_path / "e.png"
    r = subprocess.run([sys.executable, "-m", "omni_trt", "generate", "--engine-dir", str(engine_dir), "--runtime", "onnxruntime",
                        "-p", "a cat", "--size", "64x128", "--steps", "2", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 128)
    r = subprocess.run([sys.executable, "-m", "omni_trt", "generate", "--engine-dir", str(engine_dir), "-p", "x", "--size", "512x512"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "engine profile" in r.stderr
