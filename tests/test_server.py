"""The HTTP contract (API.md) against a real uvicorn server on localhost serving tiny pipelines."""

from __future__ import annotations

import base64
import io
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from omni_trt.runtime.pipeline import load_pipeline
from omni_trt.runtime.request import ImageAsk, resolve
from serving import live_server, wait_until

SMALL = {"size": "64x64", "num_inference_steps": 2}


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def assert_same_image(a: np.ndarray, b, tol: int = 1) -> None:
    """Equal up to rounding: a batch of 2 and a batch of 1 take different float paths (CPU
    matmul blocking), which can move a pixel across a rounding boundary."""
    b = np.asarray(b)
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= tol and diff.mean() < 0.05, f"max diff {diff.max()}, mean {diff.mean():.4f}"


def from_data_url(url: str) -> np.ndarray:
    head, b64 = url.split(",", 1)
    assert head == "data:image/png;base64"
    return decode(b64)


@pytest.fixture(scope="module")
def server(runtime):
    """`http` and `sdk` (conftest.py) are clients of this server."""
    with live_server(lambda: runtime, served_model_name="tiny-z", max_batch_size=4, max_queue=64) as live:
        yield live


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and "detail" in body
    for w in words:
        assert w in err["message"], (w, err["message"])
    return body


def test_images_returns_pngs_of_the_size_asked(http):
    r = http.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "seed": 3, "size": "64x96", "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    for item in body["data"]:
        assert item["url"] is None and item["revised_prompt"] is None
        assert base64.b64decode(item["b64_json"]).startswith(b"\x89PNG")
        assert decode(item["b64_json"]).shape == (96, 64, 3)
    a, b = (decode(d["b64_json"]) for d in body["data"])
    assert np.abs(a.astype(int) - b).max() > 0, "two images of one request must differ (different seeds)"
    assert r.headers["x-request-id"]


def test_same_seed_same_image_and_other_formats(http):
    body = {"prompt": "a dog", "seed": 11, **SMALL}
    a = http.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    b = http.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    assert np.array_equal(decode(a), decode(b))
    for fmt, magic in (("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        r = http.post("/v1/images/generations", json={**body, "output_format": fmt, "output_compression": 20})
        assert base64.b64decode(r.json()["data"][0]["b64_json"]).startswith(magic)


def test_request_ids_are_unique_under_concurrency(http):
    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda i: http.post("/v1/images/generations", json={"prompt": "x", "seed": i, **SMALL}).headers["x-request-id"], range(6)))
    assert len(set(ids)) == 6


def test_chat_nested_and_top_level_parameters(http):
    nested = http.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": "a red fox"}],
        "extra_body": {"height": 64, "width": 96, "num_inference_steps": 2, "seed": 42, "num_outputs_per_prompt": 2},
    })
    assert nested.status_code == 200, nested.text
    body = nested.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny-z"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert isinstance(content, list) and len(content) == 2 and content[0]["type"] == "image_url"
    assert from_data_url(content[0]["image_url"]["url"]).shape == (64, 96, 3)
    # The same parameters at the top level (what the OpenAI SDK sends for extra_body=), with
    # the text as a list of parts: same prompt, same seed -> the same image.
    top = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a red fox"}]}],
        "height": 64, "width": 96, "num_inference_steps": 2, "seed": 42,
    })
    img = from_data_url(top.json()["choices"][0]["message"]["content"][0]["image_url"]["url"])
    assert_same_image(img, from_data_url(content[0]["image_url"]["url"]))
    # size wins over height/width
    sized = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "extra_body": {"size": "128x64", "height": 64, "width": 96, "num_inference_steps": 2}})
    assert from_data_url(sized.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]).shape == (64, 128, 3)


