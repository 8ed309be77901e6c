"""FLUX.2 [klein] (family flux2-klein) on the torch runtime through a real server and the OpenAI SDK:
generations, reference edits through the pipeline's own `image` argument (several images in one
call, as its multi-reference conditioning takes them), the refusals, and the distilled / base
defaults read from the checkpoint's own model_index.json."""

from __future__ import annotations

import base64
from dataclasses import replace

import numpy as np
import pytest
import torch

from omni_trt.errors import RequestError
from omni_trt.models import FAMILIES, Point, detect_family
from omni_trt.runtime.loader import resolve_model
from omni_trt.runtime.request import ImageAsk, edit_inputs, resolve
from serving import live_server
from test_edits import noise, png
from test_server import assert_error, assert_same_image, decode

FAMILY = "flux2-klein"
FEW = {"num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def klein(tiny_dir):
    from omni_trt.runtime.pipeline import load_pipeline

    return load_pipeline(str(tiny_dir(FAMILY)))


@pytest.fixture(scope="module")
def server(klein):
    with live_server(lambda: klein, served_model_name="tiny-klein", max_input_pixels=256 * 256) as live:
        yield live


def own_call(runtime, prompt: str, seed: int, **kwargs) -> np.ndarray:
    """The pipeline called directly, as its documentation shows: what the server must equal."""
    with torch.inference_mode():
        out = runtime.pipe(prompt=prompt, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(seed), **kwargs)
    return np.asarray(out.images[0])


def test_models_lists_the_family_and_the_distilled_defaults(http):
    card = http.get("/v1/models").json()["data"][0]
    assert card["family"] == FAMILY
    assert card["defaults"]["num_inference_steps"] == 4 and card["defaults"]["guidance_scale"] == 1.0


def test_generation_equals_the_pipelines_own_call(sdk, klein):
    res = sdk.images.generate(model="tiny-klein", prompt="a red fox", size="64x64", extra_body=FEW)
    got = decode(res.data[0].b64_json)
    assert got.shape == (64, 64, 3)
    assert np.array_equal(got, own_call(klein, "a red fox", 3))


def test_reference_edit_passes_every_image_to_the_pipeline(sdk, klein):
    a, b = noise(1, (64, 64)), noise(2, (80, 64))
    res = sdk.images.edit(model="tiny-klein", image=[("a.png", png(a)), ("b.png", png(b))], prompt="a red fox", size="64x64", n=2,
                          extra_body=FEW)
    first, second = (decode(d.b64_json) for d in res.data)
    assert len(res.data) == 2 and res.usage.output_tokens == 2 * 16  # one request of n=2, not one per image
    want = own_call(klein, "a red fox", 3, image=[a, b])
    assert_same_image(first, want)  # one call of 2 against one of 1: within rounding
    plain = own_call(klein, "a red fox", 3)
    assert np.abs(first.astype(int) - plain).mean() > 0.5, "the references condition the image"
    assert np.abs(second.astype(int) - first).max() > 0, "image i uses seed + i"
    one = sdk.images.edit(model="tiny-klein", image=("a.png", png(a)), prompt="a red fox", size="64x64", extra_body=FEW)
    assert np.array_equal(decode(one.data[0].b64_json), own_call(klein, "a red fox", 3, image=[a]))


def test_chat_with_an_image_is_a_reference_edit(http, klein):
    a = noise(4, (64, 64))
    url = "data:image/png;base64," + base64.b64encode(png(a)).decode()
    r = http.post("/v1/chat/completions", json={
        "model": "tiny-klein", "messages": [{"role": "user", "content": [{"type": "text", "text": "a red fox"},
                                                                          {"type": "image_url", "image_url": {"url": url}}]}],
        "extra_body": {"height": 64, "width": 64, **FEW}})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    image_url = content[0]["image_url"]["url"] if isinstance(content, list) else content
    got = decode(image_url.split(",", 1)[1])
    assert np.array_equal(got, own_call(klein, "a red fox", 3, image=[a]))


def test_refusals_name_the_field(http):
    five = [("image[]", (f"{i}.png", png(noise(i)), "image/png")) for i in range(5)]
    data = {"prompt": "a fox", "size": "64x64", **{k: str(v) for k, v in FEW.items()}}
    assert_error(http.post("/v1/images/edits", data=data, files=five), 400, "at most 4")["error"]["param"] == "image"
    body = assert_error(http.post("/v1/images/edits", data={**data, "strength": "0.5"}, files=five[:1]), 400, "no mask or strength")
    assert body["error"]["param"] == "strength"
    assert http.get("/health").status_code == 200  # still serving


def test_defaults_follow_is_distilled(tmp_path):
    from omni_trt.demo.flux2_klein import build_tiny

    base = tmp_path / "base"
    build_tiny(base, is_distilled=False)
    assert detect_family(base).defaults.steps == 50 and detect_family(base).defaults.guidance_scale == 4.0
    assert resolve_model(str(base)).family.defaults == detect_family(base).defaults  # what serve uses


def test_reference_rules_are_pure():
    fam = FAMILIES[FAMILY]
    a, b = noise(1, (64, 64)), noise(2, (3000, 400))
    assert edit_inputs(fam, [(a, None), (b, None)]) == [((a, b), None)]
    assert edit_inputs(FAMILIES["flux"], [(a, None), (b, None)]) == [(a, None), (b, None)]
    req = resolve(fam, ImageAsk("x", steps=2), image=(a, b))
    assert req.task == "reference" and req.image is None and req.strength is None
    assert (req.width, req.height) == (64, 64)  # the first reference's size
    assert req.references[1].size == (2048, 272)  # fitted into the sizes the model makes
    with pytest.raises(RequestError, match="up to 8:1"):  # what the pipeline's image processor refuses
        resolve(fam, ImageAsk("x"), image=noise(3, (1000, 64)))
    assert resolve(fam, ImageAsk("x")).task == "text2img"
    edit_only = replace(fam, edits=replace(fam.edits, generations=False))  # Qwen-Image-Edit's kind
    with pytest.raises(RequestError, match="/v1/images/edits") as refused:
        resolve(edit_only, ImageAsk("x"))
    assert refused.value.param == "image" and resolve(edit_only, ImageAsk("x", steps=2), image=a).task == "reference"
    for many, mask, strength, param in (((a,) * 5, None, None, "image"), ((a,), a, None, "mask"), ((a,), None, 0.5, "strength")):
        with pytest.raises(RequestError) as refused:
            resolve(fam, ImageAsk("x", strength=strength), image=many, mask=mask)
        assert refused.value.param == param


def test_real_shape_config_is_klein_4b_on_meta():
    from diffusers import Flux2Transformer2DModel

    from omni_trt.demo.flux2_klein import TRANSFORMER_CONFIG

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**TRANSFORMER_CONFIG)
    assert abs(sum(p.numel() for p in model.parameters()) / 3.88e9 - 1) < 0.01  # "4B": 3.88B in the transformer
    shapes = FAMILIES[FAMILY].components["transformer"].shapes(Point(1, 1024, 1024, 512, references=1))
    assert shapes["hidden_states"] == (1, 2 * 4096, 128) and shapes["encoder_hidden_states"] == (1, 512, 7680)


