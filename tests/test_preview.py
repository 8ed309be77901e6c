"""Linear previews (runtime/preview.py): the latent-to-RGB map fitted to each family's real VAE
decoder (torch and ONNX Runtime engines), previews at most PREVIEW_MAX_SIDE, the final image
untouched, `--preview-decoder full` as before, and the model card and /health saying which."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omni_trt.cli import build_parser, load_options
from omni_trt.models import FAMILIES
from omni_trt.runtime.loader import load_runtime
from omni_trt.runtime.pipeline import LoadOptions, load_pipeline
from omni_trt.runtime.preview import (
    FIT_VERSION,
    PREVIEW_MAX_SIDE,
    LinearPreview,
    colour_rmse,
    fit_linear,
    pooled_pairs,
    preview_size,
    sample_latents,
)
from omni_trt.runtime.request import ImageAsk, resolve
from serving import live_server
from test_server import decode

LINEAR = LoadOptions(preview_decoder="linear")
FULL = LoadOptions(preview_decoder="full")
# Held-back colour RMSE (0..1 units) of the map against the real decoder's pooled pixels. The tiny
# VAEs have random weights, so little of their output is linear in the latent: measured 0.133
# (the tiny AutoencoderKL of Z-Image/FLUX), 0.108 (SD3's), 0.017 (Qwen-Image's, nearly one
# colour), each within 0.001 of a constant colour's. Trained VAEs are what the map is for.
TINY_BOUND = 0.15


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The maps of this module go to a cache of their own (OMNI_TRT_CACHE)."""
    path = tmp_path_factory.mktemp("omni-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNI_TRT_CACHE", str(path))
        yield path / "previews"


@pytest.fixture(scope="module")
def linear_runtimes(tiny_dir, cache):
    loaded: dict = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = load_pipeline(str(tiny_dir(family)), LINEAR)
        return loaded[family]

    return get


def ask(family, **kw):
    base = dict(size="64x64", steps=4, n=2, seed=9)
    return resolve(family, ImageAsk("a red house", **{**base, **kw}))


def stream(rt, req) -> tuple[list, list]:
    got: list = []
    result = rt.generate([req], on_preview=lambda *a: got.append(a))
    return got, result.images[0]


def test_preview_size_caps_the_long_side_and_keeps_the_aspect():
    assert preview_size(1024, 1024) == (512, 512)
    assert preview_size(1024, 512) == (512, 256)
    assert preview_size(768, 1344) == (293, 512)
    assert preview_size(256, 128) == (256, 128), "never larger than the image"
    assert preview_size(2048, 16) == (512, 4)


