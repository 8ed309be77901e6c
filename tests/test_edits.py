"""Image edits through a real uvicorn server: /v1/images/edits (multipart, as the OpenAI SDK sends
it), chat messages with an image, streaming edits, every bad input a 4xx, and edits on ONNX
Runtime engines equal to the torch runtime's."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from omni_trt.runtime.loader import load_runtime
from omni_trt.runtime.request import ImageAsk, resolve
from serving import live_server
from test_server import assert_error, assert_same_image, decode
from test_vae_encoder import _copy_without

EDIT = "/v1/images/edits"
FEW = {"num_inference_steps": 6, "seed": 5}  # edits run strength x steps: enough that the input shows


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def noise(seed: int, size=(64, 64), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8), mode)


def alpha_mask(size=(64, 64)) -> Image.Image:
    """Opaque everywhere but a transparent square: edit there."""
    m = Image.new("RGBA", size, (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), (16, 16, 48, 48))
    return m


@pytest.fixture(scope="module")
def server(runtime):
    """`http` and `sdk` (conftest.py) are clients of this server."""
    with live_server(lambda: runtime, served_model_name="tiny-z", max_input_pixels=256 * 256, max_body_bytes=2 << 20,
                     allowed_image_hosts=("127.0.0.1",)) as live:
        yield live


def edit(http, *files, **data):
    return http.post(EDIT, data={"prompt": "a red fox", **{k: str(v) for k, v in {**FEW, **data}.items()}}, files=list(files))


def test_sdk_edit_one_image_with_a_mask_and_n(sdk, runtime):
    a = png(noise(1))
    res = sdk.images.edit(model="tiny-z", image=("a.png", a), prompt="a red fox", size="64x64", extra_body=FEW)
    one = decode(res.data[0].b64_json)
    assert one.shape == (64, 64, 3) and res.usage.output_tokens == 16 and res.size == "64x64"
    # The same as the runtime's own edit of that image (the server adds nothing).
    want = runtime.generate([resolve(runtime.family, ImageAsk("a red fox", size="64x64", steps=6, seed=5), image=noise(1))]).images[0][0]
    assert np.array_equal(one, np.asarray(want))
    masked = sdk.images.edit(model="tiny-z", image=("a.png", a), mask=("m.png", png(alpha_mask())), prompt="a red fox", size="64x64", extra_body=FEW)
    inpainted = decode(masked.data[0].b64_json)
    assert np.abs(inpainted.astype(int) - one).mean() > 1, "a mask makes it inpainting, another result"
    two = sdk.images.edit(model="tiny-z", image=("a.png", a), prompt="a red fox", size="64x64", n=2, extra_body=FEW)
    first, second = (decode(d.b64_json) for d in two.data)
    assert_same_image(first, one)  # one call of 2 against one of 1: within 1/255
    assert np.abs(second.astype(int) - first).max() > 0, "image i uses seed + i"


def test_image_array_edits_each_image_in_turn(sdk, http):
    # The SDK sends a list as image[]: every image is edited, n each, in order, seeds counting on.
    res = sdk.images.edit(model="tiny-z", image=[("a.png", png(noise(1))), ("b.png", png(noise(2)))], prompt="a red fox",
                          size="64x64", n=2, extra_body=FEW)
    got = [decode(d.b64_json) for d in res.data]
    assert len(got) == 4 and res.usage.output_tokens == 64
    # Made in one call of four against alone: equal within the README's 1/255 (CPU kernels block
    # a batch of four differently from one image, which can move a pixel across a rounding edge).
    alone = decode(edit(http, ("image", ("a.png", png(noise(1)))), size="64x64").json()["data"][0]["b64_json"])
    assert_same_image(got[0], alone)
    # The second image's outputs take the next n seeds: its first one is seed 5 + 2 made alone.
    later = decode(edit(http, ("image", ("b.png", png(noise(2)))), size="64x64", seed=7).json()["data"][0]["b64_json"])
    assert_same_image(got[2], later)


def test_the_input_image_matters_and_is_deterministic_alone_or_batched(http):
    bodies = [("image", ("a.png", png(noise(1)))), ("image", ("b.png", png(noise(2))))]
    a, b = (decode(edit(http, f, size="64x64").json()["data"][0]["b64_json"]) for f in bodies)
    assert np.abs(a.astype(int) - b).mean() > 0.5, "two inputs, one seed: two outputs"
    again = decode(edit(http, bodies[0], size="64x64").json()["data"][0]["b64_json"])
    assert np.array_equal(a, again)
    with ThreadPoolExecutor(3) as pool:  # concurrent compatible edits share a pipeline call
        rs = list(pool.map(lambda f: edit(http, f, size="64x64"), [bodies[0], bodies[1], bodies[0]]))
    assert_same_image(decode(rs[0].json()["data"][0]["b64_json"]), a)
    assert_same_image(decode(rs[1].json()["data"][0]["b64_json"]), b)


def test_sizes_requested_and_auto(http):
    src = ("image", ("wide.png", png(noise(3, size=(100, 80)))))
    r = edit(http, src, size="64x64")
    assert decode(r.json()["data"][0]["b64_json"]).shape == (64, 64, 3)
    auto = edit(http, src, size="auto").json()
    assert auto["size"] == "96x80" and decode(auto["data"][0]["b64_json"]).shape == (80, 96, 3)  # fitted to multiples of 16
    assert edit(http, src).json()["size"] == "96x80"  # no size: the same as auto


def test_stream_edits(sdk):
    events = list(sdk.images.edit(model="tiny-z", image=("a.png", png(noise(1))), prompt="a red fox", size="64x64", stream=True,
                                  partial_images=1, extra_body=FEW))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert events[-1].usage.output_tokens == 16


def test_chat_with_a_data_image_is_an_edit(http, server):
    a = png(noise(1))
    url = "data:image/png;base64," + base64.b64encode(a).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "a red fox"}, {"type": "image_url", "image_url": {"url": url}}]}]
    r = http.post("/v1/chat/completions", json={"messages": messages, "extra_body": {"size": "64x64", **FEW}})
    assert r.status_code == 200, r.text
    got = decode(r.json()["choices"][0]["message"]["content"][0]["image_url"]["url"].split(",", 1)[1])
    want = decode(edit(http, ("image", ("a.png", a)), size="64x64").json()["data"][0]["b64_json"])
    assert np.array_equal(got, want)


def test_chat_remote_images_only_from_allowed_hosts(http):
    served = png(noise(4))

    class One(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(served)))
            self.end_headers()
            self.wfile.write(served)

        def log_message(self, *args):
            pass

    host = ThreadingHTTPServer(("127.0.0.1", 0), One)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        def chat(url):
            return http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
                {"type": "text", "text": "a red fox"}, {"type": "image_url", "image_url": {"url": url}}]}], "extra_body": {"size": "64x64", **FEW}})

        assert_error(chat("http://example.com/a.png"), 400, "does not fetch remote images")
        assert_error(chat("file:///etc/passwd"), 400, "data: URLs")
        ok = chat(f"http://127.0.0.1:{host.server_address[1]}/a.png")  # the test server allows 127.0.0.1
        assert ok.status_code == 200, ok.text
    finally:
        host.shutdown()


def _bomb() -> bytes:
    return png(Image.new("RGB", (1024, 1024)))  # a few KB that decode to 1 megapixel: over the test server's 0.07


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    noise(6).convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("files,data,status,words,param", [
    ([("image", ("x.png", b"not an image at all"))], {}, 400, "not an image", "image"),
    ([("image", ("x.png", png(noise(1))[:200]))], {}, 400, "truncated", "image"),
    ([("image", ("x.png", _bomb()))], {}, 400, "megapixels", "image"),
    ([("image", ("x.png", png(noise(1)))), ("mask", ("m.png", png(alpha_mask((32, 32)))))], {}, 400, "size of the image", "mask"),
    ([("image", ("x.png", png(noise(1)))), ("mask", ("m.png", png(noise(2))))], {}, 400, "alpha", "mask"),
    ([("image[]", (f"{i}.png", png(noise(i, size=(16, 16))))) for i in range(17)], {}, 400, "at most 16", "image"),
    ([], {}, 400, "send the image", "image"),
    ([("image", ("x.png", png(noise(1))))], {"strength": "1.5"}, 422, "strength", "strength"),
    ([("image", ("x.png", png(noise(1))))], {"strength": "nan"}, 422, "strength", "strength"),
    ([("image", ("x.png", png(noise(1))))], {"strength": "0"}, 400, "no step to run", "strength"),
    ([("image", ("x.png", png(noise(1))))], {"n": "eleven"}, 422, "n", "n"),
])
def test_bad_edit_inputs_are_4xx_and_the_server_keeps_serving(http, files, data, status, words, param):
    body = assert_error(edit(http, *files, **data), status, words)
    assert body["error"]["param"] == param, body
    assert edit(http, ("image", ("a.png", png(noise(1)))), size="64x64").status_code == 200


def test_odd_modes_are_converted_and_a_body_over_the_limit_is_413(http):
    for data in (_cmyk_jpeg(), png(noise(1).convert("P")), png(noise(1, mode="RGBA")), png(noise(1).convert("LA")),
                 png(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)))):
        r = edit(http, ("image", ("odd", data)), size="64x64")
        assert r.status_code == 200, r.text
    big = edit(http, ("image", ("big.png", b"\0" * (3 << 20))))
    assert_error(big, 413)


def test_edits_without_a_vae_encoder_engine_say_what_to_build(built, tmp_path):
    _, engine_dir, _ = built("z-image")
    old = _copy_without(engine_dir, tmp_path / "t2i", "vae_encoder")
    rt = load_runtime(None, old, "onnxruntime")
    with live_server(lambda: rt) as live, live.client() as c:
        assert c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "num_inference_steps": 2}).status_code == 200
        r = c.post(EDIT, data={"prompt": "x", "size": "64x64"}, files=[("image", ("a.png", png(noise(1))))])
        assert_error(r, 501, "--components vae_encoder")