def test_models_health_metrics_and_unknown_route(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == "tiny-z" and card["object"] == "model" and card["owned_by"] and isinstance(card["created"], int)
    assert card["runtime"] == "torch" and card["family"] == "z-image" and "multiples of 16" in card["sizes"]
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    for name in ("omni_requests_total", "omni_queue_depth", "omni_queue_wait_seconds", "omni_stage_seconds", "omni_images_generated_total"):
        assert name in text
    for stage in ("text_encode", "denoise", "vae_decode", "encode"):
        assert f'stage="{stage}"' in text
    assert 'route="/v1/images/generations",status="200"' in text
    assert_error(http.get("/v1/nothing"), 404)


BAD_IMAGE_BODIES = [
    ({"size": "64x64"}, 422, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "x", "n": 0}, 422, "n"),
    ({"prompt": "x", "n": 11}, 422, "n"),
    ({"prompt": "x", "response_format": "url"}, 422, "b64_json"),
    ({"prompt": "x", "size": "64"}, 400, "size"),
    ({"prompt": "x", "size": "0x64"}, 400, "size"),
    ({"prompt": "x", "size": "axb"}, 400, "size"),
    ({"prompt": "x", "size": "65x64"}, 400, "multiples of 16"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "64..2048"),
    ({"prompt": "x", "model": "someone-else"}, 400, "tiny-z"),
    ({"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 201}, 422, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": 25}, 422, "guidance_scale"),
    ({"prompt": "x", "true_cfg_scale": -1}, 422, "true_cfg_scale"),
    ({"prompt": "x", "seed": "abc"}, 422, "seed"),
    ({"prompt": "x", "negative_prompt": 3}, 422, "negative_prompt"),
    ({"prompt": "x", "output_format": "gif"}, 422, "output_format"),
]


@pytest.mark.parametrize("body,status,word", BAD_IMAGE_BODIES)
def test_bad_image_requests_get_4xx_and_the_server_keeps_serving(http, body, status, word):
    assert_error(http.post("/v1/images/generations", json=body), status, word)
    assert http.post("/v1/images/generations", json={"prompt": "still here", **SMALL}).status_code == 200


@pytest.mark.parametrize(
    "content,status,word",
    [
        (b"{not json", 422, "JSON"),
        (b"[1, 2]", 422, ""),
        (b'"a string"', 422, ""),
        (b"", 422, ""),
    ],
)
def test_malformed_bodies_are_4xx_never_500(http, content, status, word):
    r = http.post("/v1/images/generations", content=content, headers={"content-type": "application/json"})
    assert_error(r, status, word)
    r = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert_error(r, status)


@pytest.mark.parametrize(
    "body,status,word",
    [
        ({"messages": [{"role": "system", "content": "only system"}]}, 422, "user"),  # no prompt: 422, as an empty one is
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 422, "user"),
        ({"messages": []}, 422, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "extra_body": {"size": "64x65"}}, 400, "size"),
        ({"messages": [{"role": "user", "content": "x"}], "extra_body": {"num_inference_steps": 500}}, 422, "num_inference_steps"),
        ({"messages": [{"role": "user", "content": "x"}], "extra_body": {"num_outputs_per_prompt": 11}}, 422, "num_outputs_per_prompt"),
        ({"messages": [{"role": "user", "content": "x"}], "height": -64}, 422, "height"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "other"}, 400, "tiny-z"),
    ],
)
def test_bad_chat_requests(http, body, status, word):
    assert_error(http.post("/v1/chat/completions", json=body), status, word)
    ok = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "ok"}], "extra_body": SMALL})
    assert ok.status_code == 200


def test_openai_sdk_images_and_chat(sdk):
    client = sdk
    res = client.images.generate(model="tiny-z", prompt="a lighthouse", size="64x64", n=2, response_format="b64_json", extra_body={"seed": 7, "num_inference_steps": 2})
    assert len(res.data) == 2 and decode(res.data[0].b64_json).shape == (64, 64, 3)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-z", prompt="x", size="63x64")  # type: ignore[arg-type]
    assert "size" in str(e.value)
    chat = client.chat.completions.create(model="tiny-z", messages=[{"role": "user", "content": "a lighthouse"}], extra_body={"size": "64x64", "num_inference_steps": 2, "seed": 7})
    content = chat.choices[0].message.content
    # The SDK types content as a string; the image list comes through as parsed JSON.
    parts = content if isinstance(content, list) else chat.choices[0].message.model_extra.get("content", content)
    assert from_data_url(parts[0]["image_url"]["url"]).shape == (64, 64, 3)
    assert_same_image(from_data_url(parts[0]["image_url"]["url"]), decode(res.data[0].b64_json))


