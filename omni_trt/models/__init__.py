"""Model families: the only place that knows a family's names, defaults and tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import COMPONENTS, Defaults, Family, Point, SizeRules
from .flux import FAMILY as FLUX
from .qwen_image import FAMILY as QWEN_IMAGE
from .sd3 import FAMILY as SD3
from .z_image import FAMILY as Z_IMAGE

FAMILIES: dict[str, Family] = {f.name: f for f in (Z_IMAGE, QWEN_IMAGE, FLUX, SD3)}
DEMO_FAMILY = Z_IMAGE.name

__all__ = [
    "COMPONENTS",
    "DEMO_FAMILY",
    "FAMILIES",
    "Defaults",
    "Family",
    "ModelNotFound",
    "Point",
    "SizeRules",
    "UnsupportedModel",
    "family_by_name",
    "family_for_class",
    "detect_family",
    "read_model_index",
]


class UnsupportedModel(ValueError):
    pass


class ModelNotFound(FileNotFoundError):
    pass


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
    """model_index.json of a local pipeline folder or a hub id (hub: downloads that file only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelNotFound(f"{path} has no model_index.json: is it a diffusers pipeline folder?")
        return json.loads(index.read_text())
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise ModelNotFound(f"model {str(model)!r} not found: give a diffusers pipeline folder or a hub id like org/name")
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(model), "model_index.json")).read_text())
    except Exception as e:  # offline, unknown repo, gated: all mean "not found" to the user
        raise ModelNotFound(f"model {str(model)!r} not found locally and could not be fetched from the hub: {e}") from e


def detect_family(model: str | os.PathLike) -> Family:
    return family_for_class(read_model_index(model).get("_class_name", "<none>"))
