"""Qwen-Image-Edit (QwenImageEditPlusPipeline) pieces: the family spec (edit-only, 1-3 references,
true CFG fields), the processor loaded through the family's own from_pretrained hook without
torchvision (real DiffusionPipeline.from_pretrained of a tiny random-weight folder), and the edit
transformer's export (zero_cond_t read from the config, reference tokens on the image-token axis)
validated on ONNX Runtime against diffusers' forward."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from omni_trt.models.base import FIELD_NEGATIVE_PROMPT, FIELD_TRUE_CFG, Point
from omni_trt.models.qwen_image_edit import FAMILY
from omni_trt.models.qwen_image_edit.transformer import is_reference, transformer_spec


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return tiny_dir(FAMILY.name)  # the session's, which `built` exports too


@pytest.fixture(scope="module")
def pipe(tiny):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(tiny, dtype=torch.float32, **FAMILY.load_replacements(str(tiny)))


def test_family_is_edit_only_with_up_to_three_references():
    assert FAMILY.pipeline_class == "QwenImageEditPlusPipeline"
    assert FAMILY.edits.generations is False and FAMILY.edits.references == 3
    assert FAMILY.fields == {FIELD_TRUE_CFG, FIELD_NEGATIVE_PROMPT} and FAMILY.cfg_batch_above is None
    assert FAMILY.defaults.true_cfg_scale == 4.0 and FAMILY.defaults.steps == 40


def test_reference_tokens_join_the_image_axis():
    spec = transformer_spec()  # the released 2511 dims
    shapes = spec.shapes(Point(1, 1024, 1024, 300, references=2))
    assert shapes["hidden_states"] == (1, 3 * 64 * 64, 64) and shapes["is_reference"] == (3 * 64 * 64,)
    assert shapes["encoder_hidden_states"] == (1, 300, 3584)
    mask = is_reference([[(1, 2, 3), (1, 4, 4), (1, 1, 2)]])
    assert mask.tolist() == [False] * 6 + [True] * 18


def test_processor_loads_without_torchvision_and_reads_every_image(tiny, pipe):
    index = json.loads((tiny / "model_index.json").read_text())
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"], "the published folder layout"
    assert type(pipe).__name__ == "QwenImageEditPlusPipeline"
    assert type(pipe.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert pipe.transformer.config.zero_cond_t is True
    images = [Image.fromarray(np.full((56, 84, 3), v, np.uint8)) for v in (10, 200)]
    ids = pipe.processor(text=["Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
                               "Picture 2: <|vision_start|><|image_pad|><|vision_end|>x"], images=images, return_tensors="pt")
    pad = pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = ids["image_grid_thw"]
    assert grid.shape == (2, 3) and int((ids["input_ids"] == pad).sum()) == int(grid.prod(-1).sum()) // 4
    assert pipe.text_encoder.config.image_token_id == pad


@pytest.mark.slow
def test_transformer_exports_and_matches_diffusers_with_references(pipe, tmp_path):
    from omni_trt.compiler.export import check_dynamic_dims, export_component, validate_onnx

    module = pipe.transformer
    family = replace(FAMILY, components={**FAMILY.components, "transformer": transformer_spec(dict(module.config))})
    assert family.sample_points[1].references == 1  # validation covers the reference tokens' t=0 modulation
    result = export_component(family, "transformer", module, tmp_path / "transformer.onnx")
    check_dynamic_dims(family.components["transformer"], result.dynamic_inputs)
    errors = validate_onnx(family, "transformer", module, result.path)
    assert len(errors) == 2 and max(errors.values()) < 1e-4, errors
    # The stand-in answers the pipeline's own call (img_shapes list: output, then two references of
    # other sizes; no mask; one timestep for the batch) from the engine, as diffusers' forward does.
    from omni_trt.runtime.engines import OnnxRuntimeEngine

    standin = family.components["transformer"].standin(dict(module.config), OnnxRuntimeEngine(result.path))
    g = torch.Generator().manual_seed(5)
    shapes = [[(1, 2, 3), (1, 4, 4), (1, 3, 2)]] * 2
    kwargs = dict(hidden_states=torch.randn(2, 6 + 16 + 6, 64, generator=g), encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
                  encoder_hidden_states_mask=None, timestep=torch.tensor([0.7, 0.7]), img_shapes=shapes, return_dict=False)
    with torch.no_grad():
        want = module(**kwargs)[0]
    got = standin(**kwargs)[0]
    assert (got - want).abs().max() / want.abs().max() < 1e-4


def test_wrapper_follows_zero_cond_t_from_the_config(pipe):
    """Both settings of the flag, same weights: the wrapper equals diffusers' forward, and the
    flag changes the output (the reference tokens' modulation reaches the generated tokens)."""
    from diffusers import QwenImageTransformer2DModel

    point = Point(batch=2, height=32, width=48, text_len=5, references=1)
    outputs = []
    for flag in (True, False):
        model = QwenImageTransformer2DModel(**{**dict(pipe.transformer.config), "zero_cond_t": flag}).eval()
        model.load_state_dict(pipe.transformer.state_dict())
        spec = transformer_spec(dict(model.config))
        case = spec.reference_case(model, point, torch.float32, torch.Generator().manual_seed(1))
        with torch.no_grad():
            got = spec.wrapper(model)(*(case.inputs[n] for n in spec.input_names))
        torch.testing.assert_close(got, case.expected["sample"], rtol=1e-4, atol=1e-5)
        outputs.append(got)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


def test_real_shape_config_is_the_20b_edit_transformer_on_meta():
    from diffusers import QwenImageTransformer2DModel

    from omni_trt.demo.qwen_image_edit import TRANSFORMER_CONFIG

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG)
    assert model.config.zero_cond_t is True
    assert abs(sum(p.numel() for p in model.parameters()) / 20.4e9 - 1) < 0.01  # Qwen-Image's 20.4B
    shapes = FAMILY.components["transformer"].shapes(Point(1, 1024, 1024, 300, references=1))
    assert shapes["hidden_states"] == (1, 2 * 4096, 64) and shapes["is_reference"] == (2 * 4096,)


