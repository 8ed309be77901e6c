"""Streaming partial images (server-sent events), the gpt-image request fields, and cancelling
work whose client left, through a real uvicorn server and the OpenAI SDK's own stream iterator."""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from omni_trt.models import FAMILIES
from omni_trt.runtime.pipeline import load_pipeline
from omni_trt.runtime.request import ImageAsk, resolve
from serving import counting_steps, live_server, wait_until
from test_server import SMALL, assert_error, decode

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def server(runtime):
    """`http` and `sdk` (conftest.py) are clients of this server."""
    with live_server(lambda: runtime, served_model_name="tiny-z", aliases=("default",), keepalive_s=0.2) as live:
        yield live


def events_of(response: httpx.Response) -> list[tuple[str, object]]:
    """Parse raw SSE framing: ('comment', text) or (event type, parsed data)."""
    out: list[tuple[str, object]] = []
    event = None
    for line in response.iter_lines():
        if line.startswith(":"):
            out.append(("comment", line[1:].strip()))
        elif line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[len("data: "):])))
        else:
            assert line == "", line  # only event, data, comments and the blank line that ends an event
    return out


def test_the_sdk_streams_partial_images_then_the_same_final_image(server, sdk):
    kwargs = dict(model="tiny-z", prompt="a red fox in the snow", size="64x64")
    extra = {"num_inference_steps": 6, "seed": 11}
    stream = sdk.images.generate(**kwargs, stream=True, partial_images=2, extra_body=extra)
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert e.size == "64x64" and e.output_format == "png" and e.background == "opaque" and isinstance(e.created_at, int)
        assert decode(e.b64_json).shape == (64, 64, 3)
    final = decode(events[-1].b64_json)
    assert events[-1].usage.output_tokens == 16 and events[-1].usage.input_tokens > 0
    plain = sdk.images.generate(**kwargs, extra_body=extra)
    assert np.array_equal(final, decode(plain.data[0].b64_json)), "the streamed final image must be the unstreamed one"
    # Partial images are earlier steps' predictions, not the final image sent again.
    gaps = [np.abs(decode(e.b64_json).astype(int) - final).mean() for e in events[:2]]
    assert all(g > 0 for g in gaps) and gaps[1] < gaps[0], gaps


def test_partial_images_zero_gives_only_completed_and_n_gives_an_index_per_image(sdk):
    events = list(sdk.images.generate(model="tiny-z", prompt="a cat", size="64x64", stream=True, partial_images=0,
                                      extra_body={"num_inference_steps": 2, "seed": 1}))
    assert [e.type for e in events] == ["image_generation.completed"]
    events = list(sdk.images.generate(model="tiny-z", prompt="a cat", size="64x64", n=2, stream=True, partial_images=1,
                                      extra_body={"num_inference_steps": 4, "seed": 1}))
    kinds = [(e.type, e.model_extra.get("image_index", getattr(e, "image_index", None))) for e in events]
    assert sorted(kinds) == sorted([("image_generation.partial_image", 0), ("image_generation.partial_image", 1),
                                    ("image_generation.completed", 0), ("image_generation.completed", 1)])
    assert kinds[-1][0] == "image_generation.completed"


def test_raw_sse_framing_and_keep_alives_while_queued(server, runtime):
    body = {"prompt": "a fox", "stream": True, "partial_images": 1, "seed": 3, "size": "64x64", "num_inference_steps": 4}
    runtime._lock.acquire()  # hold the worker: the stream must say it is alive while it waits
    released = threading.Timer(1.0, runtime._lock.release)
    released.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", GEN, json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-request-id"]
            events = events_of(r)
    finally:
        released.join()
    kinds = [k for k, _ in events]
    assert kinds[0] == "comment" and "comment" in kinds[: kinds.index("image_generation.partial_image")]
    assert [k for k in kinds if k != "comment"] == ["image_generation.partial_image", "image_generation.completed"]
    partial, completed = (d for k, d in events if k != "comment")
    assert set(partial) == {"type", "b64_json", "partial_image_index", "image_index", "created_at", "size", "quality", "background", "output_format"}
    assert set(completed) == {"type", "b64_json", "image_index", "created_at", "size", "quality", "background", "output_format", "usage"}
    assert set(completed["usage"]) == {"input_tokens", "input_tokens_details", "output_tokens", "total_tokens"}


@pytest.mark.parametrize("body,status,word", [
    ({"size": "65x64"}, 400, "multiples of 16"),
    ({"partial_images": 4}, 422, "partial_images"),
    ({"background": "transparent"}, 400, "transparent"),
    ({"prompt": "x" * 20_000}, 400, "characters"),
])
def test_invalid_streamed_requests_fail_as_json_before_any_event(http, body, status, word):
    r = http.post(GEN, json={"prompt": "x", "stream": True, **body})
    assert r.headers["content-type"].startswith("application/json")
    assert_error(r, status, word)


