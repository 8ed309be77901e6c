"""The embedded demo model: a tiny random-weight pipeline built on first use into a cache
folder, so `omni serve` works on a fresh machine with no weights and no hub."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..models import DEMO_FAMILY, family_by_name

DEMO_VERSION = 1  # bump when a tiny pipeline's config changes


def cache_root() -> Path:
    return Path(os.environ.get("OMNI_TRT_CACHE", Path.home() / ".cache" / "omni-trt"))


def build_demo_model(out_dir: Path, family: str = DEMO_FAMILY, real_shapes: bool = False, dtype: str = "bf16") -> Path:
    """Write the tiny pipeline of `family` to out_dir (replacing what is there); real_shapes: the
    published transformer/VAE architectures with random weights instead (GPU benchmarks)."""
    out_dir = Path(out_dir)
    fam = family_by_name(family)
    if real_shapes and fam.build_real_shapes is None:
        raise ValueError(f"{family} has no real-shape builder yet")
    build = (lambda d: fam.build_real_shapes(d, dtype)) if real_shapes else fam.build_tiny
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        build(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_demo_model(family: str = DEMO_FAMILY) -> Path:
    path = cache_root() / "demo" / f"{family}-v{DEMO_VERSION}"
    if not (path / "model_index.json").is_file():
        build_demo_model(path, family)
    return path
