"""LoRA adapters per request, against a real server on the tiny Z-Image (torch runtime): adapters
made with PEFT and saved with the pipeline's save_lora_weights, registered at start or loaded from
--lora-dir; the OpenAI SDK and httpx as clients. Its own runtime: adapters change the transformer
that the session's shared `runtime` must keep plain."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from omni_trt.demo.lora import make_adapter
from omni_trt.models import FAMILIES
from serving import live_server
from test_lora_parsing import kohya_copy
from test_server import assert_same_image

SMALL = {"size": "64x64", "num_inference_steps": 2, "seed": 7, "prompt": "a red circle"}


def pixels(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).convert("RGB"))


def changed(a: np.ndarray, b: np.ndarray) -> bool:
    """Different by more than assert_same_image's rounding allowance."""
    return bool(np.abs(a.astype(int) - b.astype(int)).max() > 1)


@pytest.fixture(scope="module")
def lora_dir(tiny_dir, tmp_path_factory):
    """--lora-dir with adapters a, b (registered at start), c (loaded by path) and c's layers as a
    kohya-style file, a pickle, a file that is no adapter and one whose shapes do not fit."""
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from omni_trt.demo.lora import make_adapter

    root = tmp_path_factory.mktemp("loras")
    pipe = DiffusionPipeline.from_pretrained(tiny_dir("z-image"), dtype=torch.float32)
    for seed, name in enumerate(("a", "b", "c"), start=1):
        make_adapter(pipe, root / name, seed=seed)
    kohya_copy(root / "c" / "pytorch_lora_weights.safetensors", root / "kohya.safetensors")
    (root / "evil.bin").write_bytes(b"pickle")
    save_file({"x": torch.zeros(2)}, str(root / "noise.safetensors"))
    save_file({"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 63),
               "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(64, 4)}, str(root / "misfit.safetensors"))
    return root


@pytest.fixture(scope="module")
def lora_runtime(tiny_dir, lora_dir):
    from omni_trt.runtime.pipeline import LoadOptions, LoraOptions, load_pipeline

    lora = LoraOptions((("a", str(lora_dir / "a")), ("b", str(lora_dir / "b" / "pytorch_lora_weights.safetensors"))), str(lora_dir),
                       max_per_request=2, loading=True)
    return load_pipeline(str(tiny_dir("z-image")), LoadOptions(lora=lora))


@pytest.fixture(scope="module")
def server(lora_runtime):
    with live_server(lambda: lora_runtime, served_model_name="tiny-z", max_batch_size=4) as live:
        yield live


@pytest.fixture(scope="module")
def base(http) -> np.ndarray:
    return pixels(http.post("/v1/images/generations", json=SMALL))


def test_an_adapter_changes_the_image_and_scale_zero_is_the_base(http, base):
    a = pixels(http.post("/v1/images/generations", json={**SMALL, "lora": {"name": "a"}}))
    assert changed(a, base)
    assert np.array_equal(pixels(http.post("/v1/images/generations", json={**SMALL, "lora": {"name": "a", "scale": 0}})), base)
    half = pixels(http.post("/v1/images/generations", json={**SMALL, "lora": [{"lora_name": "a", "lora_scale": 0.5}]}))
    assert changed(half, base) and changed(half, a)
    assert np.array_equal(pixels(http.post("/v1/images/generations", json={**SMALL, "lora": "a"})), a)  # a bare name
    assert np.array_equal(pixels(http.post("/v1/images/generations", json=SMALL)), base)  # and back: adapters off


def test_order_of_the_list_does_not_matter_and_model_names_an_adapter(http, sdk):
    ab = pixels(http.post("/v1/images/generations", json={**SMALL, "lora": [{"name": "a"}, {"name": "b", "scale": 0.5}]}))
    ba = pixels(http.post("/v1/images/generations", json={**SMALL, "lora": [{"name": "b", "scale": 0.5}, {"name": "a"}]}))
    assert np.array_equal(ab, ba)
    a = pixels(http.post("/v1/images/generations", json={**SMALL, "lora": {"name": "a"}}))
    # vLLM's convention: `model` = an adapter's name is that adapter at scale 1 (the OpenAI SDK here).
    out = sdk.images.generate(model="a", prompt=SMALL["prompt"], size="64x64", extra_body={"num_inference_steps": 2, "seed": 7})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).convert("RGB")), a)


def test_concurrent_requests_with_different_adapters_each_get_their_own_image(server, http, base):
    """Sent together, they are queued together, and never share a batch (the batch key holds
    the adapter set): each image equals the one its adapter set makes alone (to rounding: a batch
    takes other float paths than a single call)."""
    sets = [None, {"name": "a"}, {"name": "b"}, [{"name": "a", "scale": 0.5}, {"name": "b"}]]
    alone = [pixels(http.post("/v1/images/generations", json={**SMALL, "lora": s})) for s in sets]
    assert all(changed(x, y) for i, x in enumerate(alone) for y in alone[i + 1:])
    got: dict[int, np.ndarray] = {}

    def send(i: int) -> None:
        with server.client() as c:
            got[i] = pixels(c.post("/v1/images/generations", json={**SMALL, "lora": sets[i]}))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, want in enumerate(alone):
        assert_same_image(got[i], want)