def test_concurrent_requests_are_batched_and_equal_to_solo_runs(server, runtime):
    bodies = [{"prompt": f"prompt number {i} " + "word " * (i % 5), "seed": 100 + i, "n": 1 + i % 2, **SMALL} for i in range(14)]
    batches_before = server.state.metrics.batch_images.collect()[0].samples
    count_before = next(s.value for s in batches_before if s.name.endswith("_count"))
    with server.client() as c, ThreadPoolExecutor(14) as pool:
        responses = list(pool.map(lambda b: c.post("/v1/images/generations", json=b), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    samples = server.state.metrics.batch_images.collect()[0].samples
    calls = next(s.value for s in samples if s.name.endswith("_count")) - count_before
    assert calls < len(bodies), "compatible concurrent requests should share pipeline calls"
    for body, r in zip(bodies, responses):
        solo = runtime.generate([resolve(runtime.family, ImageAsk(body["prompt"], size="64x64", steps=2, n=body["n"], seed=body["seed"]))])
        got = [decode(d["b64_json"]) for d in r.json()["data"]]
        assert len(got) == len(solo.images[0]) == body["n"]
        for g, want in zip(got, solo.images[0]):
            assert_same_image(g, want)


def test_full_queue_gets_429_with_retry_after_and_nothing_is_lost(runtime):
    with live_server(lambda: runtime, max_queue=2, max_batch_size=1) as live, live.client() as c:
        with ThreadPoolExecutor(3) as pool:
            runtime._lock.acquire()  # hold the worker inside generate(): the queue can only fill
            try:
                first = pool.submit(c.post, "/v1/images/generations", json={"prompt": "a", **SMALL})
                wait_until(lambda: live.state.scheduler.in_flight == 1, 30, "the worker to take the first job")
                queued = [pool.submit(c.post, "/v1/images/generations", json={"prompt": f"q{i}", **SMALL}) for i in range(2)]
                wait_until(lambda: live.state.scheduler.depth() == 2, 30, "two queued jobs")
                r = c.post("/v1/images/generations", json={"prompt": "one too many", **SMALL})
                assert_error(r, 429, "queue is full")
                assert int(r.headers["retry-after"]) >= 1
            finally:
                runtime._lock.release()
        assert first.result().status_code == 200
        assert all(f.result().status_code == 200 for f in queued)
        assert c.post("/v1/images/generations", json={"prompt": "after", **SMALL}).status_code == 200


def test_client_disconnect_drops_the_queued_request(runtime):
    with live_server(lambda: runtime, max_batch_size=1) as live, live.client() as c:
        with ThreadPoolExecutor(1) as pool:
            runtime._lock.acquire()
            try:
                first = pool.submit(c.post, "/v1/images/generations", json={"prompt": "held", **SMALL})
                wait_until(lambda: live.state.scheduler.in_flight == 1, 30, "the worker to take the first job")
                with pytest.raises(httpx.TimeoutException):
                    with live.client(timeout=0.5) as impatient:
                        impatient.post("/v1/images/generations", json={"prompt": "gone", **SMALL})
                wait_until(lambda: live.state.metrics.dropped._value.get() == 1, 10, "the dropped request to be counted")
                assert live.state.scheduler.depth() == 0
            finally:
                runtime._lock.release()
        assert first.result().status_code == 200
        images_total = live.state.metrics.images._value.get()
        assert images_total == 1, "the dropped request must not have been generated"


def test_api_key_is_required_on_v1_only(runtime):
    with live_server(lambda: runtime, api_key="sekret") as live, live.client() as c:
        assert_error(c.post("/v1/images/generations", json={"prompt": "x", **SMALL}), 401, "API key")
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200
        sdk = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sekret", max_retries=0)
        assert len(sdk.images.generate(model="test-model", prompt="x", size="64x64", extra_body={"num_inference_steps": 2}).data) == 1


def test_503_not_initialized_while_loading_then_ready(runtime):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return runtime

    with live_server(slow_load, wait_ready=False) as live, live.client() as c:
        assert_error(c.get("/health"), 503, "not initialized")
        assert_error(c.post("/v1/images/generations", json={"prompt": "x", **SMALL}), 503, "not initialized")
        assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 503, "not initialized")
        gate.set()
        wait_until(lambda: c.get("/health").status_code == 200, 30, "ready")
        assert c.post("/v1/images/generations", json={"prompt": "x", **SMALL}).status_code == 200


def test_a_load_failure_is_reported_not_hung():
    def broken():
        raise RuntimeError("weights are corrupt")

    with live_server(broken, wait_ready=False) as live, live.client() as c:
        wait_until(lambda: live.state.load_error is not None, 10, "load error")
        assert_error(c.get("/health"), 503, "weights are corrupt")


def test_qwen_image_server_true_cfg_and_chat(tiny_dir):
    runtime = load_pipeline(str(tiny_dir("qwen-image")))
    with live_server(lambda: runtime, served_model_name="tiny-qwen") as live, live.client() as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["family"] == "qwen-image" and card["defaults"]["true_cfg_scale"] == 4.0 and card["defaults"]["num_inference_steps"] == 50
        base = {"prompt": "a teapot", "seed": 5, **SMALL}
        plain = decode(c.post("/v1/images/generations", json=base).json()["data"][0]["b64_json"])
        cfg = decode(c.post("/v1/images/generations", json={**base, "negative_prompt": "blurry", "true_cfg_scale": 4.0}).json()["data"][0]["b64_json"])
        assert np.abs(plain.astype(int) - cfg).max() > 0, "true CFG with a negative prompt must change the image"
        # guidance_scale does not apply to Qwen-Image: ignored, not an error, same image.
        ignored = decode(c.post("/v1/images/generations", json={**base, "guidance_scale": 7.0}).json()["data"][0]["b64_json"])
        assert_same_image(ignored, plain, tol=0)
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a teapot"}], "extra_body": {"seed": 5, "height": 64, "width": 64, "num_inference_steps": 2}})
        assert_same_image(from_data_url(chat.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]), plain)


