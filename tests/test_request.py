"""Pure functions: size parsing, family defaults, validation messages, batching kwargs, and each
rule `resolve` is made of (size, steps, strength and first step, cost, choices, edit inputs)."""

import numpy as np
import pytest
from PIL import Image

from omni_trt.errors import RequestError
from omni_trt.models import FAMILIES, SizeLimits, family_by_name, family_for_class, parse_size
from omni_trt.models.base import Point
from omni_trt.runtime.request import (
    QUALITIES,
    GenerationRequest,
    ImageAsk,
    RequestCaps,
    check_choice,
    check_cost,
    first_step,
    fit_inputs,
    pipeline_kwargs,
    resolve,
    resolve_size,
    resolve_steps,
    resolve_strength,
)

ZI = FAMILIES["z-image"]
QW = FAMILIES["qwen-image"]


@pytest.mark.parametrize("text,expected", [("1024x1024", (1024, 1024)), ("64x128", (64, 128)), (" 512x768 ", (512, 768))])
def test_parse_size_accepts_wxh(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["1024", "1024X1024", "x64", "64x", "axb", "0x64", "64x0", "-64x64", "64x64x64", "", "64.5x64"])
def test_parse_size_rejects_with_a_message_naming_size(text):
    with pytest.raises(RequestError) as e:
        parse_size(text)
    assert "size" in e.value.message and e.value.param == "size"


def test_check_size_says_what_is_allowed():
    limits = SizeLimits.of(ZI)
    limits.check(64, 1024)
    with pytest.raises(RequestError, match="multiples of 16"):
        limits.check(100, 64)
    with pytest.raises(RequestError, match=r"64\.\.2048"):
        limits.check(4096, 64)
    engine = SizeLimits(16, 64, 2048, min_width=64, max_width=512, min_height=64, max_height=256, source="engine profile")
    with pytest.raises(RequestError, match="height 64..256.*engine profile"):
        engine.check(128, 512)
    with pytest.raises(RequestError, match="--max-size 100x64") as e:
        limits.check(100, 64, "--max-size")
    assert e.value.param == "--max-size"


def test_defaults_differ_per_family_and_only_applicable_fields_pass():
    z = resolve(ZI, ImageAsk("a cat", seed=1))
    assert (z.width, z.height, z.steps, z.guidance_scale, z.true_cfg_scale) == (1024, 1024, 9, 0.0, None)
    z = resolve(ZI, ImageAsk("a cat", seed=1, true_cfg_scale=7.0, guidance_scale=2.0))
    assert z.true_cfg_scale is None and z.guidance_scale == 2.0
    q = resolve(QW, ImageAsk("a cat", seed=1, guidance_scale=3.0))
    assert (q.steps, q.true_cfg_scale, q.guidance_scale) == (50, 4.0, None)
    flux, sd3 = FAMILIES["flux"], FAMILIES["sd3"]
    assert resolve(flux, ImageAsk("a", seed=0)).guidance_scale == 3.5 and resolve(sd3, ImageAsk("a", seed=0)).steps == 28


def test_size_wins_over_width_and_height():
    r = resolve(ZI, ImageAsk("a", size="128x64", width=512, height=512, seed=0))
    assert (r.width, r.height) == (128, 64)
    r = resolve(ZI, ImageAsk("a", width=256, seed=0))
    assert (r.width, r.height) == (256, 1024)


@pytest.mark.parametrize(
    "kwargs,param,status",
    [
        (dict(n=0), "n", 422),
        (dict(n=11), "n", 422),
        (dict(steps=0), "num_inference_steps", 422),
        (dict(steps=201), "num_inference_steps", 422),
        (dict(guidance_scale=-1.0), "guidance_scale", 422),
        (dict(guidance_scale=20.5), "guidance_scale", 422),
        (dict(true_cfg_scale=21), "true_cfg_scale", 422),
        (dict(seed=-1), "seed", 422),
        (dict(output_format="gif"), "output_format", 422),
        (dict(width=-3), "size", 422),
        (dict(size="12x12"), "size", 400),
    ],
)
def test_validation_errors_name_the_field(kwargs, param, status):
    with pytest.raises(RequestError) as e:
        resolve(ZI, ImageAsk("a cat", **kwargs))
    assert e.value.param == param and e.value.status == status and e.value.message


