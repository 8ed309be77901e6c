"""Flux and SD3: export both components of the tiny pipelines, check the dynamic dims, validate
ONNX Runtime against the ORIGINAL diffusers forwards, then run the unmodified pipelines with the
transformer and VAE answered by ONNX Runtime and compare the images with pure PyTorch."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from omni_trt.compiler.export import check_dynamic_dims, sample_points, validate_onnx
from omni_trt.models import family_by_name
from omni_trt.models.base import Point
from omni_trt.runtime.engines import OnnxRuntimeEngine

FAMILIES = ("flux", "sd3")
# What text-to-image runs; the VAE encoder is checked on the session's build (test_vae_encoder.py).
COMPONENTS = ("transformer", "vae_decoder")
PROMPTS = ["a photo of a cat sitting on a red chair", "mountains at dawn, watercolor"]
# Dims that must come out of the exporter as ONNX dim_params (beyond what each spec declares).
EXPECTED_DYNAMIC = {
    "flux": {"hidden_states": {0, 1}, "img_rope_cos": {0}, "guidance": {0}},
    "sd3": {"hidden_states": {0, 2, 4}, "timestep": {0}},
}


@pytest.fixture(scope="module")
def exported(exported_onnx):
    """exported(family) -> ({component: onnx path}, {component: export seconds}), as the session build exported them."""

    def get(family: str):
        onnx = exported_onnx(family)
        for name in COMPONENTS:
            check_dynamic_dims(family_by_name(family).components[name], onnx[name].dynamic_inputs)
        return {n: onnx[n].path for n in COMPONENTS}, {n: onnx[n].seconds for n in COMPONENTS}

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_export_validates_at_several_shapes(family, tiny_pipeline, exported):
    fam, pipe = family_by_name(family), tiny_pipeline(family)
    paths, seconds = exported(family)
    from omni_trt.compiler.export import onnx_input_dims

    dims = onnx_input_dims(paths["transformer"])
    for name, axes in EXPECTED_DYNAMIC[family].items():
        assert all(isinstance(dims[name][a], str) for a in axes), (name, dims[name])
    # Text length is fixed for both families (always padded), so it must not be a dim_param.
    assert isinstance(dims["encoder_hidden_states"][1], int)
    assert dims["encoder_hidden_states"][1] == fam.text_len[1]

    # The export points plus a batch-1 point at another size, all at the family's text length.
    points = sample_points(fam) + (Point(batch=1, height=64, width=128, text_len=fam.text_len[1]),)
    if family == "sd3":  # the whole position table: where torch.export's 2*Dim version bakes a guard
        side = 16 * pipe.transformer.config.pos_embed_max_size
        points += (Point(batch=1, height=side, width=side, text_len=fam.text_len[1]),)
    for name in COMPONENTS:
        module = getattr(pipe, fam.components[name].pipeline_attr)
        pts = points if name == "transformer" else points[:3]
        errors = validate_onnx(fam, name, module, paths[name], points=pts)
        assert len(errors) == len(pts)
        assert max(errors.values()) < 1e-4, errors
        print(f"{family} {name}: export {seconds[name]:.1f}s, worst rel err {max(errors.values()):.2e}")


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_shapes_match_reference_inputs(family, tiny_pipeline):
    """TensorSpec.shape (used for engine profiles) must agree with what reference_case feeds."""
    import importlib

    fam, pipe = family_by_name(family), tiny_pipeline(family)
    module = pipe.transformer
    spec = importlib.import_module(f"omni_trt.models.{family.replace('-', '_')}.transformer").transformer_spec(
        dict(module.config)
    )
    point = sample_points(fam)[1]
    case = spec.reference_case(module, point, torch.float32, torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in case.inputs.items()} == spec.shapes(point)
    assert tuple(case.expected["sample"].shape) == tuple(spec.outputs[0].shape(point))
    assert all(case.inputs[t.name].dtype == torch.float32 for t in spec.inputs)


class Recording:
    """An engine that remembers the shapes it was fed."""

    def __init__(self, engine: OnnxRuntimeEngine) -> None:
        self.engine, self.calls = engine, []
        self.input_names, self.output_names = engine.input_names, engine.output_names

    def __call__(self, feeds):
        self.calls.append({k: tuple(v.shape) for k, v in feeds.items()})
        return self.engine(feeds)


CALLS = {
    # Flux: guidance is embedded (no CFG batch); true CFG is a second call with the negative prompt.
    "flux": dict(guidance_scale=3.5, negative_prompt=["blurry", "dark"], true_cfg_scale=2.0),
    # SD3: guidance > 1 doubles the transformer batch (CFG as one batch).
    "sd3": dict(guidance_scale=4.0, negative_prompt=["blurry", "dark"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_with_onnx_engines_matches_torch(family, tiny_dir, tiny_pipeline, exported):
    from diffusers import DiffusionPipeline

    fam = family_by_name(family)
    paths, _ = exported(family)
    kwargs = dict(prompt=PROMPTS, height=64, width=64, num_inference_steps=2, output_type="np", **CALLS[family])

    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(7 + i) for i in range(len(PROMPTS))]
        return pipe(generator=generators, **kwargs).images

    reference = tiny_pipeline(family)
    want = generate(reference)

    transformer = Recording(OnnxRuntimeEngine(paths["transformer"]))
    standin = fam.components["transformer"].standin(dict(reference.transformer.config), transformer)
    vae = fam.components["vae_decoder"].standin(dict(reference.vae.config), OnnxRuntimeEngine(paths["vae_decoder"]))
    # As the runtime loads: stand-ins passed to from_pretrained (which type-checks them), so the
    # replaced weights are never read.
    pipe = DiffusionPipeline.from_pretrained(tiny_dir(family), transformer=standin, vae=vae)
    t0 = time.perf_counter()
    got = generate(pipe)
    print(f"{family}: ONNX Runtime pipeline {time.perf_counter() - t0:.2f}s")

    assert got.shape == want.shape == (len(PROMPTS), 64, 64, 3)
    diff = float(np.abs(got - want).max())
    print(f"{family}: max pixel diff {diff:.2e}")
    assert diff < 1 / 255, diff
    assert want.std() > 0.01  # a real image, not a constant the comparison could trivially match

    calls = transformer.calls
    steps = kwargs["num_inference_steps"]
    assert len(calls) == steps * (2 if family == "flux" else 1)  # Flux true CFG: two calls per step
    batch = fam.transformer_batch(len(PROMPTS), kwargs["guidance_scale"])
    assert all(c["encoder_hidden_states"][:2] == (batch, fam.text_len[1]) for c in calls), calls[0]
    if family == "flux":
        assert len(standin._rope) == 1  # RoPE tables computed once for this size and text length


def test_sd3_standin_rejects_what_the_original_rejects(tiny_pipeline):
    config = dict(tiny_pipeline("sd3").transformer.config)
    standin = family_by_name("sd3").components["transformer"].standin(config, engine=None)
    text, pooled = torch.zeros(1, 333, config["joint_attention_dim"]), torch.zeros(1, config["pooled_projection_dim"])
    with pytest.raises(ValueError, match="patch size"):
        standin(torch.zeros(1, 16, 7, 8), text, pooled, torch.ones(1))
    too_big = 2 * config["pos_embed_max_size"] + 2
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        standin(torch.zeros(1, 16, too_big, 8), text, pooled, torch.ones(1))
