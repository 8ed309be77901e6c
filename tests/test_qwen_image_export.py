"""Qwen-Image: ONNX export of the transformer and VAE decoder, validation against the original
diffusers forward, and the stand-ins inside the unmodified pipeline against pure PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pytest
import torch

from omni_trt.compiler.export import check_dynamic_dims, relative_error, sample_points, validate_onnx
from omni_trt.models.base import ComponentSpec, Point
from omni_trt.models.qwen_image import FAMILY
from omni_trt.models.qwen_image.transformer import transformer_spec
from omni_trt.models.qwen_image.vae import vae_decoder_spec
from omni_trt.runtime.engines import OnnxRuntimeEngine

TOL = 1e-4  # fp32 relative error gate
PROMPTS = ["a cat", "a photo of a dog sitting on a red chair"]  # different lengths: a text mask
# What text-to-image runs; the VAE encoder is checked on the session's build (test_vae_encoder.py).
COMPONENTS = ("transformer", "vae_decoder")


class TorchEngine:
    """The wrapper module behind the Engine interface: checks the stand-in without ONNX."""

    def __init__(self, module: torch.nn.Module, spec: ComponentSpec) -> None:
        self.module, self.input_names, self.output_names = module, spec.input_names, spec.output_names

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {self.output_names[0]: self.module(*(feeds[n] for n in self.input_names))}


@pytest.fixture(scope="module")
def exported(tiny_pipeline, exported_onnx) -> tuple[object, dict[str, Path], dict[str, float]]:
    """The tiny pipeline, its two components as the session build exported them, and the export seconds."""
    pipe, onnx = tiny_pipeline("qwen-image"), exported_onnx("qwen-image")
    for name in COMPONENTS:
        check_dynamic_dims(FAMILY.components[name], onnx[name].dynamic_inputs)
    return pipe, {n: onnx[n].path for n in COMPONENTS}, {n: onnx[n].seconds for n in COMPONENTS}


def _spec_for(name: str, module: torch.nn.Module) -> ComponentSpec:
    return {"transformer": transformer_spec, "vae_decoder": vae_decoder_spec}[name](dict(module.config))


@pytest.mark.parametrize("name", COMPONENTS)
def test_export_validates_at_several_shapes(exported, name):
    pipe, paths, _ = exported
    module = getattr(pipe, FAMILY.components[name].pipeline_attr)
    # The two export sample points, plus batch 1 with a one-token prompt (the profile minimum).
    points = (*sample_points(FAMILY), Point(batch=1, height=32, width=96, text_len=1))
    errors = validate_onnx(FAMILY, name, module, paths[name], points=points)
    assert len(errors) == len(points)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("name", COMPONENTS)
def test_spec_shapes_match_the_model(exported, name):
    """The TensorSpec shape arithmetic (used for engine profiles) agrees with what the model takes."""
    pipe, _, _ = exported
    module = getattr(pipe, FAMILY.components[name].pipeline_attr)
    spec = _spec_for(name, module)
    point = Point(batch=2, height=64, width=112, text_len=5)
    case = spec.reference_case(module, point, torch.float32, torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in case.inputs.items()} == spec.shapes(point)
    assert {k: tuple(v.shape) for k, v in case.expected.items()} == {t.name: t.shape(point) for t in spec.outputs}
    assert case.inputs.keys() == set(spec.input_names)


@pytest.mark.parametrize("engine_kind", ["torch", "onnx"])
def test_transformer_standin_broadcasts_text_batch(exported, engine_kind):
    """A single negative prompt for two images: text batch 1, image batch 2, mask None (all ones).
    PyTorch broadcasts; the stand-in must expand on the host and still match."""
    pipe, paths, _ = exported
    model = pipe.transformer
    spec = FAMILY.components["transformer"]
    if engine_kind == "torch":
        engine = TorchEngine(spec.wrapper(model), spec)
    else:
        engine = OnnxRuntimeEngine(paths["transformer"])
    standin = spec.standin(dict(model.config), engine)
    g = torch.Generator().manual_seed(3)
    rows, cols, t = 4, 3, 6
    kwargs = dict(
        hidden_states=torch.randn(2, rows * cols, model.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, t, model.config.joint_attention_dim, generator=g),
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([0.7, 0.7]),
        img_shapes=[[(1, rows, cols)]] * 2,
        guidance=None,
        attention_kwargs={},
        return_dict=False,
    )
    with torch.no_grad():
        want = model(**kwargs)[0]
        got = standin(**kwargs)[0]
        got_dict = standin(**{**kwargs, "return_dict": True}).sample
    assert got.shape == want.shape == (2, rows * cols, 4 * model.config.out_channels)
    assert relative_error(got, want) < TOL
    assert torch.equal(got, got_dict)
    assert len(standin._rope) == 1  # RoPE prepared once per (size, text length)


def _generate(pipe, negative_prompt: str | None, output_type: str = "np"):
    generators = [torch.Generator().manual_seed(s) for s in (11, 12)]
    return pipe(
        list(PROMPTS),
        negative_prompt=negative_prompt,
        true_cfg_scale=4.0,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=generators,
        output_type=output_type,
    ).images


def test_pipeline_with_onnx_engines_matches_torch(exported, tiny_pipeline):
    torch_pipe, paths, _ = exported
    pipe = tiny_pipeline("qwen-image")
    for name in COMPONENTS:
        spec = FAMILY.components[name]
        module = getattr(pipe, spec.pipeline_attr)
        setattr(pipe, spec.pipeline_attr, spec.standin(dict(module.config), OnnxRuntimeEngine(paths[name])))
    assert not any(p.numel() for p in pipe.transformer.parameters())
    for p in (pipe, torch_pipe):
        p.set_progress_bar_config(disable=True)

    images = {}
    for negative in (None, "blurry, low quality"):  # without and with true CFG (a second call)
        want = _generate(torch_pipe, negative)
        got = _generate(pipe, negative)
        assert got.shape == want.shape == (2, 64, 64, 3)
        assert np.abs(got - want).max() < 1 / 255, negative
        images[negative] = want
    # The comparison is only meaningful if the transformer and the negative prompt reach the pixels.
    assert np.abs(images[None] - images["blurry, low quality"]).max() > 1e-3
    assert np.abs(images[None][0] - images[None][1]).max() > 1e-2