def test_prompt_must_be_text():
    with pytest.raises(RequestError) as e:
        resolve(ZI, ImageAsk(42))  # type: ignore[arg-type]
    assert e.value.status == 422
    with pytest.raises(RequestError, match="empty"):
        resolve(ZI, ImageAsk("   "))


def test_random_seed_is_filled_and_image_seeds_follow_index():
    r = resolve(ZI, ImageAsk("a", n=3))
    assert isinstance(r.seed, int)
    assert GenerationRequest("a", 64, 64, 2, seed=10, n=3).image_seeds() == [10, 11, 12]


def test_pipeline_kwargs_repeats_prompts_per_image_and_gives_one_generator_each():
    a = resolve(QW, ImageAsk("first", size="64x64", n=2, seed=5, negative_prompt="blurry"))
    b = resolve(QW, ImageAsk("second", size="64x64", n=1, seed=9, negative_prompt="dark"))
    kw = pipeline_kwargs([a, b])
    assert kw["prompt"] == ["first", "first", "second"]
    assert kw["negative_prompt"] == ["blurry", "blurry", "dark"]
    assert [g.initial_seed() for g in kw["generator"]] == [5, 6, 9]
    assert kw["true_cfg_scale"] == 4.0 and "guidance_scale" not in kw


def test_incompatible_requests_have_different_batch_keys():
    a = resolve(ZI, ImageAsk("a", size="64x64", seed=1))
    assert a.batch_key() == resolve(ZI, ImageAsk("b", size="64x64", seed=2)).batch_key()
    assert a.batch_key() != resolve(ZI, ImageAsk("a", size="64x128", seed=1)).batch_key()
    assert a.batch_key() != resolve(ZI, ImageAsk("a", size="64x64", seed=1, steps=3)).batch_key()
    assert a.batch_key() != resolve(ZI, ImageAsk("a", size="64x64", seed=1, negative_prompt="x")).batch_key()


def test_family_lookup_errors_list_the_supported():
    with pytest.raises(ValueError) as e:
        family_for_class("StableDiffusionXLPipeline")
    for f in FAMILIES.values():
        assert f.pipeline_class in str(e.value)
    with pytest.raises(ValueError, match="z-image"):
        family_by_name("nope")


def test_transformer_batch_doubles_only_for_batched_cfg():
    assert ZI.transformer_batch(2, 0.0) == 2 and ZI.transformer_batch(2, 3.0) == 4
    assert FAMILIES["sd3"].transformer_batch(3, None) == 6 and FAMILIES["sd3"].transformer_batch(3, 1.0) == 3
    assert QW.transformer_batch(2, None) == 2 and FAMILIES["flux"].transformer_batch(2, 3.5) == 2


def test_profile_is_derived_from_the_point_shapes():
    spec = ZI.components["vae_decoder"]
    lo, hi = Point(1, 64, 128, 32), Point(4, 256, 512, 32)
    prof = spec.profile(lo, lo, hi)["latent"]
    assert prof[0] == (1, 16, 8, 16) and prof[2] == (4, 16, 32, 64)


# ---- the rules resolve() is made of, each on its own ----


def refusal(fn, *args) -> tuple[str | None, int]:
    """The (param, status) of the RequestError fn(*args) raises; its message must say something."""
    with pytest.raises(RequestError) as e:
        fn(*args)
    assert e.value.message
    return e.value.param, e.value.status


ZI_LIMITS = SizeLimits.of(ZI)
ENGINE = SizeLimits(16, 64, 2048, min_width=64, max_width=128, min_height=64, max_height=256, source="engine profile")


@pytest.mark.parametrize("size,width,height,expected", [
    (None, None, None, (1024, 1024)),  # the family's default
    ("auto", None, None, (1024, 1024)),
    ("128x64", 512, 512, (128, 64)),  # size wins over width/height
    (None, 256, None, (256, 1024)),  # the side not given is the default's
    (None, None, 96, (1024, 96)),
    (None, 64, 80, (64, 80)),
])
def test_resolve_size_values(size, width, height, expected):
    assert resolve_size(ZI, ZI_LIMITS, size, width, height) == expected


