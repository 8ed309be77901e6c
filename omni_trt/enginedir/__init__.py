"""The engine-dir format: the typed manifest, its fingerprints and verification, the rebuild
decision, and the one place the TensorRT flavours differ. The compiler writes engine dirs and the
runtime reads them, both through this package; neither imports the other."""

from .decide import Action, decide, diff_keys
from .fingerprint import combined_fingerprint, model_fingerprint, present_sizes
from .layout import MANIFEST, manifest_path, onnx_relpath, plan_relpath, timing_cache_name
from .manifest import (
    FORMAT,
    ComponentEntry,
    EngineEntry,
    EngineIO,
    FileEntry,
    GpuInfo,
    Manifest,
    ModelEntry,
    OnnxEntry,
    PointEntry,
    Points,
    ShapeRange,
    TensorIO,
    Validation,
    format_manifest,
    now,
)

__all__ = [
    "FORMAT", "MANIFEST", "Action", "ComponentEntry", "EngineEntry", "EngineIO", "FileEntry", "GpuInfo", "Manifest",
    "ModelEntry", "OnnxEntry", "PointEntry", "Points", "ShapeRange", "TensorIO", "Validation", "combined_fingerprint",
    "decide", "diff_keys", "format_manifest", "manifest_path", "model_fingerprint", "now", "onnx_relpath",
    "plan_relpath", "present_sizes", "timing_cache_name",
]
