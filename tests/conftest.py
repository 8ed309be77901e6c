"""Shared fixtures: tiny random-weight pipelines built once per test session from configs in code,
and loaded back through diffusers' real loading code."""

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

        return DiffusionPipeline.from_pretrained(tiny_dir(family), dtype=torch.float32)

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