def test_a_fault_in_the_pipeline_is_a_500_and_the_server_keeps_serving(tiny_dir):
    runtime = load_pipeline(str(tiny_dir("z-image")))
    real = runtime.pipe.vae.decode
    calls = []

    def failing_once(*args, **kwargs):  # e.g. CUDA out of memory in one batch
        if not calls:
            calls.append(1)
            raise RuntimeError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    runtime.pipe.vae.decode = failing_once
    with live_server(lambda: runtime) as live, live.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "x", **SMALL})
        body = assert_error(r, 500, "internal error")
        # What went wrong stays in the log: no exception type or message reaches the client.
        assert "memory" not in r.text and "RuntimeError" not in r.text
        assert re.search(r"request [0-9a-f]{32}", body["error"]["message"])
        assert c.post("/v1/images/generations", json={"prompt": "x", **SMALL}).status_code == 200


def _histogram(metric) -> dict[str, float]:
    """A Prometheus histogram's samples: 'count', 'sum' and 'le=<bound>' -> value."""
    out = {}
    for s in metric.collect()[0].samples:
        kind = s.name.rsplit("_", 1)[1]
        out[f"le={s.labels['le']}" if kind == "bucket" else kind] = s.value
    return out


def test_a_request_larger_than_the_batch_cap_runs_in_chunks_with_the_same_images(runtime):
    solo = runtime  # run again after the server is gone, in one call of 5
    with live_server(lambda: runtime, max_batch_size=2) as live, live.client() as c:
        body = {"prompt": "a kite", "n": 5, "seed": 70, **SMALL}
        got = [decode(d["b64_json"]) for d in c.post("/v1/images/generations", json=body).json()["data"]]
        calls = _histogram(live.state.metrics.batch_images)
    # Three pipeline calls of 2, 2 and 1 images.
    assert len(got) == 5 and (calls["count"], calls["sum"], calls["le=1.0"], calls["le=2.0"]) == (3, 5, 1, 3)
    want = solo.generate([resolve(solo.family, ImageAsk("a kite", size="64x64", steps=2, n=5, seed=70))]).images[0]  # one call of 5
    assert len(want) == 5
    for g, w in zip(got, want):
        assert_same_image(g, w)