def test_resolve_size_of_an_edit_fits_the_input():
    wide = Image.new("RGB", (100, 80))
    assert resolve_size(ZI, ZI_LIMITS, None, None, None, wide) == (96, 80)  # rounded down to multiples of 16
    assert resolve_size(ZI, ZI_LIMITS, "auto", None, None, wide) == (96, 80)
    assert resolve_size(ZI, ZI_LIMITS, "64x64", None, None, wide) == (64, 64)  # an asked size wins
    assert resolve_size(ZI, ZI_LIMITS, None, 64, None, wide) == (64, 1024)  # so does a side: the other is the default
    assert resolve_size(ZI, ENGINE, None, None, None, Image.new("RGB", (1000, 1000))) == (128, 128)  # into the engines' range
    assert resolve_size(ZI, ZI_LIMITS, None, None, None, Image.new("RGB", (20, 40))) == (64, 128)  # scaled up, aspect kept


@pytest.mark.parametrize("limits,size,width,height,status", [
    (ZI_LIMITS, None, -3, None, 422),
    (ZI_LIMITS, None, None, 0, 422),
    (ZI_LIMITS, None, True, None, 422),
    (ZI_LIMITS, None, 64.0, None, 422),
    (ZI_LIMITS, None, "64", None, 422),
    (ZI_LIMITS, "12x12", None, None, 400),
    (ZI_LIMITS, "65x64", None, None, 400),
    (ZI_LIMITS, "64", None, None, 400),
    (ZI_LIMITS, None, 4096, None, 400),
    (ENGINE, None, None, None, 400),  # the family's 1024x1024 is outside the engine profile
    (ENGINE, "128x512", None, None, 400),
])
def test_resolve_size_refusals_name_size(limits, size, width, height, status):
    assert refusal(resolve_size, ZI, limits, size, width, height) == ("size", status)


@pytest.mark.parametrize("family,steps,quality,expected", [
    (ZI, None, "auto", 9), (ZI, None, "high", 9), (ZI, None, "medium", 6), (ZI, None, "low", 3),
    (QW, None, "auto", 50), (QW, None, "medium", 33), (QW, None, "low", 17),
    (ZI, 3, "high", 3), (ZI, 200, "low", 200), (QW, 1, "auto", 1),  # an explicit count wins over quality
])
def test_resolve_steps_values(family, steps, quality, expected):
    assert resolve_steps(family, steps, quality) == expected


def test_resolve_steps_is_at_least_one_for_every_quality():
    for family in FAMILIES.values():
        assert all(resolve_steps(family, None, q) >= 1 for q in QUALITIES)


@pytest.mark.parametrize("steps", [0, -1, 201, True, 2.0, "4"])
def test_resolve_steps_refusals_name_num_inference_steps(steps):
    assert refusal(resolve_steps, ZI, steps, "auto") == ("num_inference_steps", 422)


@pytest.mark.parametrize("steps,strength,expected", [
    (10, None, 0),  # a generation starts at the beginning
    (10, 1.0, 0),
    (10, 0.5, 5),
    (10, 0.25, 7),  # int(10 - 2.5)
    (9, 0.6, 3),  # int(9 - 5.4)
    (6, 0.6, 2),
    (4, 2.0, 0),  # more than the whole schedule is the whole schedule
    (10, 0.0, 10),  # nothing left to run
])
def test_first_step_is_diffusers_t_start(steps, strength, expected):
    assert first_step(steps, strength) == expected
    if strength is not None:  # diffusers' edit pipelines: t_start = int(max(steps - min(steps * strength, steps), 0))
        assert first_step(steps, strength) == int(max(steps - min(steps * strength, steps), 0))


def test_resolve_strength_defaults_per_task_and_checks_what_is_given():
    assert resolve_strength(ZI, "img2img", None, 6) == 0.6
    assert resolve_strength(ZI, "inpaint", None, 6) == 1.0  # Z-Image's inpainting default
    assert resolve_strength(QW, "inpaint", None, 6) == 0.6
    got = resolve_strength(ZI, "img2img", 1, 6)
    assert got == 1.0 and isinstance(got, float)
    assert resolve_strength(ZI, "img2img", 0.2, 6) == 0.2  # int(6 - 1.2) = 4 < 6: one step or more runs