@pytest.mark.slow
def test_one_layer_full_width_builds_and_generates_through_the_wrappers(tmp_path):
    """klein 4B's widths at one block per stack: the unmodified pipeline's reference edit against the
    same through the export wrappers behind their stand-ins (the engines' path), fp32 over bf16 files."""
    from omni_trt.compiler.export import relative_error
    from omni_trt.demo.flux2_klein import build_real_shapes
    from omni_trt.runtime.pipeline import EngineSwap, LoadOptions, load_pipeline
    from test_real_shapes_flux_sd3 import TorchEngine

    fam = FAMILIES[FAMILY]
    build_real_shapes(tmp_path, "bf16", overrides={"num_layers": 1, "num_single_layers": 1})
    options = LoadOptions(device="cpu", dtype="fp32")
    pipe = load_pipeline(str(tmp_path), options).pipe
    assert pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim == 3072
    kwargs = dict(prompt="a cat", image=[noise(5, (64, 64))], height=64, width=64, num_inference_steps=1, output_type="pt",
                  max_sequence_length=32)

    def generate(p):
        p.set_progress_bar_config(disable=True)
        return p(generator=torch.Generator().manual_seed(0), **kwargs).images.float()

    want = generate(pipe)
    assert want.shape == (1, 3, 64, 64) and torch.isfinite(want).all() and want.std() > 1e-3
    engines = {name: TorchEngine(spec.wrapper(getattr(pipe, spec.pipeline_attr)).eval(), spec.input_names, spec.output_names)
               for name, spec in fam.components.items()}
    configs = {attr: dict(getattr(pipe, attr).config) for attr in ("transformer", "vae")}
    standins = {attr: s.with_dtype(torch.float32) for attr, s in fam.standins(configs, engines).items()}
    got = generate(load_pipeline(str(tmp_path), options, fam, EngineSwap("torch-wrapper", standins)).pipe)
    assert {name: e.calls for name, e in engines.items()} == {"transformer": 1, "vae_decoder": 1, "vae_encoder": 1}
    assert relative_error(got, want) < 1e-4  # fp32 against fp32: the export gate's tolerance


