"""The VAE encoder, the third engine component (for edits): the session's builds (export, dynamic
dims, validation at two shapes, TensorRT-RTX: test_build.py) checked again at other shapes, the one
VAE stand-in's encode on ONNX Runtime against torch's, diffusers' Img2Img and Inpaint pipelines
built with from_pipe over the engines against the same pipelines over torch, and an engine dir
built without the encoder."""

from __future__ import annotations

import inspect
import json
import shlex
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from omni_trt.cli import main as omni_main
from omni_trt.compiler import execute
from omni_trt.compiler.export import relative_error, validate_onnx
from omni_trt.enginedir import Manifest, PointEntry, manifest_path, onnx_relpath, plan_relpath
from omni_trt.errors import ComponentNotBuilt, EngineDirError
from omni_trt.models import FAMILIES
from omni_trt.models.base import EDIT_TASKS, REFERENCE_TASK, Point
from omni_trt.runtime.edits import edit_pipeline
from omni_trt.runtime.loader import load_runtime
from omni_trt.runtime.pipeline import load_pipeline
from omni_trt.runtime.request import ImageAsk, resolve

TOL = 1e-4  # fp32 relative error: ONNX Runtime against the original diffusers forward
PROMPT = "a small red house by a lake"


def _image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """An input picture: a gradient with noise, different per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w)[None, :, None] * rng.random(3)[None, None, :]
    return Image.fromarray(np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype("uint8"))


def _mask() -> Image.Image:
    """diffusers' convention: white is repainted, black is kept."""
    return Image.fromarray(np.pad(np.full((32, 32), 255, "uint8"), 16))


def _pixels(family: str, batch: int, height: int, width: int) -> torch.Tensor:
    """What the edit pipelines pass to vae.encode: pixels in [-1, 1], in the spec's layout
    (Qwen-Image's has a frame axis); where the pipeline resizes its references itself
    (Edits.reference_sizes), at the smallest the session build's sizes (conftest.BUILD_ARGS) give."""
    fam, point = FAMILIES[family], Point(batch, height, width, 1)
    if fam.edits.reference_sizes:
        (w, h), _, _ = fam.edits.reference_sizes((64, 64), (128, 128))
        point = replace(point, reference_height=h, reference_width=w)
    shape = fam.components["vae_encoder"].shapes(point)["image"]
    return torch.rand(shape, generator=torch.Generator().manual_seed(height + width)) * 2 - 1