def test_models_lists_the_adapters_with_their_parent_and_no_path(http, lora_dir):
    cards = http.get("/v1/models").json()["data"]
    by_id = {c["id"]: c for c in cards}
    assert cards[0]["id"] == "tiny-z" and {"a", "b"} <= set(by_id)
    assert by_id["a"]["parent"] == "tiny-z" and by_id["a"]["lora_rank"] == 4 and by_id["a"]["lora_target_layers"] == 16
    assert str(lora_dir) not in json.dumps(cards) and "safetensors" not in json.dumps(cards)
    lora = http.get("/health").json()["lora"]
    assert lora["applied_by"] == "set_adapters" and lora["adapters"] >= 2 and cards[0]["lora"]["applied_by"] == "set_adapters"


@pytest.mark.parametrize("lora, status, words", [
    ({"name": "nobody"}, 400, "unknown lora adapter"),
    ({"name": "a", "scale": "1"}, 422, "number"),
    ({"name": "a", "scale": 9}, 422, "between"),
    ({"name": "a", "scale": float("nan")}, 422, "finite"),
    ([{"name": "a"}, {"name": "b"}, {"name": "c", "path": "c"}], 400, "at most 2"),
    ({"name": "x", "path": "../outside"}, 400, "outside"),
    ({"name": "x", "path": "evil.bin"}, 400, "pickle"),
    ({"name": "x", "path": "noise.safetensors"}, 400, "no LoRA weights"),
    ({"name": "x", "path": "misfit.safetensors"}, 400, "'transformer.layers.0.attention.to_q.lora_A.weight'"),
    ({"name": "a", "path": "c"}, 400, "another file"),
])
def test_refusals_name_lora_and_the_server_keeps_serving(http, base, lora, status, words):
    # json.dumps writes NaN (httpx's json= refuses it); the server's JSON parser takes it, as it would from any client.
    r = http.post("/v1/images/generations", content=json.dumps({**SMALL, "lora": lora}), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == "lora" and words in err["message"], err


def test_after_the_refusals_the_server_serves_the_base_image(http, base):
    assert np.array_equal(pixels(http.post("/v1/images/generations", json=SMALL)), base)


def test_a_path_inside_the_lora_dir_is_loaded_on_first_use_and_kept(http, base):
    c = pixels(http.post("/v1/images/generations", json={**SMALL, "lora": {"name": "c", "lora_path": "c"}}))
    assert changed(c, base)
    assert np.array_equal(pixels(http.post("/v1/images/generations", json={**SMALL, "lora": "c"})), c)
    assert "c" in {m["id"] for m in http.get("/v1/models").json()["data"]}
    kohya = pixels(http.post("/v1/images/generations", json={**SMALL, "lora": {"name": "k", "path": "kohya.safetensors"}}))
    assert changed(kohya, base) and changed(kohya, c)  # c's main-block layers only: another image than c's


def test_load_and_unload_routes(http, base, lora_dir):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(lora_dir / "b")})
    assert r.status_code == 200 and r.json()["id"] == "late" and r.json()["lora_rank"] == 4, r.text
    b = pixels(http.post("/v1/images/generations", json={**SMALL, "lora": "b"}))
    assert np.array_equal(pixels(http.post("/v1/images/generations", json={**SMALL, "model": "late"})), b)
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "b"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    outside = http.post("/v1/load_lora_adapter", json={"lora_name": "o", "lora_path": "/etc"})
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "lora_path"
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).json()["deleted"] is True
    gone = http.post("/v1/images/generations", json={**SMALL, "lora": "late"})
    assert gone.status_code == 400 and gone.json()["error"]["param"] == "lora"
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 404
    assert np.array_equal(pixels(http.post("/v1/images/generations", json=SMALL)), base)


