"""Pure functions: size parsing, family defaults, validation messages, batching kwargs."""

import pytest

from omni_trt.errors import RequestError
from omni_trt.models import FAMILIES, SizeLimits, family_by_name, family_for_class, parse_size
from omni_trt.models.base import Point
from omni_trt.runtime.request import GenerationRequest, pipeline_kwargs, resolve

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
    z = resolve(ZI, "a cat", seed=1)
    assert (z.width, z.height, z.steps, z.guidance_scale, z.true_cfg_scale) == (1024, 1024, 9, 0.0, None)
    z = resolve(ZI, "a cat", seed=1, true_cfg_scale=7.0, guidance_scale=2.0)
    assert z.true_cfg_scale is None and z.guidance_scale == 2.0
    q = resolve(QW, "a cat", seed=1, guidance_scale=3.0)
    assert (q.steps, q.true_cfg_scale, q.guidance_scale) == (50, 4.0, None)
    flux, sd3 = FAMILIES["flux"], FAMILIES["sd3"]
    assert resolve(flux, "a", seed=0).guidance_scale == 3.5 and resolve(sd3, "a", seed=0).steps == 28


def test_size_wins_over_width_and_height():
    r = resolve(ZI, "a", size="128x64", width=512, height=512, seed=0)
    assert (r.width, r.height) == (128, 64)
    r = resolve(ZI, "a", width=256, seed=0)
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
        resolve(ZI, "a cat", **kwargs)
    assert e.value.param == param and e.value.status == status and e.value.message


def test_prompt_must_be_text():
    with pytest.raises(RequestError) as e:
        resolve(ZI, 42)  # type: ignore[arg-type]
    assert e.value.status == 422
    with pytest.raises(RequestError, match="empty"):
        resolve(ZI, "   ")


def test_random_seed_is_filled_and_image_seeds_follow_index():
    r = resolve(ZI, "a", n=3)
    assert isinstance(r.seed, int)
    assert GenerationRequest("a", 64, 64, 2, seed=10, n=3).image_seeds() == [10, 11, 12]


def test_pipeline_kwargs_repeats_prompts_per_image_and_gives_one_generator_each():
    a = resolve(QW, "first", size="64x64", n=2, seed=5, negative_prompt="blurry")
    b = resolve(QW, "second", size="64x64", n=1, seed=9, negative_prompt="dark")
    kw = pipeline_kwargs([a, b])
    assert kw["prompt"] == ["first", "first", "second"]
    assert kw["negative_prompt"] == ["blurry", "blurry", "dark"]
    assert [g.initial_seed() for g in kw["generator"]] == [5, 6, 9]
    assert kw["true_cfg_scale"] == 4.0 and "guidance_scale" not in kw


def test_incompatible_requests_have_different_batch_keys():
    a = resolve(ZI, "a", size="64x64", seed=1)
    assert a.batch_key() == resolve(ZI, "b", size="64x64", seed=2).batch_key()
    assert a.batch_key() != resolve(ZI, "a", size="64x128", seed=1).batch_key()
    assert a.batch_key() != resolve(ZI, "a", size="64x64", seed=1, steps=3).batch_key()
    assert a.batch_key() != resolve(ZI, "a", size="64x64", seed=1, negative_prompt="x").batch_key()


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
