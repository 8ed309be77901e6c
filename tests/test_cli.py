"""The `omni` command as a user runs it: real processes, the README's serve path with the
embedded demo model, and the examples as clients."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serving import free_port

ROOT = Path(__file__).resolve().parents[1]
OMNI = [sys.executable, "-m", "omni_trt"]


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`omni serve` with no model: the demo model is built into a fresh cache on first use."""
    cache = tmp_path_factory.mktemp("cache")
    port = free_port()
    env = {**os.environ, "OMNI_TRT_CACHE": str(cache)}
    log = (cache / "serve.log").open("w")
    proc = subprocess.Popen([*OMNI, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    statuses = []
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, (cache / "serve.log").read_text()
            try:
                statuses.append(httpx.get(f"{url}/health", timeout=5).status_code)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if statuses[-1] == 200:
                break
            time.sleep(0.1)
        yield url, statuses, cache
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_serve_without_a_model_listens_first_then_serves_the_demo(demo_server):
    url, statuses, cache = demo_server
    assert statuses and statuses[-1] == 200, statuses
    assert statuses[0] == 503, "the server should listen (503) before the model is ready"
    assert not (cache / "demo").exists(), "the trained demo model is package data: nothing is built"
    card = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert card["id"] == "omni-trt/demo-z-image"
    assert (card["defaults"]["size"], card["defaults"]["num_inference_steps"]) == ("128x128", 8), card  # its folder's defaults


def test_examples_run_unchanged_against_the_server(demo_server, tmp_path):
    url, _, _ = demo_server
    env = {**os.environ, "URL": url}
    if shutil.which("curl"):
        r = run(["bash", str(ROOT / "examples/curl_images.sh")], cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr + r.stdout
        assert Image.open(tmp_path / "dragon.png").size == (1024, 1024)
        assert "1 image(s)" in r.stdout
    r = run([sys.executable, str(ROOT / "examples/requests_client.py")], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "cat.png").size == (512, 512)
    r = run([sys.executable, str(ROOT / "examples/openai_client.py")], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "horse.png").size == (512, 512) and "chat returned 1 image(s)" in r.stdout
    r = run([sys.executable, str(ROOT / "examples/openai_edit.py")], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    for name in ("fox-painting.png", "fox-storm.png", "fox-dawn.png"):
        assert Image.open(tmp_path / name).size == (256, 256)
    assert "image_edit.partial_image" in r.stdout and "image_edit.completed" in r.stdout
    if shutil.which("curl"):
        r = run(["bash", str(ROOT / "examples/curl_edit.sh")], cwd=tmp_path, env={**env, "PYTHON": sys.executable})
        assert r.returncode == 0, r.stderr + r.stdout
        assert Image.open(tmp_path / "cabin-night.png").size == Image.open(tmp_path / "cabin-lake.png").size == (256, 256)


def test_generate_writes_the_image_the_server_would(tiny_dir, runtime, tmp_path):
    model = str(tiny_dir("z-image"))
    out = tmp_path / "one.png"
    r = run([*OMNI, "generate", model, "-p", "a cat", "--size", "64x96", "--seed", "5", "--steps", "2", "-o", str(out)])
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(out))
    assert img.shape == (96, 64, 3) and img.std() > 0
    from omni_trt.runtime.request import ImageAsk, resolve

    rt = runtime  # the same tiny model, loaded once per session
    want = np.asarray(rt.generate([resolve(rt.family, ImageAsk("a cat", size="64x96", seed=5, steps=2))]).images[0][0])
    assert np.abs(img.astype(int) - want).max() <= 1
    r = run([*OMNI, "generate", model, "-p", "x", "--size", "65x64", "-o", str(tmp_path / "bad.png")])
    assert r.returncode == 2 and "multiples of 16" in r.stderr and not (tmp_path / "bad.png").exists()


def test_clear_errors_for_a_missing_or_unsupported_model(tmp_path):
    r = run([*OMNI, "serve", str(tmp_path / "nowhere")], timeout=60)
    assert r.returncode == 2 and "not found" in r.stderr
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    r = run([*OMNI, "generate", str(tmp_path), "-p", "x"], timeout=60)
    assert r.returncode == 2 and "ZImagePipeline" in r.stderr and "QwenImagePipeline" in r.stderr


def test_demo_model_command_and_help(tmp_path):
    r = run([*OMNI, "demo-model", str(tmp_path / "zi")])
    assert r.returncode == 0, r.stderr
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "zi")
    assert type(pipe).__name__ == "ZImagePipeline"
    for cmd in ([], ["serve"], ["generate"], ["demo-model"], ["build-engine"], ["inspect"], ["bench"]):
        r = run([*OMNI, *cmd, "--help"], timeout=60)
        assert r.returncode == 0 and "usage: omni" in r.stdout
    r = run([*OMNI, "serve", "--max-batch-size", "0"], timeout=60)
    assert r.returncode == 2 and "must be at least 1" in r.stderr