def test_the_runtime_loads_it_through_the_family_hook(tiny):
    """load_pipeline (what serve, generate and bench use) passes Family.load_replacements to
    from_pretrained: without it, diffusers' stock processor class would need torchvision."""
    from omni_trt.runtime.pipeline import LoadOptions, load_pipeline

    rt = load_pipeline(str(tiny), LoadOptions(device="cpu", dtype="fp32"), family=FAMILY)
    assert type(rt.pipe).__name__ == "QwenImageEditPlusPipeline"
    assert type(rt.pipe.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"


# ---- registered and served ----


def test_registered_with_its_call_limit_and_an_edit_warm_up():
    from PIL import Image as PILImage

    from omni_trt.models import FAMILIES, family_for_class
    from omni_trt.runtime.request import ImageAsk, edit_only_input, resolve

    assert FAMILIES[FAMILY.name] is FAMILY and family_for_class("QwenImageEditPlusPipeline") is FAMILY
    assert FAMILY.call_images == 1  # the pipeline refuses more than one prompt per call
    # torch-compile's warm-up and omni bench edit where others generate (a generation is refused).
    image = edit_only_input(FAMILY, "64x80")
    assert isinstance(image, PILImage.Image) and image.size == (64, 80)
    assert resolve(FAMILY, ImageAsk("x", steps=2), image=image).task == "reference"
    assert edit_only_input(FAMILIES["qwen-image"], "64x80") is None


def test_engine_profiles_cover_the_references_the_pipeline_makes():
    """The pipeline resizes every input image to about 1024x1024 area at its own aspect, whatever
    the output size: the VAE encoder's and the transformer's profiles cover that at every aspect an
    input fitted into the built sizes can have, as diffusers computes it."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE, calculate_dimensions

    from omni_trt.compiler.plan import profile_points
    from omni_trt.models import SizeLimits
    from omni_trt.models.qwen_image_edit import reference_size

    lo_size, hi_size = (256, 512), (1024, 1024)
    limits = SizeLimits(16, 64, 2048, min_width=256, max_width=1024, min_height=512, max_height=1024)
    points = {c: profile_points(FAMILY, c, (lo_size, (512, 512), hi_size), 1, (1, 256, 1024)) for c in FAMILY.components}
    enc = FAMILY.components["vae_encoder"].profile(*points["vae_encoder"])["image"]
    trf = FAMILY.components["transformer"].profile(*points["transformer"])["hidden_states"]
    assert enc[1] == (1, 3, 1, 1024, 1024) and trf[1][1] == 32 * 32 + 64 * 64  # opt: one square reference
    for w, h in ((5000, 100), (100, 5000), (640, 480), (64, 64), (1024, 333)):
        fw, fh = limits.fit(w, h)  # what check_references hands the pipeline
        rw, rh = calculate_dimensions(VAE_IMAGE_SIZE, fw / fh)
        assert reference_size(fw, fh) == (rw, rh)
        assert enc[0][3] <= rh <= enc[2][3] and enc[0][4] <= rw <= enc[2][4], (w, h)
        assert 64 * 64 + 3 * (rw // 16) * (rh // 16) <= trf[2][1]

    # One static shape cannot hold references of each input's own size: refused, naming the flag.
    from omni_trt.errors import UsageError

    with pytest.raises(UsageError, match="without --static") as e:
        profile_points(FAMILY, "transformer", (lo_size, (512, 512), hi_size), 1, (1, 256, 1024), static=True)
    assert e.value.param == "--static"


@pytest.fixture(scope="module")
def engines(built):
    from omni_trt.runtime.loader import load_runtime

    return load_runtime(None, built(FAMILY.name)[1], "onnxruntime")


def test_edits_on_onnxruntime_engines_through_the_sdk_equal_torch(engines, tiny):
    """A real server on the ONNX Runtime engines, the OpenAI SDK: /v1/models shows the family, a
    generation is a 400 naming the edits route, and an edit with true CFG equals the torch pipeline's
    within the export bound. One input image: each costs ~5 s of VAE encoding per call on CPU (at
    the pipeline's ~1024x1024 area); two references through the engine are checked by
    test_transformer_exports_and_matches_diffusers_with_references."""
    import openai

    from omni_trt.runtime.pipeline import load_pipeline
    from omni_trt.runtime.request import ImageAsk, edit_inputs, resolve
    from serving import live_server
    from test_edits import noise, png
    from test_server import decode

    a = noise(1, (80, 64))
    extra = {"num_inference_steps": 2, "seed": 3, "negative_prompt": "blurry", "true_cfg_scale": 4.0}
    with live_server(lambda: engines, served_model_name="tiny-qie") as live, live.client() as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["family"] == FAMILY.name and card["runtime"] == "onnxruntime" and card["max_batch"] == 1
        sdk = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.images.generate(model="tiny-qie", prompt="a red fox", size="64x64")
        assert refused.value.status_code == 400 and "/v1/images/edits" in str(refused.value)
        res = sdk.images.edit(model="tiny-qie", image=("a.png", png(a)), prompt="a red fox",
                              size="64x64", extra_body=extra)
    got = decode(res.data[0].b64_json)
    torch_rt = load_pipeline(str(tiny))
    [(refs, _)] = edit_inputs(FAMILY, [(a, None)])
    ask = ImageAsk("a red fox", size="64x64", steps=2, seed=3, negative_prompt="blurry", true_cfg_scale=4.0)
    want = np.asarray(torch_rt.generate([resolve(FAMILY, ask, image=refs)]).images[0][0], dtype=float)
    assert got.shape == (64, 64, 3)
    gap = np.abs(got - want).mean()
    assert gap < 1.0, f"mean pixel gap {gap:.3f} of 255 between the engines and torch"
