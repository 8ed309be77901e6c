"""`omni serve --replicas 2` on a real local Ray cluster: the single-process server's HTTP contract
(its own tests, run again here against the Ray app), the same images for the same seeds, requests
spread over both replicas, the bounded queue's 429, per-replica metrics, a replica killed under
load (every request answered, the replica replaced), and a graceful Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

pytest.importorskip("ray", reason="Ray Serve is not installed: pip install 'omni-trt[ray]' (make test installs it)")

from serving import free_port, live_server, ray_replica_pids, wait_until  # noqa: E402
from test_server import (  # noqa: E402,F401 - the contract, collected again here with this file's fixtures
    SMALL,
    assert_error,
    assert_same_image,
    decode,
    test_bad_chat_requests,
    test_bad_image_requests_get_4xx_and_the_server_keeps_serving,
    test_chat_nested_and_top_level_parameters,
    test_images_returns_pngs_of_the_size_asked,
    test_malformed_bodies_are_4xx_never_500,
    test_openai_sdk_images_and_chat,
    test_request_ids_are_unique_under_concurrency,
    test_same_seed_same_image_and_other_formats,
)
from test_clients import test_chat_n_is_the_number_of_choices, test_the_sdk_streams_a_chat_as_chunks  # noqa: E402,F401 - chat's n and stream over the replicas

REPLICA = "x-omni-replica"


class RayServer:
    def __init__(self, url: str, proc: subprocess.Popen, log_path, started_s: float, answers: list | None = None) -> None:
        self.url, self.proc, self.log_path, self.started_s = url, proc, log_path, started_s
        self.answers = answers or []  # (seconds since launch, /health response) while it started

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)


def _sigint_default() -> None:
    """In the child, before exec: SIGINT at its default and not blocked. A child inherits an ignored
    or blocked SIGINT, and Python then keeps ignoring it, so a test's Ctrl-C would never reach
    `serve run` (it hung in full-suite runs only)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextmanager
def launched(cmd: list[str], log_path: Path, port: int, env: dict[str, str] | None = None) -> Iterator[RayServer]:
    """A process serving on port; killed with its process group if a test left it up."""
    log = log_path.open("w")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_sigint_default)
    url = f"http://127.0.0.1:{port}"

    answers: list = []

    def up() -> bool:
        assert proc.poll() is None, log_path.read_text()[-4000:]
        try:
            answers.append((time.monotonic() - t0, httpx.get(f"{url}/health", timeout=5)))
        except httpx.HTTPError:
            return False
        return answers[-1][1].status_code == 200

    try:
        wait_until(up, 300, "the Ray app to serve")
        yield RayServer(url, proc, log_path, time.monotonic() - t0, answers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """Two replicas of the tiny Z-Image, one CPU thread each, a small queue (so 429 is reachable),
    and one LoRA adapter registered (every replica loads it)."""
    import torch
    from diffusers import DiffusionPipeline

    from omni_trt.demo.lora import make_adapter

    adapter = make_adapter(DiffusionPipeline.from_pretrained(tiny_dir("z-image"), dtype=torch.float32),
                           tmp_path_factory.mktemp("ray-lora") / "a", seed=1)
    port = free_port()
    cmd = [sys.executable, "-m", "omni_trt", "serve", str(tiny_dir("z-image")), "--replicas", "2", "--threads", "1",
           "--lora-modules", f"a={adapter}",
           "--port", str(port), "--served-model-name", "tiny-z", "--max-queue", "4", "--max-batch-size", "2", "--drain-timeout", "10"]
    with launched(cmd, tmp_path_factory.mktemp("ray") / "serve.log", port) as s:
        yield s  # `http` and `sdk` (conftest.py) are clients of it


def test_it_listens_at_once_and_answers_503_until_the_replicas_are_ready(server):
    """As the single process does: no refused connections while Ray starts, a 503 in the error shape."""
    at, first = server.answers[0]
    assert first.status_code == 503 and first.headers["retry-after"], first.text
    assert assert_error(first, 503, "not initialized")
    assert at < server.answers[-1][0] - 1, [(round(t, 1), r.status_code) for t, r in server.answers]


def test_health_and_models_come_from_a_replica(http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-z" and health["runtime"] == "torch"
    card = http.get("/v1/models").json()["data"][0]
    assert card["id"] == "tiny-z" and card["family"] == "z-image" and card["max_batch"] == 2


def test_lora_adapters_through_the_replicas(http):
    """Adapters per request over Ray: routed by adapter set (multiplexed), the same API and refusals."""
    import numpy as np

    def image(body: dict) -> tuple[np.ndarray, str]:
        r = http.post("/v1/images/generations", json={**SMALL, "prompt": "a red circle", "seed": 3, **body})
        assert r.status_code == 200, r.text
        return decode(r.json()["data"][0]["b64_json"]).astype(int), r.headers[REPLICA]

    base, _ = image({})
    a, first = image({"lora": {"name": "a"}})
    assert np.abs(a - base).max() > 1
    zero, _ = image({"lora": {"name": "a", "scale": 0}})
    assert np.abs(zero - base).max() <= 1
    again, replica = image({"lora": [{"lora_name": "a"}]})  # the same set, canonicalized: the replica that holds it
    assert np.abs(again - a).max() <= 1 and replica == first
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert cards["a"]["parent"] == "tiny-z" and cards["a"]["lora_rank"] == 4
    r = http.post("/v1/images/generations", json={**SMALL, "prompt": "x", "lora": {"name": "nobody"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora" and "unknown lora adapter" in r.json()["error"]["message"], r.text


def test_the_same_images_as_the_single_process_server(http, runtime):
    body = {"prompt": "a lighthouse at dusk", "n": 2, "seed": 21, **SMALL}
    with live_server(lambda: runtime) as live, live.client() as c:
        want = [decode(d["b64_json"]) for d in c.post("/v1/images/generations", json=body).json()["data"]]
    got = [decode(d["b64_json"]) for d in http.post("/v1/images/generations", json=body).json()["data"]]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert_same_image(g, w)  # one thread here, several there: kernels may round differently


def test_requests_are_spread_over_both_replicas_and_metrics_say_so(server, http):
    with ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda i: http.post("/v1/images/generations", json={"prompt": f"spread {i}", "seed": i, **SMALL}), range(12)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    replicas = {r.headers[REPLICA] for r in rs}
    assert len(replicas) == 2, replicas
    # Each replica pushes its metrics about once a second.
    def counted() -> dict[str, float]:
        text = http.get("/metrics").text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r'omni_images_generated_total\{replica="([^"]+)"\} (\S+)', text)}

    wait_until(lambda: set(counted()) >= replicas | {"all"} and counted()["all"] >= 12, 30, "both replicas' metrics")
    c = counted()
    assert c["all"] == sum(v for k, v in c.items() if k != "all")
    text = http.get("/metrics").text
    assert 'omni_requests_total{route="/v1/images/generations",status="200"}' in text  # the ingress's own


def test_streaming_and_edits_through_the_replicas(http, sdk):
    from test_edits import png, noise

    client = sdk
    events = list(client.images.generate(model="tiny-z", prompt="a fox", size="64x64", stream=True, partial_images=1,
                                         extra_body={"num_inference_steps": 4, "seed": 2}))
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    res = client.images.edit(model="tiny-z", image=("a.png", png(noise(1))), prompt="a red fox", size="64x64",
                             extra_body={"num_inference_steps": 6, "seed": 5})
    assert decode(res.data[0].b64_json).shape == (64, 64, 3)
    assert_error(http.post("/v1/images/generations", json={"prompt": "x", "stream": True, "size": "65x64"}), 400, "multiples of 16")


def test_the_bounded_queue_answers_429_across_replicas(http):
    """Two replicas taking 4 queued + 2 running each, Ray's queue of 8 in front: 30 slow requests at once overflow."""
    body = {"prompt": "slow", "size": "128x128", "num_inference_steps": 30}
    with ThreadPoolExecutor(30) as pool:
        rs = list(pool.map(lambda i: http.post("/v1/images/generations", json={**body, "seed": i}), range(30)))
    statuses = [r.status_code for r in rs]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 8, statuses
    for r in rs:
        if r.status_code == 429:
            assert_error(r, 429)
            assert int(r.headers["retry-after"]) >= 1


def test_a_client_that_leaves_stops_its_work_on_the_replica(server, http):
    """Ray's proxy cancels the request when the client goes; the replica drops the job
    (a plain request and a stream, each left while it runs)."""
    def left() -> float:
        text = http.get("/metrics").text
        return sum(float(m.group(1)) for m in re.finditer(r'omni_requests_cancelled_total\{reason="disconnect",where="[a-z]+",replica="all"\} (\S+)', text))

    before = left()
    slow = {"prompt": "left behind", "size": "512x512", "num_inference_steps": 200}
    with server.client(timeout=1.5) as impatient:
        try:
            r = impatient.post("/v1/images/generations", json=slow)
            pytest.fail(f"answered before the client left: {r.status_code} {r.text[:300]}")
        except httpx.TimeoutException:
            pass
    with server.client() as c, c.stream("POST", "/v1/images/generations", json={**slow, "stream": True, "partial_images": 3}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # it has begun; then the client closes it
    wait_until(lambda: left() >= before + 2, 30, "both requests to be dropped by their replicas")
    # Neither ran to its end: both replicas answer at once.
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda i: http.post("/v1/images/generations", json={"prompt": "next", "seed": i, **SMALL}), range(2)))
    assert time.monotonic() - t0 < 30


def test_a_killed_replica_is_replaced_and_every_request_is_answered(server, http):
    pids = ray_replica_pids()
    assert len(pids) == 2, pids
    body = {"prompt": "under fire", "size": "128x128", "num_inference_steps": 6}
    results: list = [None] * 40

    def send(i: int) -> None:
        try:
            with server.client(timeout=120) as c:
                results[i] = c.post("/v1/images/generations", json={**body, "seed": i})
        except httpx.HTTPError as e:
            results[i] = e

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(send, i) for i in range(40)]
        wait_until(lambda: sum(r is not None for r in results) >= 6, 120, "some requests answered")
        os.kill(pids[0], signal.SIGKILL)
        for f in futures:
            f.result(timeout=180)  # none hangs
    statuses = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results]
    assert set(statuses) <= {200, 503, 429}, statuses
    assert statuses.count(200) >= 20, statuses
    for r in results:
        if r.status_code == 503:
            assert_error(r, 503, "replica")
    # Ray Serve replaces it: two replicas again, both serving.
    wait_until(lambda: len(ray_replica_pids()) == 2 and pids[0] not in ray_replica_pids(), 180, "the replica to be replaced")

    def two_serving() -> bool:
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda i: http.post("/v1/images/generations", json={"prompt": "back", "seed": i, **SMALL}), range(8)))
        return all(r.status_code == 200 for r in rs) and len({r.headers[REPLICA] for r in rs}) == 2

    wait_until(two_serving, 120, "both replicas to serve again")