@pytest.mark.slow
def test_gpu_suite_family_step_benches_the_family(tmp_path):
    """The GPU suite's opt-in family step, as --tiny runs it (tiny pipeline, CPU): built, benched on
    torch at the family's own default steps, the model folder removed after."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_suite

    suite = gpu_suite.Suite(gpu_suite.TINY, True, 200.0, tmp_path / "suite.json", tmp_path, families=(FAMILY,))
    step = suite.step(f"family {FAMILY}", lambda t: suite.family(t, FAMILY))
    assert step is not None, suite.report["steps"]
    assert step["family"] == FAMILY and step["steps"] == 4 and step["size"] == "64x64"
    assert step["runtimes"]["torch"]["stages"]["total"]["median_ms"] > 0
    assert not (tmp_path / f"family-{FAMILY}").exists()
    assert FAMILY in gpu_suite.figures(suite.report["steps"])["family_torch_total_ms"]


def test_playground_edits_with_its_image_input(server, tmp_path):
    """The playground's image input in Chromium: two files make one reference edit of klein, the
    image the same multipart request makes unstreamed."""
    import os

    import httpx
    from playwright.sync_api import expect, sync_playwright

    from test_playground import CHROMIUM, CHROMIUM_ARGS, fill, png as decode_png

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install chromium)")

    files = []
    for i, size in ((1, (64, 64)), (2, (80, 64))):
        path = tmp_path / f"in{i}.png"
        noise(i, size).save(path)
        files.append(path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            problems = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(server.url + "/")
            expect(page.locator("#size option[value='64x64']")).to_have_count(1)
            fill(page, "a red fox", "64x64", steps=2, partials=1, seed=3)
            page.get_by_label("Images to edit").set_input_files([str(f) for f in files])
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("figure[data-state='final']")).to_have_count(1)
            src = page.locator("figure[data-index='0'] img").get_attribute("src")
            assert problems == []
        finally:
            browser.close()
    got = decode_png(base64.b64decode(src.split(",", 1)[1]))
    data = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": "2", "seed": "3"}
    r = httpx.post(server.url + "/v1/images/edits", data=data, timeout=60,
                   files=[("image[]", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert np.array_equal(got, decode(r.json()["data"][0]["b64_json"]))