@pytest.fixture(scope="module")
def runtimes(built, tiny_dir):
    """runtimes(family) -> (the session's engines on ONNX Runtime, the same model on torch)."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            _, engine_dir, _ = built(family)
            cache[family] = (load_runtime(None, engine_dir, "onnxruntime"), load_pipeline(str(tiny_dir(family))))
        return cache[family]

    return get


def test_families_name_diffusers_edit_pipelines_that_take_the_text_to_image_modules():
    for fam in FAMILIES.values():
        if fam.edits.references:  # it edits through its own pipeline's `image` argument, no edit pipeline
            assert "image" in inspect.signature(getattr(diffusers, fam.pipeline_class).__call__).parameters
            assert fam.edits.pipeline_class(REFERENCE_TASK) is None
            continue
        t2i = set(inspect.signature(getattr(diffusers, fam.pipeline_class).__init__).parameters) - {"self"}
        for task in EDIT_TASKS:
            cls = getattr(diffusers, fam.edits.pipeline_class(task))
            required = {k for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self" and p.default is p.empty}
            assert required <= t2i, (cls.__name__, required - t2i)  # from_pipe finds every module it needs
            # The declared default is the pipeline's own.
            assert inspect.signature(cls.__call__).parameters["strength"].default == fam.edits.strength(task)
    with pytest.raises(ValueError, match="img2img, inpaint"):
        FAMILIES["flux"].edits.pipeline_class("outpaint")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_encoder_onnx_matches_diffusers_at_other_shapes(family, built, runtimes):
    """The build validated two sample points; here batch 1 at the profile's largest side and a
    batch of 2 of another aspect, against the ORIGINAL vae.encode."""
    _, engine_dir, _ = built(family)
    points = (Point(1, 64, 128, 1), Point(2, 128, 80, 1))
    vae = runtimes(family)[1].pipe.vae  # the torch runtime's: the original module
    errors = validate_onnx(FAMILIES[family], "vae_encoder", vae, engine_dir / onnx_relpath("vae_encoder"), points=points)
    assert len(errors) == 2 * len(points)  # mean and logvar at each point
    assert max(errors.values()) < TOL, errors


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_standin_encode_on_onnxruntime_equals_torch(family, runtimes):
    ort_rt, torch_rt = runtimes(family)
    vae = ort_rt.pipe.vae
    assert type(vae).__name__.endswith("StandIn") and not list(vae.parameters())
    x = _pixels(family, 2, 64, 96)
    if FAMILIES[family].edits.references:
        # Its stand-in carries the pipeline's latent normalisation in the engine (FLUX.2's batch-norm
        # statistics are weights): what the pipeline makes of an encode is what must be equal.
        with torch.inference_mode():
            got, want = (rt.pipe._encode_vae_image(x, torch.Generator().manual_seed(5)) for rt in (ort_rt, torch_rt))
        assert relative_error(got, want) < TOL
        return
    with torch.inference_mode():
        got, want = vae.encode(x).latent_dist, torch_rt.pipe.vae.encode(x).latent_dist
        for name in ("mean", "logvar", "std"):
            assert relative_error(getattr(got, name), getattr(want, name)) < TOL, name
        # Sampling stays on the host: the same generator draws the same latents.
        samples = [d.sample(torch.Generator().manual_seed(5)) for d in (got, want)]
        assert relative_error(*samples) < TOL
        assert relative_error(got.mode(), want.mode()) < TOL


def _edit(pipe, family: str, task: str, image: Image.Image) -> np.ndarray:
    """One edit of `image`. 4 steps: at strength 0.6 the last 2 run, from a partly noised image (with
    2 steps the first would start at pure noise, and the input would not matter)."""
    fam = FAMILIES[family]
    kwargs = dict(prompt=PROMPT, image=image, height=64, width=64,
                  num_inference_steps=4, generator=[torch.Generator().manual_seed(11)], output_type="np")
    if task != REFERENCE_TASK:  # a reference edit takes the image whole, no strength
        kwargs["strength"] = fam.edits.strength(task)
    if task == "inpaint":
        kwargs["mask_image"] = _mask()
    if fam.defaults.guidance_scale is not None:
        kwargs["guidance_scale"] = fam.defaults.guidance_scale
    with torch.inference_mode():
        return pipe(**kwargs).images


class _Counting:
    """An engine that counts its calls."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, 0
        self.input_names, self.output_names = engine.input_names, engine.output_names

    def __call__(self, feeds):
        self.calls += 1
        return self.engine(feeds)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_edit_pipelines_from_pipe_share_the_engines_and_match_torch(family, runtimes, monkeypatch):
    ort_rt, torch_rt = runtimes(family)
    encoder = _Counting(ort_rt.pipe.vae.encoder_engine)
    monkeypatch.setattr(ort_rt.pipe.vae, "encoder_engine", encoder)
    assert ort_rt.edit_unavailable is None and torch_rt.edit_unavailable is None
    dtypes = {k: m.dtype for k, m in ort_rt.pipe.components.items() if isinstance(m, torch.nn.Module)}
    fam = FAMILIES[family]
    for task in (REFERENCE_TASK,) if fam.edits.references else EDIT_TASKS:
        pipes = {}
        for rt in (ort_rt, torch_rt):
            pipe = edit_pipeline(rt.pipe, rt.family, rt.dtype, task)
            assert type(pipe).__name__ == (fam.edits.pipeline_class(task) or fam.pipeline_class)
            modules = {k: v for k, v in pipe.components.items() if v is not None}
            # The same objects, stand-ins included: nothing was loaded or copied a second time.
            assert {"transformer", "vae", "text_encoder"} <= set(modules)
            assert all(v is rt.pipe.components[k] for k, v in modules.items()), task
            pipes[rt.kind] = pipe
        calls = encoder.calls
        got = _edit(pipes["onnxruntime"], family, task, _image(1))
        assert encoder.calls > calls  # the image went through the encoder engine
        want = _edit(pipes["torch"], family, task, _image(1))
        assert got.shape == want.shape == (1, 64, 64, 3)
        gap = float(np.abs(got - want).mean()) * 255
        # Only meaningful if the input image reaches the pixels: another input moves them far more
        # than engines and torch differ (tiny Qwen-Image's latent normalisation damps it the most).
        effect = float(np.abs(_edit(pipes["onnxruntime"], family, task, _image(2)) - got).mean()) * 255
        print(f"{family} {task}: mean pixel gap {gap:.2e} of 255 (max {float(np.abs(got - want).max()) * 255:.2e}); "
              f"another input image moves them by {effect:.2e}")
        assert gap < 1.0, f"{family} {task}: engines and torch differ by {gap:.3f} of 255"
        assert effect > max(100 * gap, 1e-3), (effect, gap)
    # from_pipe casts the modules it shares; they keep their dtypes (the stand-ins their engines').
    assert {k: m.dtype for k, m in ort_rt.pipe.components.items() if isinstance(m, torch.nn.Module)} == dtypes