@pytest.mark.parametrize("strength,steps,status", [
    (1.5, 6, 422), (-0.1, 6, 422), (float("nan"), 6, 422), (True, 6, 422), ("0.5", 6, 422),
    (0.0, 6, 400),  # leaves no step to run
    (1e-20, 50, 400),  # so does one that rounds to nothing: 50 - 5e-19 is 50.0
])
def test_resolve_strength_refusals_name_strength(strength, steps, status):
    assert refusal(resolve_strength, ZI, "img2img", strength, steps) == ("strength", status)


def test_resolve_strength_takes_any_strength_that_leaves_a_step():
    assert resolve_strength(ZI, "img2img", 0.1, 6) == 0.1  # int(6 - 0.6) = 5: the last step runs
    assert first_step(6, 0.1) == 5


def test_check_cost_refuses_over_the_cap_naming_n():
    caps = RequestCaps(max_megapixel_steps=64.0)
    assert check_cost(1024, 1024, 4, 50, RequestCaps()) is None  # no cap: anything goes
    assert check_cost(1000, 1000, 1, 64, caps) is None  # exactly the cap is allowed
    assert check_cost(64, 64, 10, 200, caps) is None
    with pytest.raises(RequestError) as e:
        check_cost(1024, 1024, 4, 50, caps)  # 209.7 megapixel-steps
    assert (e.value.param, e.value.status) == ("n", 400)
    assert "megapixel-steps" in e.value.message and "64" in e.value.message and "210" in e.value.message
    assert refusal(check_cost, 1000, 1000, 1, 65, caps) == ("n", 400)  # just over


def test_check_choice_is_auto_for_nothing_and_refuses_the_rest_as_422():
    assert check_choice("quality", None, QUALITIES) == "auto"
    assert check_choice("quality", "", QUALITIES) == "auto"
    assert [check_choice("quality", q, QUALITIES) for q in QUALITIES] == list(QUALITIES)
    assert check_choice("background", "opaque", ("auto", "opaque")) == "opaque"
    with pytest.raises(RequestError) as e:
        check_choice("quality", "ultra", QUALITIES)
    assert (e.value.param, e.value.status) == ("quality", 422) and "low" in e.value.message and "'ultra'" in e.value.message
    assert refusal(check_choice, "background", "Auto", ("auto", "opaque")) == ("background", 422)


def test_fit_inputs_resizes_the_image_and_keeps_the_mask_binary():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    mask = Image.new("L", (100, 80), 0)
    mask.paste(255, (20, 20, 60, 60))
    same_image, same_mask = fit_inputs(image, mask, 100, 80)
    assert same_image is image and same_mask is mask  # already the output size: untouched
    fitted, fitted_mask = fit_inputs(image, mask, 64, 48)
    assert fitted.size == (64, 48) and fitted.mode == "RGB" and fitted_mask.size == (64, 48)
    assert set(np.unique(np.asarray(fitted_mask))) == {0, 255}  # nearest: no grey edge to half-repaint
    alone, none = fit_inputs(image, None, 32, 32)
    assert alone.size == (32, 32) and none is None
    assert image.size == (100, 80) and mask.size == (100, 80)  # the inputs themselves are not changed


def test_resolve_uses_the_rules():
    """resolve() gives what the rules give: an edit's size fitted, its strength defaulted, its input resized."""
    wide = Image.new("RGB", (100, 80))
    r = resolve(ZI, ImageAsk("a", seed=0, quality="low"), image=wide)
    assert (r.width, r.height, r.steps, r.strength, r.first_step) == (96, 80, 3, 0.6, first_step(3, 0.6))
    assert r.image.size == (96, 80) and r.task == "img2img"
    with pytest.raises(RequestError) as e:
        resolve(ZI, ImageAsk("a", n=4, size="1024x1024", steps=50), caps=RequestCaps(max_megapixel_steps=64.0))
    assert e.value.param == "n"
    with pytest.raises(RequestError) as e:
        resolve(ZI, ImageAsk("a", quality="ultra"))
    assert (e.value.param, e.value.status) == ("quality", 422)
    with pytest.raises(RequestError) as e:
        resolve(ZI, ImageAsk("   ", prompt_param="messages"))
    assert e.value.param == "messages"  # a refusal of the prompt names the field the client sent it in