def test_the_fit_recovers_a_decoder_that_is_linear_per_latent_pixel():
    """A decoder that is exactly W z + b per latent pixel (upsampled x8): the least squares gives W
    and b back to fp32 precision, and its held-back error is fp32 rounding."""
    gen = torch.Generator().manual_seed(5)
    w, b = torch.randn(3, 16, generator=gen) * 0.3, torch.randn(3, generator=gen) * 0.1

    def decode(grid):
        pixels = torch.einsum("oc,bchw->bohw", w, grid) + b.view(1, 3, 1, 1)
        return torch.nn.functional.interpolate(pixels, scale_factor=8, mode="nearest")

    fitted = fit_linear(decode, 16, 16, 24, unit_rms=False)
    assert torch.allclose(fitted.weight, w, atol=1e-5) and torch.allclose(fitted.bias, b, atol=1e-5)
    assert fitted.fit["rmse"] < 1e-5 < fitted.fit["mean_colour_rmse"]
    again = LinearPreview.from_json(json.loads(json.dumps(fitted.to_json())), 16)
    assert torch.equal(again.weight, fitted.weight) and torch.equal(again.bias, fitted.bias)
    with pytest.raises(ValueError):
        LinearPreview.from_json(fitted.to_json(), 4)
    # Previews of a 1024x768 image: its 128x96 latent grid, upsampled to 512x384.
    images = fitted.images(torch.randn(2, 16, 96, 128), 1024, 768)
    assert [im.size for im in images] == [(512, 384)] * 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_linear_previews_for_every_family(family, linear_runtimes, cache):
    rt = linear_runtimes(family)
    assert rt.describe()["preview_decoder"] == "linear" and rt.preview.channels == rt.family.latent_layout.channels(rt.pipe)
    # The map reproduces the real decoder's colours, pooled to the latent grid, on latents it was not fitted on.
    layout, factor = rt.family.latent_layout, rt.pipe.vae_scale_factor
    held_back = sample_latents(rt.preview.channels, 64 // factor, 64 // factor, True, torch.Generator().manual_seed(1234))
    x, y = pooled_pairs(lambda g: layout.decode(rt.pipe, g), held_back, unit_rms=True)
    got = (x.float() @ rt.preview.weight.T + rt.preview.bias).double()
    # It reads a grid at unit RMS (as the VAE's GroupNorm does): a grid's scale does not change its colours.
    assert torch.allclose(rt.preview.pixels(held_back * 3), rt.preview.pixels(held_back), atol=1e-5)
    assert colour_rmse(got, y) <= TINY_BOUND and rt.preview.fit["rmse"] <= TINY_BOUND, rt.preview.fit
    # Streamed: previews from the map at preview_size, and the final images byte for byte the unstreamed ones.
    req = ask(rt.family, steps=3, partial_images=2)
    previews, streamed = stream(rt, req)
    plain = rt.generate([ask(rt.family, steps=3)]).images[0]
    assert sorted((i, img, p) for i, img, p, _ in previews) == [(0, img, p) for img in (0, 1) for p in (0, 1)]
    assert all(im.size == preview_size(64, 64) for *_, im in previews)
    assert [np.asarray(a).tobytes() for a in streamed] == [np.asarray(b).tobytes() for b in plain]
    # Cached: a second load reads the same map back instead of fitting again.
    files = list(cache.glob("*.json"))
    assert files and all(json.loads(f.read_text())["version"] == FIT_VERSION for f in files)
    again = load_pipeline(str(rt.model), LINEAR).preview
    assert torch.equal(again.weight, rt.preview.weight) and again.fit == rt.preview.fit


def test_full_previews_are_todays_full_decodes(tiny_dir, linear_runtimes):
    """--preview-decoder full: the VAE decodes each preview at the image's size, as before; at the
    last step the clean prediction is the final latent, so that preview is the final image (the
    Qwen-Image one-frame layout here; tests/test_streaming.py does this for every family)."""
    family = "qwen-image"
    rt = load_pipeline(str(tiny_dir(family)), FULL)
    assert rt.preview is None and rt.describe()["preview_decoder"] == "full"
    req = ask(rt.family, size="96x64", steps=3, n=1, partial_images=1)
    previews, final = stream(rt, req)
    assert all(im.size == (96, 64) for *_, im in previews)
    last: list = []
    rt._call([req], None, {req.steps - 1: [(0, 0, 0, 0)]}, lambda *a: last.append(a))
    assert np.abs(np.asarray(last[0][3]).astype(int) - np.asarray(final[0]).astype(int)).max() <= 1
    # The same latents through the linear map: smaller or equal, and not the full decode.
    linear = linear_runtimes(family)
    linear_previews, linear_final = stream(linear, req)
    assert [np.asarray(a).tobytes() for a in linear_final] == [np.asarray(b).tobytes() for b in final]
    assert any(not np.array_equal(np.asarray(a[3]), np.asarray(b[3])) for a, b in zip(previews, linear_previews))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnxruntime_engines_fit_the_same_map_as_torch(family, built, linear_runtimes, cache):
    """The map is fitted through the VAE engine's stand-in (no weights), keyed by the engine's ONNX
    sha256; the same decoder in fp32 gives the torch VAE's map within fp32 kernel differences."""
    _, engine_dir, _ = built(family)
    rt = load_runtime(None, engine_dir, "onnxruntime", LINEAR)
    assert rt.describe()["preview_decoder"] == "linear" and not list(rt.pipe.vae.parameters())
    reference = linear_runtimes(family).preview
    assert torch.allclose(rt.preview.weight, reference.weight, atol=1e-3) and torch.allclose(rt.preview.bias, reference.bias, atol=1e-3)
    req = ask(rt.family, size="128x64", steps=3, n=1, partial_images=2)
    previews, streamed = stream(rt, req)
    assert [im.size for *_, im in previews] == [(128, 64)] * 2
    assert [np.asarray(a).tobytes() for a in streamed] == [np.asarray(b).tobytes() for b in rt.generate([ask(rt.family, size="128x64", steps=3, n=1)]).images[0]]


def test_the_serve_flag_and_what_the_server_reports(linear_runtimes):
    parse = build_parser().parse_args
    assert load_options(parse(["serve"])).preview_decoder == "linear"
    assert load_options(parse(["serve", "--preview-decoder", "full"])).preview_decoder == "full"
    assert load_options(parse(["generate", "--prompt", "x"])).preview_decoder == "full", "generate streams nothing: no map to fit"
    with pytest.raises(SystemExit):
        parse(["serve", "--preview-decoder", "tiny"])
    rt = linear_runtimes("z-image")
    with live_server(lambda: rt, served_model_name="tiny-z") as live, live.client() as c:
        assert c.get("/v1/models").json()["data"][0]["preview_decoder"] == "linear"
        assert c.get("/health").json()["preview_decoder"] == "linear"
        body = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 4, "seed": 2}
        with c.stream("POST", "/v1/images/generations", json={**body, "stream": True, "partial_images": 2}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert all(max(decode(e["b64_json"]).shape[:2]) <= PREVIEW_MAX_SIDE for e in events[:2])
        plain = c.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
        assert events[-1]["b64_json"] == plain, "the streamed final image is the unstreamed one, byte for byte"


def test_the_demo_models_last_preview_has_the_final_images_colours(cache):
    """On the trained demo model (a VAE whose latents are far from random), the linear map fitted
    on its own latents reads the last preview's background colour as the final image's (a map
    fitted on random latents alone matched 4 of 8) and its foreground mostly."""
    from omni_trt.demo.quality import benchmark_prompts, read_picture
    from omni_trt.runtime.loader import load_runtime, resolve_model

    rt = load_runtime(resolve_model(None, None), options=LINEAR)
    assert rt.preview.fit["generated"] > 0, rt.preview.fit
    bg = fg = 0
    prompts = benchmark_prompts(12)
    for prompt, seed in prompts:
        previews, final = stream(rt, resolve(rt.family, ImageAsk(prompt, size="64x64", steps=8, seed=seed, partial_images=3)))
        last = max(previews, key=lambda p: p[2])[3]
        seen, want = read_picture(np.asarray(last.convert("RGB").resize(final[0].size))), read_picture(np.asarray(final[0]))
        bg += seen.bg == want.bg
        fg += seen.fg == want.fg
    assert bg >= 0.8 * len(prompts) and fg >= 0.4 * len(prompts), (bg, fg)
