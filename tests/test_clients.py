"""Clients no one here wrote, against a real uvicorn server: the OpenAI SDK's chat stream and `n`,
dall-e-3's fields, vLLM-Omni's benchmark's model name "default"; and raw sockets that hold
connections open, send huge headers or stop mid-request."""

from __future__ import annotations

import io
import json
import logging
import re
import select
import shutil
import signal
import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from omni_trt.cli import main
from omni_trt.enginedir import Manifest
from omni_trt.errors import EngineDirError
from omni_trt.runtime.loader import load_runtime
from omni_trt.runtime.request import ImageAsk, resolve
from omni_trt.server.app import create_app
from omni_trt.server.contract import ServerOptions
from omni_trt.server.run import NetOptions, make_server
from omni_trt.server.serving import ImageServing
from serving import counting_steps, free_port, live_server, wait_until
from test_server import SMALL, assert_error, assert_same_image, decode, from_data_url

CHAT = "/v1/chat/completions"
GEN = "/v1/images/generations"
FEW = {"size": "64x64", "num_inference_steps": 2}
EDIT_FEW = {"num_inference_steps": 4, "seed": 5}


@pytest.fixture(scope="module")
def server(runtime):
    """`http` and `sdk` (conftest.py) are clients of this server."""
    with live_server(lambda: runtime, served_model_name="tiny-z", keepalive_s=0.2) as live:
        yield live


def solo(runtime, prompt: str, seed: int, n: int = 1):
    return runtime.generate([resolve(runtime.family, ImageAsk(prompt, size="64x64", steps=2, seed=seed, n=n))]).images[0]


def parts_of(content) -> list:
    """The SDK types message content as a string; the image parts come through as parsed JSON."""
    return content if isinstance(content, list) else []


# ---- 1. chat stream: true ----


