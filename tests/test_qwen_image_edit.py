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
def tiny(tmp_path_factory):
    from omni_trt.demo.qwen_image_edit import build_tiny

    out = tmp_path_factory.mktemp("tiny-qwen-image-edit")
    build_tiny(out)
    return out


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
