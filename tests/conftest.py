"""Shared fixtures: tiny random-weight pipelines built once per test session from configs in code,
and loaded back through diffusers' real loading code; the tiny Z-Image runtime (`runtime`), a live
server on it (`server`, which a module overrides with its own options) and clients of that
server (`http`: httpx, `sdk`: the OpenAI SDK)."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_trt.demo import builders


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir("z-image") -> folder of a saved tiny pipeline of that family (built once)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            builders(family)[0](out)
            built[family] = out
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_dir):
    """tiny_pipeline("z-image") -> a fresh fp32 CPU pipeline loaded with from_pretrained."""

    def load(family: str):
        import torch
        from diffusers import DiffusionPipeline

        from omni_trt.models import family_by_name

        # A family's own parts where diffusers cannot load them as saved (Family.load_replacements).
        hook = family_by_name(family).load_replacements
        parts = hook(str(tiny_dir(family))) if hook else {}
        return DiffusionPipeline.from_pretrained(tiny_dir(family), dtype=torch.float32, **parts)

    return load


# A small profile so TensorRT-RTX builds stay quick on CPU: 64..128 px, up to 2 images per call.
BUILD_ARGS = dict(target="tensorrt-rtx", opt_level=0, min_size="64x64", max_size="128x128", max_batch=2)


@pytest.fixture(scope="session")
def built(tiny_dir, tmp_path_factory):
    """built("z-image") -> (tiny model dir, engine dir, BuildReport): ONNX export, validation and a
    TensorRT-RTX build ahead of time, once per family per session. Tests that change an engine
    dir copy it first."""
    import importlib.util

    from omni_trt.compiler.execute import build_engines

    cache: dict[str, tuple[Path, Path, object]] = {}

    def get(name: str):
        if name not in cache:
            if importlib.util.find_spec("tensorrt_rtx") is None:
                pytest.fail("tensorrt_rtx is not installed: make test installs it (pip install 'omni-trt[rtx]')")
            model = tiny_dir(name)
            engine_dir = tmp_path_factory.mktemp(f"engines-{name}")
            cache[name] = (model, engine_dir, build_engines(str(model), engine_dir, **BUILD_ARGS))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def exported_onnx(built):
    """exported_onnx(family) -> {component: ExportResult} for the session build's ONNX files: the
    exporter tests check the very exports the build made, rather than exporting each model again."""
    from omni_trt.compiler.export import ExportResult, onnx_input_dims
    from omni_trt.enginedir import onnx_relpath

    def get(family: str) -> dict:
        _, engine_dir, report = built(family)
        out = {}
        for name in report.manifest.components:
            path = engine_dir / onnx_relpath(name)
            out[name] = ExportResult(path, report.seconds.get(name, {}).get("export", 0.0), onnx_input_dims(path))
        return out

    return get


@pytest.fixture(scope="session")
def runtime(tiny_dir):
    """The tiny Z-Image pipeline on the torch runtime, loaded once: every live server of the
    session may serve it (one at a time works on it: the runtime holds a lock per batch). Tests
    that patch it (counting_steps, a failing encoder) put it back before they return."""
    from omni_trt.runtime.pipeline import load_pipeline

    return load_pipeline(str(tiny_dir("z-image")))


@pytest.fixture(scope="module")
def server(runtime):
    """A live server on `runtime` named tiny-z; a module that needs other options (a queue, a
    batch cap, limits) defines its own `server`, and `http` and `sdk` follow it."""
    from serving import live_server

    with live_server(lambda: runtime, served_model_name="tiny-z") as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    """An httpx client of the module's `server` (any object with .client(), the Ray app's too)."""
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def sdk(server):
    """The OpenAI SDK against the module's `server`, no key, no retries (a refusal is seen as is)."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