def test_a_client_that_leaves_a_stream_stops_its_work(server, runtime, http):
    with counting_steps(runtime) as steps:
        body = {"prompt": "slow", "stream": True, "partial_images": 3, "size": "256x256", "num_inference_steps": 200}
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with c.stream("POST", GEN, json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        break  # saw work begin; now leave
        wait_until(lambda: server.state.scheduler.idle(), 30, "the worker to stop")
        assert 0 < len(steps) < 200, len(steps)
        text = http.get("/metrics").text
        assert 'omni_requests_cancelled_total{reason="disconnect",where="running"} 1.0' in text
        assert http.post(GEN, json={"prompt": "next", **SMALL}).status_code == 200


def test_a_client_that_leaves_a_plain_request_stops_its_work(runtime):
    with counting_steps(runtime) as steps:
        with live_server(lambda: runtime) as live:
            with pytest.raises(httpx.TimeoutException), live.client(timeout=1.0) as c:
                c.post(GEN, json={"prompt": "slow", "size": "256x256", "num_inference_steps": 200})
            wait_until(lambda: live.state.scheduler.idle(), 30, "the worker to stop")
            assert 0 < len(steps) < 200, len(steps)
            assert 'reason="disconnect",where="running"} 1.0' in live.client().get("/metrics").text


# ---- gpt-image fields ----


def test_gpt_image_fields_and_response_fields(server, sdk, runtime):
    res = sdk.images.generate(model="tiny-z", prompt="a boat", size="64x64", quality="low", background="opaque", moderation="low",
                              output_format="jpeg", extra_body={"seed": 4})
    assert res.size == "64x64" and res.quality == "low" and res.background == "opaque" and res.output_format == "jpeg"
    assert res.usage.output_tokens == 16 and res.usage.total_tokens == res.usage.input_tokens + 16
    assert res.usage.input_tokens == runtime.prompt_tokens("a boat")
    # low = a third of Z-Image-Turbo's 9 steps; an explicit num_inference_steps wins over quality.
    assert resolve(runtime.family, ImageAsk("a", quality="low", seed=0)).steps == 3
    low = decode(sdk.images.generate(model="tiny-z", prompt="a boat", size="64x64", quality="low", extra_body={"seed": 4}).data[0].b64_json)
    three = decode(sdk.images.generate(model="tiny-z", prompt="a boat", size="64x64", extra_body={"seed": 4, "num_inference_steps": 3}).data[0].b64_json)
    wins = decode(sdk.images.generate(model="tiny-z", prompt="a boat", size="64x64", quality="high", extra_body={"seed": 4, "num_inference_steps": 3}).data[0].b64_json)
    assert np.array_equal(low, three) and np.array_equal(wins, three)
    auto = sdk.images.generate(model="tiny-z", prompt="a boat", size="auto", quality="low", extra_body={"seed": 4})
    assert auto.size == "1024x1024" and decode(auto.data[0].b64_json).shape == (1024, 1024, 3)
    # The vLLM-Omni benchmark client's "default" is a served name too; the first name is reported.
    assert len(sdk.images.generate(model="default", prompt="x", size="64x64", extra_body={"num_inference_steps": 2}).data) == 1
    assert sdk.models.list().data[0].id == "tiny-z"


@pytest.mark.parametrize("field,value,status", [
    ("quality", "ultra", 422), ("background", "transparent", 400), ("background", "white", 422),
    ("moderation", "high", 422), ("size", "Auto", 400),
])
def test_bad_gpt_image_values(http, field, value, status):
    body = assert_error(http.post(GEN, json={"prompt": "x", field: value, **({} if field == "size" else SMALL)}), status)
    assert body["error"]["param"] == field
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "extra_body": {field: value}})
    assert_error(chat, status)


# ---- previews are the pipeline's own predictions, for every family ----


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_previews_leave_the_final_image_alone_and_the_last_step_is_the_final_image(family, tiny_dir):
    rt = load_pipeline(str(tiny_dir(family)))
    # An edit-only family (Edits.generations False) previews an edit; n as one call of its pipeline takes.
    image = None if rt.family.edits.generations else Image.new("RGB", (64, 64), (200, 40, 40))
    n = min(2, rt.family.call_images or 2)
    req = resolve(rt.family, ImageAsk("a red house", size="64x64", steps=4, n=n, seed=9, partial_images=2), image=image)
    got: list = []
    streamed = rt.generate([req], on_preview=lambda *a: got.append(a))
    plain = rt.generate([resolve(rt.family, ImageAsk("a red house", size="64x64", steps=4, n=n, seed=9), image=image)])
    assert sorted((i, img, p) for i, img, p, _ in got) == [(0, img, p) for img in range(n) for p in (0, 1)]
    assert len(streamed.images[0]) == len(plain.images[0]) == n
    for a, b in zip(streamed.images[0], plain.images[0]):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # The clean prediction at the last step (x_t - sigma_t * v with sigma_next = 0) is exactly the
    # pipeline's final latent: decoded like a preview, it is the final image.
    last: list = []
    rt._call([req], None, {req.steps - 1: [(k, 0, k, 0) for k in range(n)]}, lambda *a: last.append(a))
    assert sorted((i, img) for i, img, _, _ in last) == [(0, k) for k in range(n)], "a preview of each image at the last step"
    for (_, img, _, picture), final in zip(last, plain.images[0]):
        assert np.abs(np.asarray(picture).astype(int) - np.asarray(final).astype(int)).max() <= 1  # PNG-free: same floats, one rounding
