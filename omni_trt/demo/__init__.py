"""The embedded demo model and the random-weight pipelines.

The demo model (`omni serve` with no model: `ensure_demo_model()`) is a tiny Z-Image pipeline
trained in this repo (`python -m omni_trt.demo.train`) to draw "a {fg} {shape} on a {bg}
background"; its weights ship as package data (TRAINED_DIR), so a fresh machine with no hub
serves pictures that mean something. The random-weight tiny pipelines of every family stay for
the tests (fast to build), and the real-shape builders for GPU benchmarks where no weights can be
downloaded. Production code never needs this package; it uses `models/`, never the reverse."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from ..files import build_dir, cache_root
from .. import models

DEMO_FAMILY = models.Z_IMAGE.name
DEMO_NAME = f"omni-trt/demo-{DEMO_FAMILY}"  # the served model name of the demo model
DEMO_VERSION = 1  # bump when a tiny pipeline's config changes
# The trained demo pipeline (package data): a diffusers folder plus the request defaults it carries.
TRAINED_DIR = Path(__file__).resolve().parent / "z_image_shapes"
# Family -> the module here that builds its pipelines (build_tiny, build_real_shapes): this
# package's modules are named as the families' packages in models/.
_MODULES = {m.FAMILY.name: m.__name__.rsplit(".", 1)[1] for m in (models.z_image, models.qwen_image, models.flux, models.sd3,
                                                              models.flux2_klein, models.qwen_image_edit)}


def builders(family: str) -> tuple[Callable[[Path], None], Callable[..., None]]:
    """(build_tiny, build_real_shapes) of a family."""
    models.family_by_name(family)
    module = importlib.import_module(f"{__name__}.{_MODULES[family]}")
    return module.build_tiny, module.build_real_shapes


def build_demo_model(out_dir: Path, family: str = DEMO_FAMILY, real_shapes: bool = False, dtype: str = "bf16") -> Path:
    """Write the tiny pipeline of `family` to out_dir (replacing what is there); real_shapes: the
    published transformer/VAE architectures with random weights instead (GPU benchmarks)."""
    tiny, real = builders(family)
    if real_shapes:
        return build_dir(out_dir, lambda d: real(d, dtype))
    return build_dir(out_dir, tiny)


def ensure_demo_model(family: str | None = None) -> Path:
    """The folder of the embedded demo model (None: the trained one, loaded from the package as
    it is), or of `family`'s tiny random-weight pipeline (built into the cache on first use)."""
    if family is None:
        if not (TRAINED_DIR / "model_index.json").is_file():
            from ..errors import ModelNotFound

            raise ModelNotFound(f"the trained demo model is missing from {TRAINED_DIR}: python -m omni_trt.demo.train {TRAINED_DIR}")
        return TRAINED_DIR
    path = cache_root() / "demo" / f"{family}-v{DEMO_VERSION}"
    if not (path / "model_index.json").is_file():
        build_demo_model(path, family)
    return path


def copy_trained_demo(out_dir: Path) -> Path:
    """A copy of the trained demo model's folder at out_dir (replacing what is there)."""
    import shutil

    source = ensure_demo_model()
    return build_dir(out_dir, lambda d: shutil.copytree(source, d, dirs_exist_ok=True))


def demo_source(model: str | None) -> str | None:
    """What a command given `model` builds from: the trained demo's folder for no model or the
    demo's served name (DEMO_NAME), else `model` as given."""
    return str(ensure_demo_model()) if model is None or model == DEMO_NAME else model
