"""Shared fixtures: tiny random-weight pipelines built once per test session from configs in code,
and loaded back through diffusers' real loading code."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_trt.models import family_by_name


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir("z-image") -> folder of a saved tiny pipeline of that family (built once)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            family_by_name(family).build_tiny(out)
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