def test_ctrl_c_shuts_the_app_down_gracefully(server):
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=90) == 130, server.log_path.read_text()[-3000:]  # as without Ray
    wait_until(lambda: not ray_replica_pids(), 30, "the local cluster to go with it")
    assert "Traceback" not in server.log_path.read_text()


# ---- the cluster path: Ray Serve's own HTTP proxy, from deploy/kuberay's serveConfigV2 ----


@pytest.fixture(scope="module")
def proxied(tiny_dir, tmp_path_factory, server):
    """`serve run` of the RayService's own application config (its import path and arguments),
    on the tiny model, one CPU replica, the API key from the environment as in the pods."""
    import yaml

    if server.proc.poll() is None:  # one cluster at a time on two cores
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(timeout=90)
    service = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    app["args"].update(model=str(tiny_dir("z-image")), replicas=1, gpus_per_replica=0, runtime="torch")
    del app["args"]["engine_dir"]
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    tmp = tmp_path_factory.mktemp("ray-proxy")
    (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
    cmd = [str(Path(sys.executable).with_name("serve")), "run", str(tmp / "serve.yaml")]
    with launched(cmd, tmp / "serve.log", port, env={app["args"]["api_key_env"]: "sekret"}) as s:
        yield s


def test_the_rayservice_config_serves_the_same_api_behind_rays_proxy(proxied):
    with proxied.client() as c:
        assert_error(c.post("/v1/images/generations", json={"prompt": "x", **SMALL}), 401, "API key")
        c.headers["Authorization"] = "Bearer sekret"
        r = c.post("/v1/images/generations", json={"prompt": "a fox", "seed": 3, **SMALL})
        assert r.status_code == 200, r.text
        assert decode(r.json()["data"][0]["b64_json"]).shape == (64, 64, 3)
        assert r.headers[REPLICA] and len(r.headers.get_list("x-request-id")) == 1
        assert_error(c.post("/v1/images/generations", json={"prompt": "x", "size": "65x64"}), 400, "multiples of 16")
        assert_error(c.post("/v1/images/generations", json={"prompt": "x", "n": "many"}), 422, "n")
        names = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert names[0] == "Tongyi-MAI/Z-Image-Turbo"  # the config's served_model_name
        with c.stream("POST", "/v1/images/generations", json={"prompt": "a fox", "stream": True, "partial_images": 1, "seed": 3,
                                                              **{**SMALL, "num_inference_steps": 4}}) as s:
            kinds = [line.split(": ", 1)[1] for line in s.iter_lines() if line.startswith("event: ")]
        assert kinds == ["image_generation.partial_image", "image_generation.completed"]


def test_behind_rays_proxy_a_client_that_leaves_stops_its_work(proxied):
    def left() -> float:
        text = httpx.get(f"{proxied.url}/metrics").text
        return sum(float(m.group(1)) for m in re.finditer(r'omni_requests_cancelled_total\{reason="disconnect",where="[a-z]+",replica="all"\} (\S+)', text))

    before = left()
    with proxied.client(timeout=1.5, headers={"Authorization": "Bearer sekret"}) as impatient:
        try:
            r = impatient.post("/v1/images/generations", json={"prompt": "left behind", "size": "512x512", "num_inference_steps": 200})
            pytest.fail(f"answered before the client left: {r.status_code} {r.text[:300]}")
        except httpx.TimeoutException:
            pass
    wait_until(lambda: left() >= before + 1, 30, "the replica to drop the request")
    proxied.proc.send_signal(signal.SIGINT)
    assert proxied.proc.wait(timeout=90) == 0, proxied.log_path.read_text()[-3000:]
