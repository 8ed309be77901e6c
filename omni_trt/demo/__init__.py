"""Random-weight pipelines: the embedded tiny demo model (so `omni serve` works on a fresh
machine with no weights and no hub), the tiny pipelines the tests build, and the real-shape
builders for GPU benchmarks where no weights can be downloaded. Production code never needs
this package; it uses `models/`, never the reverse."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable

from ..files import build_dir
from .. import models

DEMO_FAMILY = models.Z_IMAGE.name
DEMO_NAME = f"omni-trt/demo-{DEMO_FAMILY}"  # the served model name of the demo model
DEMO_VERSION = 1  # bump when a tiny pipeline's config changes
# Family -> the module here that builds its pipelines (build_tiny, build_real_shapes): this
# package's modules are named as the families' packages in models/.
_MODULES = {m.FAMILY.name: m.__name__.rsplit(".", 1)[1] for m in (models.z_image, models.qwen_image, models.flux, models.sd3)}


def builders(family: str) -> tuple[Callable[[Path], None], Callable[..., None]]:
    """(build_tiny, build_real_shapes) of a family."""
    models.family_by_name(family)
    module = importlib.import_module(f"{__name__}.{_MODULES[family]}")
    return module.build_tiny, module.build_real_shapes


def cache_root() -> Path:
    return Path(os.environ.get("OMNI_TRT_CACHE", Path.home() / ".cache" / "omni-trt"))


def build_demo_model(out_dir: Path, family: str = DEMO_FAMILY, real_shapes: bool = False, dtype: str = "bf16") -> Path:
    """Write the tiny pipeline of `family` to out_dir (replacing what is there); real_shapes: the
    published transformer/VAE architectures with random weights instead (GPU benchmarks)."""
    tiny, real = builders(family)
    if real_shapes:
        return build_dir(out_dir, lambda d: real(d, dtype))
    return build_dir(out_dir, tiny)


def ensure_demo_model(family: str = DEMO_FAMILY) -> Path:
    path = cache_root() / "demo" / f"{family}-v{DEMO_VERSION}"
    if not (path / "model_index.json").is_file():
        build_demo_model(path, family)
    return path

