"""Z-Image export: the transformer wrapper equals the original forward, both components export
with dynamic dims and match the original in ONNX Runtime, and the unmodified ZImagePipeline run
on ONNX stand-ins makes the same images as PyTorch."""

from __future__ import annotations

import pytest
import torch

from omni_trt.compiler.export import check_dynamic_dims, sample_points, validate_onnx
from omni_trt.models.base import Point
from omni_trt.models.z_image import FAMILY
from omni_trt.models.z_image.transformer import ZImagePrep, transformer_spec
from omni_trt.runtime.engines import OnnxRuntimeEngine

TOL = 1e-4  # fp32 relative error, ONNX vs the original forward


@pytest.fixture(scope="module")
def exported(tiny_pipeline, exported_onnx):
    """Both components as the session build exported them: name -> (ExportResult, module)."""
    pipe, onnx = tiny_pipeline("z-image"), exported_onnx("z-image")
    return {name: (onnx[name], getattr(pipe, FAMILY.components[name].pipeline_attr)) for name in ("transformer", "vae_decoder")}


def _tiny_spec(config) -> object:
    return transformer_spec(dict(config))  # the tiny model's static feature dims


def test_transformer_export_dynamic_and_matches_original(exported):
    result, module = exported["transformer"]
    spec = FAMILY.components["transformer"]
    check_dynamic_dims(spec, result.dynamic_inputs)
    # Each dynamic dim kept its own name: torch.export merges equal-valued dims otherwise.
    assert result.dynamic_inputs["img_tokens"][:2] == ["batch", "image_tokens"]
    assert result.dynamic_inputs["cap_feats"][:2] == ["batch", "text_len"]
    assert result.dynamic_inputs["cap_rope"][0] == "text_len"
    # Sample points (captions of different lengths with batch padding), batch 1 with no image
    # padding (128x128 = 64 tokens), and image tokens equal to caption tokens.
    points = (*sample_points(FAMILY), Point(1, 128, 128, 32), Point(2, 128, 64, 32))
    errors = validate_onnx(FAMILY, "transformer", module, result.path, points=points)
    assert len(errors) == len(points)
    assert max(errors.values()) < TOL, errors


def test_vae_decoder_export_dynamic_and_matches_original(exported):
    result, module = exported["vae_decoder"]
    check_dynamic_dims(FAMILY.components["vae_decoder"], result.dynamic_inputs)
    errors = validate_onnx(FAMILY, "vae_decoder", module, result.path)
    assert max(errors.values()) < TOL, errors


def test_spec_shapes_describe_prep(tiny_pipeline):
    module = tiny_pipeline("z-image").transformer
    spec = _tiny_spec(module.config)
    for point in sample_points(FAMILY):
        case = spec.reference_case(module, point, torch.float32, torch.Generator().manual_seed(0))
        assert list(case.inputs) == list(spec.input_names)
        assert spec.shapes(point) == {k: tuple(v.shape) for k, v in case.inputs.items()}
        for t in spec.inputs:
            if t.dtype != "compute":
                assert case.inputs[t.name].dtype == getattr(torch, t.dtype), t.name
        (out,) = spec.outputs
        assert tuple(case.expected[out.name].shape) == out.shape(point)


def test_wrapper_equals_original_for_cfg_batch(tiny_pipeline):
    """A CFG batch as the pipeline makes it: 2 latents twice, one t, 2 prompts + 2 negatives of
    4 different lengths (padded: 64, 32, 96, 64 -> pad-to-32 rows and batch padding)."""
    module = tiny_pipeline("z-image").transformer.eval()
    cfg = module.config
    g = torch.Generator().manual_seed(3)
    latents = [torch.randn(cfg.in_channels, 1, 8, 12, generator=g) for _ in range(2)] * 2
    t = torch.full((4,), 0.37)
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in (40, 7, 70, 33)]
    with torch.no_grad():
        want = torch.stack(module(list(latents), t, list(caps), return_dict=False)[0])
        spec = _tiny_spec(cfg)
        prep = ZImagePrep(cfg)
        feeds = prep(latents, t, caps)
        assert feeds["cap_mask"].sum(1).tolist() == [64, 32, 96, 64]
        assert feeds["cap_pad"].sum(1).tolist() == [24, 25, 26, 31]
        got = spec.wrapper(module)(*(feeds[n] for n in spec.input_names))
        got = prep.unpatchify(got, (1, 8, 12))
        # The wrapper swaps attention processors only while it runs.
        again = torch.stack(module(list(latents), t, list(caps), return_dict=False)[0])
    assert got.shape == want.shape == (4, cfg.in_channels, 1, 8, 12)
    assert torch.equal(again, want)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


class _Recorder:
    """An engine that remembers the caption masks it was fed (transformer) and its calls."""

    def __init__(self, engine: OnnxRuntimeEngine) -> None:
        self.engine, self.calls = engine, []
        self.input_names, self.output_names = engine.input_names, engine.output_names

    def __call__(self, feeds):
        if "cap_mask" in feeds:
            self.calls.append(feeds["cap_mask"].sum(1).tolist())
        return self.engine(feeds)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_pipeline_on_onnx_standins_matches_torch(exported, tiny_pipeline, guidance):
    ref = tiny_pipeline("z-image")
    pipe = tiny_pipeline("z-image")
    engines = {}
    for name in ("transformer", "vae_decoder"):
        spec = FAMILY.components[name]
        original = getattr(pipe, spec.pipeline_attr)
        engines[name] = _Recorder(OnnxRuntimeEngine(exported[name][0].path))
        setattr(pipe, spec.pipeline_attr, spec.standin(dict(original.config), engines[name]))

    prompts = [
        "a cat",
        "a watercolor painting of mountains at dawn with soft light, a bowl of fruit on a wooden "
        "table, an astronaut riding a horse on the moon, highly detailed studio lighting",
    ]
    kwargs = dict(height=48, width=64, num_inference_steps=2, guidance_scale=guidance, output_type="np")
    if guidance > 0:
        kwargs["negative_prompt"] = ["blurry", "low quality, bad anatomy"]

    def run(p):
        # The pipeline writes templated text back into the prompt lists: give each run copies.
        args = dict(kwargs)
        if "negative_prompt" in args:
            args["negative_prompt"] = list(args["negative_prompt"])
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return p(prompt=list(prompts), generator=gens, **args).images

    want, got = run(ref), run(pipe)
    assert got.shape == want.shape == (2, 48, 64, 3)
    calls = engines["transformer"].calls
    assert len(calls) == 2 and len(calls[0]) == (4 if guidance > 0 else 2)
    assert len(set(calls[0])) > 1, f"captions should differ after padding to 32: {calls[0]}"
    assert pipe.transformer.prep.layout.cache_info().hits >= 1  # step 2 reuses step 1's prep
    assert float(abs(got - want).max()) < 1 / 255