def test_chat_edits_and_streams_take_adapters(http, sdk, base):
    a = pixels(http.post("/v1/images/generations", json={**SMALL, "lora": "a"}))
    params = {"size": "64x64", "num_inference_steps": 2, "seed": 7, "lora": [{"name": "a"}]}
    chat = sdk.chat.completions.create(model="tiny-z", messages=[{"role": "user", "content": SMALL["prompt"]}], extra_body=params)
    url = chat.choices[0].message.content[0]["image_url"]["url"] if isinstance(chat.choices[0].message.content, list) else None
    if url is None:  # the SDK keeps unknown content shapes as the raw JSON
        url = chat.model_dump()["choices"][0]["message"]["content"][0]["image_url"]["url"]
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    assert np.array_equal(img, a)
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, format="PNG")
    form = {"prompt": "a red circle", "size": "64x64", "num_inference_steps": "2", "seed": "7", "strength": "1"}
    plain = pixels(http.post("/v1/images/edits", data=form, files={"image": ("i.png", buf.getvalue(), "image/png")}))
    named = pixels(http.post("/v1/images/edits", data={**form, "lora": "a"}, files={"image": ("i.png", buf.getvalue(), "image/png")}))
    as_json = pixels(http.post("/v1/images/edits", data={**form, "lora": '{"name": "a"}'}, files={"image": ("i.png", buf.getvalue(), "image/png")}))
    assert changed(named, plain) and np.array_equal(named, as_json)
    bad = http.post("/v1/images/edits", data={**form, "lora": "nobody"}, files={"image": ("i.png", buf.getvalue(), "image/png")})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora"
    with http.stream("POST", "/v1/images/generations", json={**SMALL, "lora": "a", "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    done = [e for e in events if e["type"] == "image_generation.completed"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(done[0]["b64_json"]))).convert("RGB")), a)


def test_metrics_count_switches_and_requests_by_adapter(http):
    http.post("/v1/images/generations", json={**SMALL, "lora": "b"})
    text = http.get("/metrics").text
    assert 'omni_lora_requests_total{adapter="b"}' in text
    switches = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("omni_lora_switches_total")]
    assert switches and switches[0] >= 2
    assert "omni_lora_switch_seconds_count" in text


def test_a_server_without_adapters_refuses_the_field_and_hides_the_routes(runtime):
    with live_server(lambda: runtime, served_model_name="plain") as live, live.client() as c:
        r = c.post("/v1/images/generations", json={**SMALL, "lora": "a"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora"
        assert c.post("/v1/images/generations", json={**SMALL, "lora": []}).status_code == 200
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a"}).status_code == 404
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 404
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["plain"]


def test_batch_key_holds_the_adapter_set():
    from omni_trt.runtime.request import GenerationRequest

    plain = GenerationRequest("p", 64, 64, 2, 1)
    a = GenerationRequest("p", 64, 64, 2, 1, lora=(("a", 1.0),))
    assert plain.batch_key() != a.batch_key() != GenerationRequest("p", 64, 64, 2, 1, lora=(("a", 0.5),)).batch_key()
    assert a.batch_key() == GenerationRequest("q", 64, 64, 2, 9, lora=(("a", 1.0),)).batch_key()


def test_bad_lora_flags_are_refused_before_serving(lora_dir):
    from omni_trt.cli import build_parser, lora_options
    from omni_trt.errors import UsageError

    for flags, words in ((["--lora-modules", "a"], "NAME=PATH"), (["--enable-lora-loading"], "--lora-dir"),
                         (["--lora-modules", "a=x", "a=y"], "twice"), (["--lora-dir", str(lora_dir / "evil.bin")], "not a folder"),
                         (["--enable-lora-loading", "--lora-dir", str(lora_dir), "--replicas", "2"], "--replicas")):
        with pytest.raises(UsageError) as e:
            lora_options(build_parser().parse_args(["serve", *flags]))
        assert words in e.value.message, (flags, e.value.message)
    assert lora_options(build_parser().parse_args(["serve"])) is None  # no flag: no `lora` field served


def test_omni_serve_flags(tiny_dir, lora_dir, tmp_path):
    """The command line reaches a real `omni serve`: --lora-modules (adapter cards, a request naming
    one), --lora-dir and --enable-lora-loading (the load route)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from serving import free_port

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "omni_trt", "serve", str(tiny_dir("z-image")), "--port", str(port), "--served-model-name",
                             "tiny", "--preview-decoder", "full", "--lora-modules", f"a={lora_dir / 'a'}", "--lora-dir", str(lora_dir),
                             "--enable-lora-loading"], env={**os.environ, "OMNI_TRT_CACHE": str(tmp_path)}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=60) as c:
            assert [(m["id"], m.get("parent")) for m in c.get("/v1/models").json()["data"]] == [("tiny", None), ("a", "tiny")]
            assert c.post("/v1/images/generations", json={**SMALL, "model": "a"}).status_code == 200
            assert c.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "b"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        log.close()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_takes_adapters_on_torch(family, tiny_pipeline, tmp_path):
    """Each family's own loader mixin reads an adapter of its transformer (the family's lora_targets),
    the registry checks it, and the runtime's switch puts it into the transformer: its output moves
    (the family's export reference case, not a whole generation: cheaper, the same layers)."""
    import torch

    from omni_trt.compiler.export import sample_points
    from omni_trt.lora import Registry
    from omni_trt.runtime.adapters import TorchAdapters, weight_shapes

    make_adapter(tiny_pipeline(family), tmp_path / "a", seed=1)
    pipe = tiny_pipeline(family)
    registry = Registry(type(pipe), weight_shapes(pipe.transformer), tmp_path)
    assert registry.load("a", "a").card()["target_layers"] > 0
    spec = FAMILIES[family].components["transformer"]

    def output() -> torch.Tensor:
        case = spec.reference_case(pipe.transformer, sample_points(FAMILIES[family])[0], torch.float32, torch.Generator().manual_seed(0))
        return next(iter(case.expected.values()))

    base = output()
    TorchAdapters(pipe, registry).activate((("a", 1.0),))
    assert (output() - base).abs().max() > 1e-3 * base.abs().max()  # far above fp32 rounding (~1e-7 relative)