def test_the_sdk_streams_a_chat_as_chunks(sdk, runtime):
    stream = sdk.chat.completions.create(model="tiny-z", messages=[{"role": "user", "content": "a lighthouse"}], stream=True,
                                         stream_options={"include_usage": True}, n=2, extra_body={**FEW, "seed": 7})
    chunks = list(stream)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-") and chunks[0].model == "tiny-z"
    assert sorted(c.index for c in chunks[0].choices if c.delta.role == "assistant") == [0, 1]
    images: dict[int, list] = {0: [], 1: []}
    for c in chunks:
        for choice in c.choices:
            images[choice.index] += parts_of(choice.delta.content)
    finished = [ch.index for c in chunks for ch in c.choices if ch.finish_reason == "stop"]
    assert sorted(finished) == [0, 1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 0
    expected = solo(runtime, "a lighthouse", 7, n=2)
    for i in (0, 1):  # choice i: seed 7 + i
        assert len(images[i]) == 1
        assert_same_image(from_data_url(images[i][0]["image_url"]["url"]), expected[i])


def test_a_chat_stream_ends_with_done_and_its_refusals_are_json(server, http):
    with http.stream("POST", CHAT, json={"messages": [{"role": "user", "content": "x"}], "stream": True, **FEW}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and not any(line.startswith("event:") for line in lines)
    bad = http.post(CHAT, json={"messages": [{"role": "user", "content": "x"}], "stream": True, "size": "65x64"})
    assert bad.headers["content-type"].startswith("application/json")
    assert_error(bad, 400, "multiples of 16")


def test_a_client_that_leaves_a_chat_stream_stops_its_work(server, runtime, http):
    with counting_steps(runtime) as steps:
        body = {"messages": [{"role": "user", "content": "slow"}], "stream": True, "size": "256x256", "num_inference_steps": 200}
        with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", CHAT, json=body) as r:
            for _ in r.iter_lines():  # the role chunk, then keep-alives
                if steps:
                    break  # work began; now leave
        wait_until(lambda: server.state.scheduler.idle(), 30, "the worker to stop")
        assert 0 < len(steps) < 200, len(steps)
    assert http.post(GEN, json={"prompt": "next", **SMALL}).status_code == 200


# ---- 2. chat n ----


def test_chat_n_is_the_number_of_choices(sdk, runtime):
    chat = sdk.chat.completions.create(model="tiny-z", messages=[{"role": "user", "content": "a boat"}], n=3,
                                       extra_body={**FEW, "seed": 11})
    assert [c.index for c in chat.choices] == [0, 1, 2]
    expected = solo(runtime, "a boat", 11, n=3)
    for c, want in zip(chat.choices, expected):
        parts = parts_of(c.message.content)
        assert len(parts) == 1 and c.finish_reason == "stop"
        assert_same_image(from_data_url(parts[0]["image_url"]["url"]), want)
    # vLLM-Omni's num_outputs_per_prompt keeps its meaning: images in one message.
    one = sdk.chat.completions.create(model="tiny-z", messages=[{"role": "user", "content": "a boat"}],
                                      extra_body={**FEW, "seed": 11, "num_outputs_per_prompt": 2})
    assert len(one.choices) == 1 and len(parts_of(one.choices[0].message.content)) == 2


# ---- 3. model "default" ----


def test_default_is_an_alias_of_the_served_model_but_not_listed(sdk, http):
    res = sdk.images.generate(model="default", prompt="a cat", size="64x64", extra_body={"num_inference_steps": 2})
    assert len(res.data) == 1
    chat = sdk.chat.completions.create(model="default", messages=[{"role": "user", "content": "a cat"}], extra_body=FEW)
    assert chat.model == "tiny-z"
    assert [m.id for m in sdk.models.list().data] == ["tiny-z"]
    with pytest.raises(openai.BadRequestError) as e:
        sdk.images.generate(model="dall-e-3", prompt="a cat", size="64x64")
    assert e.value.body["param"] == "model"


# ---- 4. dall-e-3's quality and style ----


def test_dall_e_3_quality_and_style(sdk, runtime):
    steps = runtime.family.defaults.steps
    for quality, share in (("standard", "medium"), ("hd", "high")):
        with counting_steps(runtime) as counted:
            res = sdk.images.generate(model="tiny-z", prompt="a hill", size="64x64", quality=quality, style="vivid", extra_body={"seed": 1})
        want = resolve(runtime.family, ImageAsk("a hill", quality=share)).steps
        assert res.quality == share and len(counted) == want, (quality, len(counted), want, steps)
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.images.generate(model="tiny-z", prompt="a hill", size="64x64", style="loud")  # type: ignore[arg-type]


# ---- 9-11. one rule per field on every route ----

EDIT = "/v1/images/edits"


def image_bytes(fmt: str, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, format=fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that states its size and holds no pixels (an empty IDAT)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_malformed_json_bodies_are_422_with_the_error_shape(http):
    for raw in (b'{"prompt": "\xff\xfe"}', b"[" * 10_000 + b"]" * 10_000):
        r = http.post(GEN, content=raw, headers={"content-type": "application/json"})
        assert_error(r, 422, "not valid JSON")


def test_each_field_has_one_rule_on_every_route(http):
    chat = {"messages": [{"role": "user", "content": "x"}]}
    r = http.post(GEN, content=b'{"prompt": "x", "user": "\\ud800", "size": "64x64"}', headers={"content-type": "application/json"})
    assert assert_error(r, 422, "unpaired surrogate")["error"]["param"] == "user"
    for size in (" 64x64", "64x64 "):
        assert assert_error(http.post(GEN, json={"prompt": "x", "size": size}), 400, "expected 'WxH'")["error"]["param"] == "size"
        assert assert_error(http.post(CHAT, json={**chat, "size": size}), 400, "expected 'WxH'")["error"]["param"] == "size"
        edit = http.post(EDIT, data={"prompt": "x", "size": size}, files=[("image", ("a.png", image_bytes("PNG")))])
        assert assert_error(edit, 400, "expected 'WxH'")["error"]["param"] == "size"
    # An empty or blank prompt: one 422 naming `prompt` with the same words on both image routes (a
    # form's empty field arrives as missing); chat's prompt is its messages' text.
    png = [("image", ("a.png", image_bytes("PNG")))]
    for prompt in ("", "  \n\t"):
        answers = [http.post(GEN, json={"prompt": prompt}), http.post(EDIT, data={"prompt": prompt}, files=png)]
        messages = {assert_error(r, 422, "must not be empty")["error"]["message"] for r in answers}
        assert len(messages) == 1 and all(r.json()["error"]["param"] == "prompt" for r in answers)
        blank_chat = http.post(CHAT, json={"messages": [{"role": "user", "content": prompt or " "}]})
        assert assert_error(blank_chat, 422)["error"]["param"] == "messages"
    # A form field that is not UTF-8 is refused as a JSON body's would be, never read as Latin-1.
    for field in ("prompt", "user"):
        fields = {"prompt": "a red circle", "user": "u"}
        body = b"".join(b"--B\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n" % (k.encode(), b"a \xff\xfe" if k == field else v.encode())
                        for k, v in fields.items())
        body += b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
        body += image_bytes("PNG") + b"\r\n--B--\r\n"
        r = http.post(EDIT, content=body, headers={"content-type": "multipart/form-data; boundary=B"})
        assert assert_error(r, 422, "not valid UTF-8")["error"]["param"] == field
    # A header far past Pillow's own bomb limit gets the megapixel message, as a smaller large one does.
    huge = http.post(EDIT, data={"prompt": "x"}, files=[("image", ("a.png", png_header(20_000, 20_000)))])
    assert assert_error(huge, 400, "megapixels")["error"]["param"] == "image"


def test_only_the_documented_image_formats_are_decoded(http):
    ok = http.post(EDIT, data={"prompt": "x", **{k: str(v) for k, v in EDIT_FEW.items()}}, files=[("image", ("a.webp", image_bytes("WEBP")))])
    assert ok.status_code == 200, ok.text
    for fmt in ("PPM", "PCX", "ICO"):  # formats Pillow reads, which the docs do not list
        r = http.post(EDIT, data={"prompt": "x"}, files=[("image", (f"a.{fmt.lower()}", image_bytes(fmt)))])
        assert assert_error(r, 400, "not an image this server reads")["error"]["param"] == "image", fmt
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n"
    assert_error(http.post(EDIT, data={"prompt": "x"}, files=[("image", ("a.eps", eps))]), 400, "not an image this server reads")


# ---- 12. /openapi.json says what the server enforces ----


def test_openapi_says_what_is_enforced(http):
    schema = http.get("/openapi.json").json()
    c = schema["components"]["schemas"]
    gen = c["ImageGenerationBody"]["properties"]
    assert gen["prompt"]["minLength"] == 1
    seed = next(s for s in gen["seed"]["anyOf"] if s.get("type") == "integer")
    assert seed["maximum"] == 2**63 - 1 and isinstance(seed["maximum"], int)
    body = next(v for k, v in c.items() if k.startswith("Body_edits"))
    assert body["properties"]["mask"]["anyOf"][0]["format"] == "binary"
    assert {"required": ["image"]} in body["anyOf"]
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"408", "413", "504"} <= set(responses), path
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert chat["oneOf"] == [{"$ref": "#/components/schemas/ChatCompletionChunk"}]


# ---- 6-8. connections and shutdown, with raw sockets against `omni serve`'s own server ----


@contextmanager
def net_server(runtime, net: dict | None = None, **options):
    """The app under make_server (omni serve's uvicorn: connection guard, drain), in a thread."""
    app = create_app(ImageServing(ServerOptions(served_model_name="tiny-z", **options), lambda: runtime))
    server = make_server(app, NetOptions(port=free_port(), log_level="warning", **(net or {})))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started and app.state.omni.loaded, 60, "the server")
        yield server, server.config.port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def reply(s: socket.socket) -> tuple[int | None, dict | str | None]:
    """(status, JSON body or text) of one response; (None, None) when the server closed first."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return None, None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        return None, None
    status = int(head.split(b" ")[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def assert_shape(status: int | None, body, want: int, word: str = "") -> None:
    assert status == want, (status, body)
    assert isinstance(body, dict) and body["error"]["code"] == want and word in body["error"]["message"], body


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def test_idle_and_slow_connections_time_out(runtime):
    net = {"header_timeout_s": 2.0, "max_connections": 6}
    with net_server(runtime, net, body_timeout_s=1.0, body_total_timeout_s=2.0) as (_, port):
        t0 = time.monotonic()
        with connect(port) as silent:  # sends nothing: 408, then closed
            assert_shape(*reply(silent), 408, "headers")
            assert silent.recv(65536) == b""
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        with connect(port) as slow:  # headers a line at a time, never finished
            slow.sendall(b"GET /health HTTP/1.1\r\n")
            while not select.select([slow], [], [], 0.4)[0]:  # a line every 0.4 s, until the server answers
                slow.sendall(b"X-Slow: 1\r\n")
                assert time.monotonic() - t0 < 10
            assert_shape(*reply(slow), 408, "headers")
        with connect(port) as trickle:  # a body at a byte per 0.5 s never stalls 1 s, and is cut at 2 s in all
            trickle.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 1000\r\n\r\n")
            t0 = time.monotonic()
            for b in b'{"prompt": "x"':
                trickle.sendall(bytes([b]))
                time.sleep(0.5)
                if select.select([trickle], [], [], 0)[0]:
                    break
            assert_shape(*reply(trickle), 408, "in all")
            assert time.monotonic() - t0 < 5
        # The cap reached by idle sockets: a new client (no key needed for /health) closes the oldest idle one.
        time.sleep(0.2)  # the sockets above are gone
        idle = [connect(port) for _ in range(6)]
        try:
            with connect(port) as c:
                c.sendall(HEALTH)
                status, body = reply(c)
                assert status == 200 and body["status"] == "ok", (status, body)
            # The oldest made room: closed at once, without the 408 the header timeout would send.
            evicted = [s for s in idle if select.select([s], [], [], 0)[0]]
            assert evicted and all(s.recv(65536) == b"" for s in evicted)
        finally:
            for s in idle:
                s.close()


def test_headers_over_the_limit_get_431_before_the_api_key(runtime):
    with net_server(runtime, {"max_header_bytes": 8192}, api_key="sekret") as (_, port):
        with connect(port) as s:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            for _ in range(64):  # 64 KB of headers in 1 KB lines, stopping once the server answers
                if select.select([s], [], [], 0.02)[0]:
                    break
                s.sendall(b"X-Big: " + b"a" * 1024 + b"\r\n")
            assert_shape(*reply(s), 431, "header")
        with connect(port) as s:  # headers under the limit reach the app (and its key check)
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Fine: " + b"a" * 4000 + b"\r\n\r\n")
            assert_shape(*reply(s), 401)


def test_a_second_signal_answers_what_waits_with_503(runtime, caplog):
    def request(size: str) -> bytes:
        body = json.dumps({"prompt": "x", **SMALL, "size": size}).encode()
        return (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    with net_server(runtime, drain_timeout_s=60) as (server, port):
        sched = server.serving.scheduler
        runtime._lock.acquire()  # the worker holds the first request; the rest queue behind it
        sockets = [connect(port)]
        try:
            sockets[0].sendall(request("64x128"))  # another size: never batched with the rest
            wait_until(lambda: sched.in_flight == 1, 30, "the worker to take the first request")
            for _ in range(3):
                sockets.append(connect(port))
                sockets[-1].sendall(request("64x64"))
            wait_until(lambda: sched.depth() == 3, 30, "three queued requests")
            with caplog.at_level(logging.INFO):
                server.handle_exit(signal.SIGINT, None)
                time.sleep(0.5)
                server.handle_exit(signal.SIGINT, None)
                replies = [reply(s) for s in sockets]
        finally:
            runtime._lock.release()
            for s in sockets:
                s.close()
    for status, answer in replies:
        assert_shape(status, answer, 503, "shutting down")
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "CancelledError" not in logged and "Traceback" not in logged


# ---- 13. engine dirs: files only inside, and who built them ----


def _engine_copy(built, tmp_path: Path) -> tuple[Path, Path]:
    model, engine_dir, _ = built("z-image")
    dst = tmp_path / "engines"
    shutil.copytree(engine_dir, dst)
    return model, dst


def test_an_engine_file_symlinked_out_of_the_dir_is_refused(built, tmp_path):
    model, dst = _engine_copy(built, tmp_path)
    rel = Manifest.read(dst).components["transformer"].onnx.path
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(dst / rel, outside)
    (dst / rel).symlink_to(outside)  # the same bytes, so the sha256 still matches: only where it lives is wrong
    assert any("symlink" in p for p in Manifest.read(dst).verify(dst))
    with pytest.raises(EngineDirError, match="symlink"):
        load_runtime(str(model), dst, runtime="onnxruntime")


def test_engine_dir_signatures(built, tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from omni_trt.enginedir.signature import check_signature, sign_engine_dir, signing_key

    def pem(path: Path, key) -> str:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
                         if hasattr(key, "private_bytes") else
                         key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return str(path)

    ours, theirs = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    private, public = pem(tmp_path / "ours.pem", ours), pem(tmp_path / "ours.pub", ours.public_key())
    other = pem(tmp_path / "theirs.pub", theirs.public_key())
    model, dst = _engine_copy(built, tmp_path)
    serve = ["serve", str(model), "--engine-dir", str(dst), "--port", "0"]
    # Unsigned: refused before the server starts.
    assert main([*serve, "--trust-key", public]) == 2 and "not signed" in capsys.readouterr().err
    assert main(["build-engine", str(model), "--engine-dir", str(dst), "--sign-key", public]) == 2  # a public key cannot sign
    assert "not a PEM private key" in capsys.readouterr().err
    sign_engine_dir(dst, signing_key(private))
    assert check_signature(dst, [other, public]) == public
    assert main([*serve, "--trust-key", other]) == 2 and "not signed by a trusted key" in capsys.readouterr().err
    manifest = dst / "manifest.json"  # one byte of the manifest changed: its signature no longer holds
    manifest.write_text(manifest.read_text().replace('"built_at": "', '"built_at": "1', 1))
    with pytest.raises(EngineDirError, match="not signed by a trusted key"):
        check_signature(dst, [public])