def _copy_without(engine_dir: Path, dst: Path, component: str) -> Path:
    """An engine dir as an older build (or --components without it) leaves it: no entry, no files."""
    shutil.copytree(engine_dir, dst)
    m = json.loads(manifest_path(dst).read_text())
    for rel in m["components"].pop(component)["onnx"]["files"] + [plan_relpath(component)]:
        m["files"].pop(rel)
        (dst / rel).unlink()
    manifest_path(dst).write_text(json.dumps(m))
    return dst


@pytest.mark.slow
def test_engine_dir_without_the_encoder_serves_generations_and_says_what_to_build(built, runtimes, tmp_path, monkeypatch):
    _, engine_dir, _ = built("z-image")
    _, torch_rt = runtimes("z-image")
    old = _copy_without(engine_dir, tmp_path / "t2i", "vae_encoder")
    rt = load_runtime(None, old, "onnxruntime")
    assert set(rt.components) == {"transformer", "vae_decoder"}
    message = rt.edit_unavailable
    assert message and f"--engine-dir {old} " in message and "--components vae_encoder" in message

    # Generations serve as before, on the engines.
    req = resolve(rt.family, ImageAsk("a boat", size="64x64", steps=2, n=1, seed=5))
    got, want = rt.generate([req]).images[0][0], torch_rt.generate([req]).images[0][0]
    assert np.abs(np.asarray(got, dtype=float) - np.asarray(want, dtype=float)).mean() < 1.0

    # Encoding, directly or inside diffusers' edit pipeline, refuses with the same message.
    with pytest.raises(ComponentNotBuilt) as e:
        rt.pipe.vae.encode(_pixels("z-image", 1, 64, 64))
    assert str(e.value) == message and e.value.status == 501
    with pytest.raises(ComponentNotBuilt, match="--components vae_encoder"):
        _edit(edit_pipeline(rt.pipe, rt.family, rt.dtype, "img2img"), "z-image", "img2img", _image(1))

    # The command it names plans to add the encoder, built as the decoder was, and nothing else
    # (planned, not run: the build itself is test_build.py's).
    argv = shlex.split(message.split("add it: ", 1)[1])
    assert argv[:2] == ["omni", "build-engine"]
    plans = []
    monkeypatch.setattr(execute, "run", lambda plan: plans.append(plan) or SimpleNamespace(engine_dir=plan.engine_dir))
    assert omni_main(argv[1:]) == 0
    (plan,) = plans
    assert plan.engine_dir == old and list(plan.components) == ["vae_encoder"] and set(plan.kept) == {"transformer", "vae_decoder"}
    encoder, decoder = plan.components["vae_encoder"], Manifest.read(old).components["vae_decoder"]
    assert encoder.action.export and encoder.action.build and not plan.stale_files
    assert [PointEntry.of(p) for p in encoder.points] == [decoder.points.min, decoder.points.opt, decoder.points.max]
    assert encoder.dtype == decoder.dtype and plan.opt_level == decoder.engine.opt_level
    assert plan.flavor.target == decoder.engine.flavor and encoder.engine_key["targets"] == decoder.engine.key["targets"]


@pytest.mark.slow
def test_encoder_without_its_decoder_is_refused_with_what_to_build(built, tmp_path):
    _, engine_dir, _ = built("z-image")
    odd = _copy_without(engine_dir, tmp_path / "odd", "vae_decoder")
    with pytest.raises(EngineDirError, match=r"has vae_encoder but not vae_decoder.*omni build-engine .* --components vae_decoder"):
        load_runtime(None, odd, "onnxruntime")
