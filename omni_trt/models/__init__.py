"""Model families: the only place that knows a family's names, defaults and tensors."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from ..errors import ModelNotFound, UnsupportedModel
from ..hub import model_dir
from .base import COMPONENTS, DEFAULTS_FILE, Defaults, Family, Point, SizeRules
from .flux import FAMILY as FLUX
from .flux2_klein import FAMILY as FLUX2_KLEIN
from .qwen_image import FAMILY as QWEN_IMAGE
from .qwen_image_edit import FAMILY as QWEN_IMAGE_EDIT
from .sd3 import FAMILY as SD3
from .sizes import SizeLimits, parse_size
from .z_image import FAMILY as Z_IMAGE

FAMILIES: dict[str, Family] = {f.name: f for f in (Z_IMAGE, QWEN_IMAGE, FLUX, SD3, FLUX2_KLEIN, QWEN_IMAGE_EDIT)}

__all__ = [
    "COMPONENTS",
    "FAMILIES",
    "DEFAULTS_FILE",
    "Defaults",
    "Family",
    "ModelNotFound",
    "Point",
    "SizeLimits",
    "SizeRules",
    "UnsupportedModel",
    "detect_family",
    "family_by_name",
    "family_for_class",
    "parse_size",
    "read_model_index",
]


def _supported() -> str:
    return ", ".join(f"{f.pipeline_class} ({f.name})" for f in FAMILIES.values())


def family_by_name(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModel(f"unknown family {name!r}; choose one of: {', '.join(FAMILIES)}") from None


def family_for_class(class_name: str) -> Family:
    for family in FAMILIES.values():
        if family.pipeline_class == class_name:
            return family
    raise UnsupportedModel(f"pipeline class {class_name!r} is not supported; supported: {_supported()}")


def read_model_index(model: str | os.PathLike) -> dict:
    """model_index.json of a local pipeline folder or a hub id (hub: fetches that file only)."""
    index = model_dir(model, ["model_index.json"]) / "model_index.json"
    if not index.is_file():
        raise ModelNotFound(f"{model} has no model_index.json: is it a diffusers pipeline folder?")
    return json.loads(index.read_text())


def detect_family(model: str | os.PathLike) -> Family:
    """The family of a pipeline folder or hub id, with that checkpoint's own defaults (Family.variants)."""
    index = read_model_index(model)
    family = family_for_class(index.get("_class_name", "<none>"))
    return family if family.variants is None else replace(family, defaults=family.defaults_for(index))
