"""What a careless or hostile client sends, against a real uvicorn server: one bad request never
fails another, no client input reaches a 500, error bodies hold no internals, every request's
cost is bounded, and the limits an operator sets are enforced before the work starts."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from omni_trt.errors import EngineDirError
from omni_trt.runtime.loader import load_runtime
from omni_trt.runtime.request import ImageAsk, resolve
from serving import counting_steps, live_server, wait_until
from test_server import SMALL, assert_error, assert_same_image, decode

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def server(runtime):
    """`http` (conftest.py) is a client of this server."""
    with live_server(lambda: runtime, served_model_name="tiny-z", max_batch_size=4, max_megapixel_steps=64.0) as live:
        yield live


def post_raw(http, path: str, text: str):
    return http.post(path, content=text.encode(), headers={"content-type": "application/json"})


# ---- one bad request never fails another ----


def test_a_request_that_fails_its_batch_fails_alone(runtime, caplog):
    """A fault tied to one request's input (here: one prompt the text encoder chokes on, as a
    tokenizer TypeError did) fails that request only; the three it was batched with get 200 and
    their solo images."""
    real = runtime.pipe.encode_prompt

    def encode(prompt, *args, **kwargs):
        if any("POISON" in p for p in ([prompt] if isinstance(prompt, str) else prompt)):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return real(prompt, *args, **kwargs)

    runtime.pipe.encode_prompt = encode
    bodies = [{"prompt": "a POISON fox", "seed": 1, **SMALL}] + [{"prompt": f"good fox {i}", "seed": 10 + i, **SMALL} for i in range(3)]
    try:
        with live_server(lambda: runtime, max_batch_size=4) as live, live.client() as c, ThreadPoolExecutor(5) as pool:
            runtime._lock.acquire()  # hold the worker inside a first request, so the four queue behind it and batch together
            try:
                busy = pool.submit(c.post, GEN, json={"prompt": "busy", **SMALL, "size": "64x128"})
                wait_until(lambda: live.state.scheduler.in_flight == 1, 30, "the worker to take the first request")
                futures = [pool.submit(c.post, GEN, json=b) for b in bodies]
                wait_until(lambda: live.state.scheduler.depth() == 4, 30, "four queued requests")
            finally:
                runtime._lock.release()
            with caplog.at_level(logging.WARNING, logger="omni_trt.server.scheduler"):
                responses = [f.result() for f in futures]
            assert busy.result().status_code == 200
    finally:
        runtime.pipe.encode_prompt = real
    bad = assert_error(responses[0], 500, "internal error")
    assert "TypeError" not in responses[0].text and "TextEncodeInput" not in responses[0].text
    assert re.search(r"request [0-9a-f]{32}", bad["error"]["message"])
    assert any("running them one by one" in r.getMessage() for r in caplog.records), "the batch was not retried per request"
    for body, r in zip(bodies[1:], responses[1:]):
        assert r.status_code == 200, r.text
        solo = runtime.generate([resolve(runtime.family, ImageAsk(body["prompt"], size="64x64", steps=2, seed=body["seed"]))]).images[0][0]
        assert_same_image(decode(r.json()["data"][0]["b64_json"]), solo)


# ---- client input never reaches a 500 ----

BAD_RAW = [
    ('{"prompt": "a \\ud800 fox", "size": "64x64", "num_inference_steps": 2}', 422, "prompt"),
    ('{"prompt": "x", "negative_prompt": "\\udfff"}', 422, "negative_prompt"),
    ('{"prompt": "x", "guidance_scale": NaN}', 422, "guidance_scale"),
    ('{"prompt": "x", "true_cfg_scale": Infinity}', 422, "true_cfg_scale"),
    ('{"prompt": "x", "guidance_scale": -Infinity}', 422, "guidance_scale"),
    ('{"prompt": "x", "guidance_scale": 1e999}', 422, "guidance_scale"),
    ('{"prompt": "x", "num_inference_steps": NaN}', 422, "num_inference_steps"),
    ('{"prompt": "x", "seed": 1e999}', 422, "seed"),
    ('{"prompt": "x", "n": Infinity}', 422, "n"),
    ('{"prompt": "x", "output_compression": NaN}', 422, "output_compression"),
    ('{"prompt": "x", "n": true}', 422, "n"),
    ('{"prompt": "x", "n": "2"}', 422, "n"),
    ('{"prompt": "x", "seed": true}', 422, "seed"),
    ('{"prompt": "x", "guidance_scale": "3.5"}', 422, "guidance_scale"),
    ('{"prompt": "x", "n": 2.0}', 422, "n"),
    ('{"prompt": "x", "size": "\\u00b2x\\u00b2"}', 400, "size"),
    ('{"prompt": "x", "size": "\\u0664\\u0664x\\u0664\\u0664"}', 400, "size"),
    ('{"prompt": "x", "size": "' + "9" * 5000 + 'x64"}', 400, "size"),
    ('{"prompt": "x", "user": 5}', 422, "user"),
]


@pytest.mark.parametrize("text,status,param", BAD_RAW, ids=[b[0][:40] for b in BAD_RAW])
def test_bad_input_is_a_4xx_naming_the_field(http, text, status, param):
    r = post_raw(http, GEN, text)
    body = assert_error(r, status)
    assert body["error"]["param"] == param, body
    json.loads(r.text)  # strict JSON: no NaN echoed back
    assert http.post(GEN, json={"prompt": "still serving", **SMALL}).status_code == 200


def test_prompts_the_model_cannot_read_are_400s_before_they_are_queued(server, http):
    """The demo Z-Image's RoPE table (axes_lens 512) takes captions of 480 tokens: a longer prompt
    was an IndexError deep in the transformer. Now it is a 400 that says the limit."""
    card = http.get("/v1/models").json()["data"][0]
    most = card["max_prompt_tokens"]
    assert most == 480
    runtime = server.state.runtime
    words = ["fox"] * most
    while runtime.prompt_tokens(" ".join(words)) > most:
        words.pop()
    fits = " ".join(words)
    assert http.post(GEN, json={"prompt": fits, **SMALL}).status_code == 200
    too_long = fits + " fox fox"
    assert_error(http.post(GEN, json={"prompt": too_long, **SMALL}), 400, f"at most {most}")
    # The same for a chat of many messages, named by its field; and a prompt far too long to tokenize.
    chat = {"messages": [{"role": "user", "content": "a red fox " * 20}] * 30, "extra_body": SMALL}
    body = assert_error(http.post("/v1/chat/completions", json=chat), 400, "tokens")
    assert body["error"]["param"] == "messages"
    huge = assert_error(http.post(GEN, json={"prompt": "x" * 200_000, **SMALL}), 400, "characters")
    assert huge["error"]["param"] == "prompt"
    assert http.post(GEN, json={"prompt": "after", **SMALL}).status_code == 200


def test_the_cost_cap_names_what_to_lower(http):
    body = assert_error(http.post(GEN, json={"prompt": "x", "n": 4, "size": "1024x1024", "num_inference_steps": 50}), 400, "megapixel-steps")
    assert body["error"]["param"] == "n" and "64" in body["error"]["message"]


# ---- limits enforced before the body is read ----


def test_api_key_and_body_limits_come_before_the_body(runtime):
    # Small limits, so every body here fits in the sockets' buffers whether or not it is read.
    with live_server(lambda: runtime, api_key="sekret", max_body_bytes=64 << 10, body_timeout_s=0.5) as live, live.client() as c:
        big = b"{" + b" " * (200 << 10) + b"}"
        # Unauthenticated: 401 whatever the body (malformed or huge), never a 422 or a read.
        assert_error(c.post(GEN, content=b"{not json", headers={"content-type": "application/json"}), 401, "API key")
        assert_error(c.post(GEN, content=big, headers={"content-type": "application/json"}), 401)
        assert_error(c.post(GEN, json={"prompt": "x"}, headers={"Authorization": "Bearer sekre"}), 401)
        auth = {"Authorization": "Bearer sekret", "content-type": "application/json"}
        assert_error(c.post(GEN, content=big, headers=auth), 413, "0.0625 MB")

        def chunks():
            for _ in range(4):
                yield b" " * (30 << 10)

        assert_error(c.post(GEN, content=chunks(), headers=auth), 413)  # chunked: no Content-Length
        # A body that stalls is cut off with 408.
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
            reply = _read_response(s)
        assert reply.startswith("HTTP/1.1 408") and '"code":408' in reply.replace(" ", "")
        assert c.post(GEN, json={"prompt": "ok", **SMALL}, headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    import argparse

    from omni_trt.cli import API_KEY_ENV, api_key
    from omni_trt.errors import UsageError

    key_file = tmp_path / "key"
    key_file.write_text("from-file\nignored second line\n")
    ns = lambda **kw: argparse.Namespace(**{"api_key": None, "api_key_file": None, **kw})  # noqa: E731
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key(ns()) == "from-env"
    assert api_key(ns(api_key_file=str(key_file))) == "from-file"
    assert api_key(ns(api_key="flag", api_key_file=str(key_file))) == "flag"
    monkeypatch.delenv(API_KEY_ENV)
    assert api_key(ns()) is None
    with pytest.raises(UsageError, match="--api-key-file"):
        api_key(ns(api_key_file=str(tmp_path / "missing")))


def test_user_fields_cannot_forge_log_lines(http, caplog):
    with caplog.at_level(logging.INFO, logger="omni_trt.server.serving"):
        assert http.post(GEN, json={"prompt": "x", "user": "bob\n2026-01-01 INFO forged", **SMALL}).status_code == 200
    lines = [r.getMessage() for r in caplog.records if "user=" in r.getMessage()]
    assert lines and all("\n" not in m for m in lines) and any("bob\\n2026" in m for m in lines)


# ---- deadlines stop the work ----


def test_a_request_past_its_deadline_gets_504_and_its_work_stops(runtime):
    with counting_steps(runtime) as steps:
        with live_server(lambda: runtime, request_timeout_s=0.5) as live, live.client() as c:
            body = {"prompt": "slow", "size": "256x256", "num_inference_steps": 200}
            assert_error(c.post(GEN, json=body), 504, "longer than")
            wait_until(lambda: live.state.scheduler.idle(), 30, "the worker to stop")
            # 200 steps asked for; the step callback stopped it long before.
            assert 0 < len(steps) < 200, len(steps)
            assert 'omni_requests_cancelled_total{reason="deadline",where="running"} 1.0' in c.get("/metrics").text
            assert c.post(GEN, json={"prompt": "next", **SMALL}).status_code == 200


# ---- broken engine dirs are refused with what is wrong and the rebuild command ----


@pytest.mark.parametrize("break_it,words", [
    (lambda m: m["components"]["transformer"]["points"]["max"].update(foo=1), "points.max.foo"),
    (lambda m: m["components"]["transformer"].update(points=None), "points"),
    (lambda m: m.update(components={}), "components"),
    (lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0" * 64, "size": 1}}), "inside the engine dir"),
    (lambda m: m["components"]["vae_decoder"]["onnx"].update(path="/etc/passwd"), "inside the engine dir"),
])
def test_malformed_manifests_are_refused_with_the_rebuild_command(built, tmp_path, break_it, words):
    _, engine_dir, _ = built("z-image")
    copy = tmp_path / "e"
    shutil.copytree(engine_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    break_it(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineDirError) as e:
        load_runtime(None, copy, "onnxruntime")
    assert words in str(e.value) and "omni build-engine" in str(e.value) and "--force" in str(e.value)


def test_serve_refuses_a_malformed_manifest_before_listening(built, tmp_path):
    _, engine_dir, _ = built("z-image")
    copy = tmp_path / "e"
    shutil.copytree(engine_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["components"] = {}
    (copy / "manifest.json").write_text(json.dumps(m))
    r = subprocess.run([sys.executable, "-m", "omni_trt", "serve", "--engine-dir", str(copy), "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "components" in r.stderr and "omni build-engine" in r.stderr and "Traceback" not in r.stderr


# ---- shutdown with a backlog ----


def test_shutdown_answers_every_queued_request_in_the_error_shape(tiny_dir, tmp_path):
    """SIGINT with a backlog: new requests get 503, the backlog gets --drain-timeout to finish,
    what is left gets 503 in the error shape; nothing is lost, nothing hangs, no traceback, and
    the exit status is 130, a Ctrl-C's (uvicorn raises the signal it caught once the server is
    down; `omni` answers the KeyboardInterrupt with 130, as the README says)."""
    import httpx

    from serving import free_port

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    env = {**__import__("os").environ, "OMNI_TRT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "omni_trt", "serve", str(tiny_dir("z-image")), "--port", str(port), "--max-batch-size", "1",
                             "--drain-timeout", "1.5", "--max-queue", "64"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _status(f"{url}/health") == 200, 180, "the demo server")
        body = {"prompt": "a queued fox", "size": "256x256", "num_inference_steps": 8}  # 24 of them: far more than the drain
        results: list = [None] * 24
        with httpx.Client(timeout=120) as c, ThreadPoolExecutor(24) as pool:
            def send(i: int) -> None:
                try:
                    results[i] = c.post(f"{url}{GEN}", json={**body, "seed": i})
                except httpx.HTTPError as e:  # a refused connection after the close is an answer too
                    results[i] = e

            futures = [pool.submit(send, i) for i in range(24)]
            # One answered (the server is warm), and a backlog behind it.
            wait_until(lambda: any(r is not None for r in results) and _queue(url) >= 10, 120, "a backlog")
            proc.send_signal(__import__("signal").SIGINT)
            wait_until(lambda: _status(f"{url}/health") == 503, 10, "health to say shutting down")
            late = c.post(f"{url}{GEN}", json=body)
            assert_error(late, 503, "shutting down")
            for f in futures:
                f.result(timeout=120)
        code = proc.wait(timeout=60)
        assert code == 130, (code, (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    statuses = [r.status_code if hasattr(r, "status_code") else type(r).__name__ for r in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for r in results:
        if r.status_code == 503:
            assert_error(r, 503, "shutting down")
    text = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in text and "never retrieved" not in text, text[-3000:]


def _read_response(s: socket.socket) -> str:
    """One whole HTTP response off a raw socket (headers, then Content-Length bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    while len(body) < length:
        body += s.recv(65536)
    return (head + b"\r\n\r\n" + body).decode()


def _status(url: str) -> int | None:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _queue(url: str) -> float:
    import httpx

    m = re.search(r"^omni_queue_depth (\S+)", httpx.get(f"{url}/metrics", timeout=2).text, re.M)
    return float(m.group(1)) if m else 0.0


def test_the_exit_status_follows_the_signal_that_stopped_the_server():
    """Not only through uvicorn's re-raised signal: asyncio's runner can take a SIGINT that lands as
    its main task finishes as a cancellation, and run() then returns normally (exit 0 seen under
    load). The status comes from the signal the server caught."""
    import signal

    import uvicorn

    from omni_trt.server.run import DrainingServer

    server = DrainingServer(uvicorn.Config(lambda *a: None), serving=None)
    assert server.exit_status() == 0
    server._captured_signals.append(signal.SIGINT)
    assert server.exit_status() == 130
    server._captured_signals[:] = [signal.SIGTERM, signal.SIGINT]  # the first one stopped it
    assert server.exit_status() == 143
