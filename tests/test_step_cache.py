"""The step cache (MagCache around the whole transformer) and the prompt cache: the rule as pure
functions, calibration through the manifest, and real servers on the trained demo model (torch)
and on the tiny model's ONNX Runtime engines."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from omni_trt.errors import RequestError, UsageError
from omni_trt.models import FAMILIES
from omni_trt.runtime.stepcache import (DEFAULT_THRESHOLD, MagSettings, nearest_changes, counts, interpolate, nearest_ratios, parse_cache_config, plan, ratios_from_norms,
                                        request_settings)

FLAT = [1.0] * 20  # magnitudes that never change: every step after the retained ones is reusable


# ---- the rule ----

def test_threshold_zero_reuses_nothing_and_a_larger_one_reuses_at_least_as_much():
    ratios = [1.0] + [1.0 + 0.02 * (i % 3) for i in range(1, 30)]
    assert plan(ratios, 30, MagSettings(threshold=0)) == (None,) * 30
    reused = [counts(plan(ratios, 30, MagSettings(threshold=t)))[1] for t in (0.01, 0.06, 0.24, 1.0)]
    assert reused == sorted(reused) and reused[-1] > 0, reused


def test_plan_keeps_the_retained_steps_and_never_skips_more_than_the_most_in_a_row():
    p = plan(FLAT, 20, MagSettings(threshold=1.0, max_skip_steps=3, retention_ratio=0.2))
    assert p[:4] == (None,) * 4  # 20% of 20 steps always computed
    run = longest = 0
    for s in p:
        run = run + 1 if s is not None else 0
        longest = max(longest, run)
    assert longest == 3
    assert counts(p) == (p.count(None), 20 - p.count(None))


def test_reused_steps_are_scaled_by_the_accumulated_ratio():
    ratios = [1.0, 1.0, 1.1, 1.1, 1.1]
    p = plan(ratios, 5, MagSettings(threshold=10, max_skip_steps=5, retention_ratio=0.4))
    assert p[:2] == (None, None)
    assert p[2] == pytest.approx(1.1) and p[3] == pytest.approx(1.21) and p[4] == pytest.approx(1.331)


def test_an_edit_plans_from_its_first_step():
    p = plan(FLAT, 20, MagSettings(threshold=1.0, retention_ratio=0.0), first=12)
    assert p[:13] == (None,) * 13  # skipped by the strength, then the first step run computes
    assert counts(p, first=12)[0] + counts(p, first=12)[1] == 8


def test_interpolation_takes_the_nearest_calibrated_step():
    assert interpolate([1, 2, 3, 4, 5], 5) == [1, 2, 3, 4, 5]
    assert interpolate([1, 2, 3], 5) == [1, 1, 2, 3, 3]  # halves round to even, as MagCache's np.round does
    assert interpolate([1.0, 2.0], 1) == [2.0]
    assert nearest_ratios({4: [1, 1, 1, 1], 8: list(range(1, 9))}, 8) == list(range(1, 9))
    assert len(nearest_ratios({4: [1, 1, 1, 1], 8: list(range(1, 9))}, 50)) == 50
    assert ratios_from_norms([2.0, 4.0, 2.0]) == [1.0, 2.0, 0.5]
    assert nearest_changes({}, 8) is None
    assert nearest_changes({2: [0.0, 0.5]}, 4) == [0.0, 0.0, 0.25, 0.25]  # half the step size, half the change


def test_measured_changes_are_the_error_where_a_calibration_has_them():
    """A flat magnitude curve says reuse is free; the measured changes say what it costs, and win."""
    changes = [0.0] + [0.05] * 19
    free = plan(FLAT, 20, MagSettings(threshold=0.12, max_skip_steps=10, retention_ratio=0))
    measured = plan(FLAT, 20, MagSettings(threshold=0.12, max_skip_steps=10, retention_ratio=0), changes=changes)
    assert counts(free) == (2, 18)  # only max_skip_steps stops it
    # each run after a computed step: 0.05 + 0.10 = 0.15 > 0.12 after two, so one reused per computed
    assert measured == (None, 1.0) * 10


def test_request_field():
    server = MagSettings()
    assert request_settings(None, server) is server and request_settings(True, server) is server
    assert request_settings(False, server) is None and request_settings(False, None) is None
    assert request_settings({"mag_threshold": 0.5}, server) == MagSettings(threshold=0.5)
    assert request_settings('{"mag_max_skip_steps": 2}', server).max_skip_steps == 2  # an edit's form field
    assert request_settings("false", server) is None
    for bad in ({"mag_threshold": -1}, {"mag_threshold": float("nan")}, {"mag_threshold": "x"}, {"threshold": 1}, 3, "nope",
                {"mag_max_skip_steps": 1.5}, {"mag_retention_ratio": 2}):
        with pytest.raises(RequestError) as e:
            request_settings(bad, server)
        assert e.value.param == "cache" and e.value.status == 422, bad
    with pytest.raises(RequestError) as e:
        request_settings({"mag_threshold": 0.1}, None)
    assert e.value.param == "cache" and e.value.status == 400 and "--cache-backend mag_cache" in str(e.value)


def test_server_flags():
    assert parse_cache_config("none", None).settings is None
    c = parse_cache_config("mag_cache", '{"mag_threshold": 0.1, "mag_ratios": [1, 1.1, 0.9]}')
    assert c.settings == MagSettings(threshold=0.1) and c.ratios == (1.0, 1.1, 0.9)
    for backend, config in (("tea", None), ("none", "{}"), ("mag_cache", "{"), ("mag_cache", "[]"), ("mag_cache", '{"mag_ratios": [0]}'),
                            ("mag_cache", '{"x": 1}')):
        with pytest.raises(UsageError):
            parse_cache_config(backend, config)


# ---- real servers ----

def _post(http, **body):
    r = http.post("/v1/images/generations", json={"prompt": "a red circle on a blue background", "seed": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus series' samples with these labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    old = os.environ.get("OMNI_TRT_CACHE")
    os.environ["OMNI_TRT_CACHE"] = str(tmp_path_factory.mktemp("omni-cache"))
    yield
    if old is None:
        os.environ.pop("OMNI_TRT_CACHE", None)
    else:
        os.environ["OMNI_TRT_CACHE"] = old


@pytest.fixture(scope="module")
def demo_cached(cache_root):
    """The trained demo model with mag_cache at its defaults (calibrated at load) and a prompt cache."""
    from omni_trt.runtime.loader import load_runtime, resolve_model
    from omni_trt.runtime.pipeline import LoadOptions
    from serving import live_server

    rt = load_runtime(resolve_model(None), options=LoadOptions(device="cpu", cache=parse_cache_config("mag_cache", None), prompt_cache_size=8))
    with live_server(lambda: rt, served_model_name="demo") as live, live.client() as c:
        yield rt, c


def test_steps_are_reused_and_cache_false_is_the_uncached_image(demo_cached):
    rt, http = demo_cached
    steps = 20
    cached = _post(http, num_inference_steps=steps)
    off = _post(http, num_inference_steps=steps, cache=False)
    zero = _post(http, num_inference_steps=steps, cache={"mag_threshold": 0})
    more = _post(http, num_inference_steps=steps, cache={"mag_threshold": 1.0, "mag_max_skip_steps": 10})
    assert cached["denoise_steps"]["reused"] > 0 and cached["denoise_steps"]["computed"] + cached["denoise_steps"]["reused"] == steps
    assert off["denoise_steps"] == {"computed": steps, "reused": 0} == zero["denoise_steps"]
    assert more["denoise_steps"]["reused"] >= cached["denoise_steps"]["reused"]
    assert off["data"][0]["b64_json"] == zero["data"][0]["b64_json"]
    assert off["data"][0]["b64_json"] != cached["data"][0]["b64_json"]
    # cache: false is exactly what the same model gives with no step cache at all
    from omni_trt.runtime.request import ImageAsk, resolve
    req = resolve(rt.family, ImageAsk("a red circle on a blue background", steps=steps, seed=3), limits=rt.limits, cache=None)
    assert req.cache is None
    plain = np.asarray(rt.generate([req]).images[0][0].convert("RGB"), dtype=float)
    assert np.array_equal(plain, _pixels(off))


def _pixels(body: dict) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).convert("RGB"), dtype=float)


def test_a_request_gives_the_same_image_alone_and_batched(demo_cached):
    rt, _ = demo_cached
    from omni_trt.runtime.request import GenerationRequest

    a, b = (GenerationRequest(p, 64, 64, 12, 7, cache=rt.cache_settings) for p in ("a red circle on a blue background", "a green square on a white background"))
    alone = np.asarray(rt.generate([a]).images[0][0], dtype=float)
    batch = rt.generate([a, b])
    assert batch.steps[1] > 0
    assert np.abs(alone - np.asarray(batch.images[0][0], dtype=float)).max() <= 1  # the README's bound across batch sizes
    assert a.batch_key() != GenerationRequest(a.prompt, 64, 64, 12, 7).batch_key()  # uncached never batches with cached


def test_streaming_ends_in_the_cached_image(demo_cached):
    _, http = demo_cached
    whole = _post(http, num_inference_steps=12)["data"][0]["b64_json"]
    with http.stream("POST", "/v1/images/generations", json={"prompt": "a red circle on a blue background", "seed": 3, "stream": True,
                                                             "partial_images": 2, "num_inference_steps": 12}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    done = [e for e in events if e["type"].endswith(".completed")]
    assert len(events) == 3 and done[0]["b64_json"] == whole and done[0]["denoise_steps"]["reused"] > 0


def test_bad_cache_values_are_refused_naming_cache(demo_cached, server):
    _, http = demo_cached
    for bad in ({"mag_threshold": -1}, "yes", {"nope": 1}, [1]):
        r = http.post("/v1/images/generations", json={"prompt": "a red circle", "cache": bad})
        assert r.status_code == 422 and r.json()["error"]["param"] == "cache", (bad, r.text)
    r = http.post("/v1/images/edits", files={"image": ("a.png", _png(), "image/png")},
                  data={"prompt": "a red circle", "cache": '{"mag_threshold": "high"}'})
    assert r.status_code == 422 and r.json()["error"]["param"] == "cache", r.text
    with server.client() as plain:  # a server without a step cache
        r = plain.post("/v1/images/generations", json={"prompt": "a red circle", "cache": {"mag_threshold": 0.1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache"
        assert plain.get("/health").json()["cache"] == {"backend": "none"}
        ok = plain.post("/v1/images/generations", json={"prompt": "a red circle", "cache": False, "num_inference_steps": 2,
                                                         "size": "64x64"})
        assert ok.status_code == 200 and "denoise_steps" not in ok.json()
    assert http.get("/health").status_code == 200  # still serving


def test_an_edit_plans_the_steps_its_strength_runs(demo_cached):
    _, http = demo_cached
    r = http.post("/v1/images/edits", files={"image": ("a.png", _png(), "image/png")},
                  data={"prompt": "a red circle on a blue background", "num_inference_steps": "20", "strength": "0.5", "seed": "1"})
    steps = r.json()["denoise_steps"]
    assert r.status_code == 200 and steps["computed"] + steps["reused"] == 10 and steps["reused"] > 0, r.text
    off = http.post("/v1/images/edits", files={"image": ("a.png", _png(), "image/png")},
                    data={"prompt": "a red circle on a blue background", "num_inference_steps": "20", "strength": "0.5", "seed": "1",
                          "cache": "false"})
    assert off.json()["denoise_steps"] == {"computed": 10, "reused": 0}


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 20, 200)).save(buf, "PNG")
    return buf.getvalue()


def test_cards_health_and_metrics_say_what_the_cache_did(demo_cached):
    _, http = demo_cached
    before = http.get("/metrics").text
    a = _post(http, num_inference_steps=10, seed=11)
    b = _post(http, num_inference_steps=10, seed=11)  # the same prompt again: a prompt cache hit, the same bytes
    assert a["data"][0]["b64_json"] == b["data"][0]["b64_json"]
    after = http.get("/metrics").text
    assert _metric(after, "omni_prompt_cache_total", result="hit") > _metric(before, "omni_prompt_cache_total", result="hit")
    route = "/v1/images/generations"
    for outcome in ("computed", "reused"):
        grew = _metric(after, "omni_denoise_steps_total", outcome=outcome, route=route) - _metric(before, "omni_denoise_steps_total",
                                                                                                 outcome=outcome, route=route)
        assert grew == 2 * a["denoise_steps"][outcome], (outcome, grew)
    card = http.get("/v1/models").json()["data"][0]
    health = http.get("/health").json()
    for info in (card, health):
        assert info["cache"]["backend"] == "mag_cache" and info["cache"]["mag_threshold"] == DEFAULT_THRESHOLD and info["prompt_cache_size"] == 8
        assert info["cache"]["calibrated_steps"] == [8] and info["cache"]["calibration"].startswith("calibrated at load")


def test_the_openai_sdk_sends_cache_on_images_and_chat(demo_cached):
    """`cache` through the SDK's extra_body: images report their steps; chat's count in /metrics by its route."""
    import openai

    _, http = demo_cached
    sdk = openai.OpenAI(base_url=f"{str(http.base_url).rstrip('/')}/v1", api_key="unused", max_retries=0)
    ask = dict(model="demo", prompt="a red circle on a blue background", extra_body={"num_inference_steps": 20, "seed": 3})
    cached = sdk.images.generate(**ask).model_extra["denoise_steps"]
    off = sdk.images.generate(**{**ask, "extra_body": {**ask["extra_body"], "cache": False}}).model_extra["denoise_steps"]
    assert cached["reused"] > 0 and off == {"computed": 20, "reused": 0}
    reused = []
    for cache in (False, True):
        before = http.get("/metrics").text
        sdk.chat.completions.create(model="demo", messages=[{"role": "user", "content": "a red circle on a blue background"}],
                                    extra_body={"num_inference_steps": 20, "seed": 3, "cache": cache})
        after = http.get("/metrics").text
        reused.append(_metric(after, "omni_denoise_steps_total", outcome="reused") - _metric(before, "omni_denoise_steps_total", outcome="reused"))
    assert reused == [0, cached["reused"]]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        sdk.chat.completions.create(model="demo", messages=[{"role": "user", "content": "a red circle"}], extra_body={"cache": "often"})
    assert e.value.body["param"] == "cache"


def test_calibration_round_trips_through_the_manifest_and_runs_on_engines(built, tmp_path, cache_root):
    """ONNX Runtime engines of the tiny model: calibrated into a copy's manifest, read back at
    load; steps reused; threshold 0 is the uncached engines' image."""
    from omni_trt.enginedir import Manifest
    from omni_trt.runtime.calibration import calibrate, load_calibration, store_calibration
    from omni_trt.runtime.loader import load_runtime, resolve_model
    from omni_trt.runtime.pipeline import LoadOptions
    from omni_trt.runtime.request import GenerationRequest

    _, engine_dir, _ = built("z-image")
    engines = tmp_path / "engines"
    shutil.copytree(engine_dir, engines)
    plain = load_runtime(resolve_model(None, engines), runtime="onnxruntime", options=LoadOptions(device="cpu"))
    entry = calibrate(plain, [6], size=(64, 64))
    assert store_calibration(plain, entry, manifest=True).startswith("the manifest")
    assert Manifest.read(engines).step_cache.ratios == {6: entry.ratios[6]}
    assert load_calibration(plain)[1].startswith("the manifest")

    cached = load_runtime(resolve_model(None, engines), runtime="onnxruntime",
                          options=LoadOptions(device="cpu", cache=parse_cache_config("mag_cache", '{"mag_threshold": 2, "mag_max_skip_steps": 10}')))
    assert cached.step_cache.source.startswith("the manifest") and cached.kind == "onnxruntime"
    req = GenerationRequest("a cat", 64, 64, 6, 1, cache=cached.cache_settings)
    out = cached.generate([req])
    assert out.steps[1] > 0
    zero = cached.generate([GenerationRequest("a cat", 64, 64, 6, 1, cache=MagSettings(threshold=0))])
    base = plain.generate([GenerationRequest("a cat", 64, 64, 6, 1)])
    assert zero.steps == (6, 0) and np.array_equal(np.asarray(zero.images[0][0]), np.asarray(base.images[0][0]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_reuses_steps_with_cfg(family, tiny_dir):
    """Each family's tiny pipeline with a flat curve (every step reusable): steps reused, with CFG
    where the family has it (Qwen-Image and FLUX.1 true CFG: two transformer calls a step, reused
    together; the others batch CFG into one call; an edit-only family's edit). Exactness against
    uncached is the servers' test."""
    from omni_trt.models import family_by_name
    from omni_trt.runtime.pipeline import LoadOptions, load_pipeline
    from omni_trt.runtime.request import ImageAsk, edit_only_input, resolve

    config = parse_cache_config("mag_cache", '{"mag_ratios": [1, 1, 1], "mag_retention_ratio": 0}')
    rt = load_pipeline(str(tiny_dir(family)), LoadOptions(device="cpu", cache=config), family=family_by_name(family))
    cfg = {"negative_prompt": "blurry", "true_cfg_scale": 2.0, "guidance_scale": 2.0}
    ask = ImageAsk("a cat", size="64x64", steps=3, seed=5, **{k: v for k, v in cfg.items() if k in rt.family.fields})
    traced = rt.trace([resolve(rt.family, ask, limits=rt.limits, cache=rt.cache_settings, image=edit_only_input(rt.family, "64x64"))])
    assert (traced.hook.computed, traced.hook.reused) == (1, 2) and np.isfinite(np.asarray(traced.images[0])).all()
    assert traced.hook.calls == (2 if "true_cfg_scale" in rt.family.fields else 1)  # the first step's calls; reuses make none
