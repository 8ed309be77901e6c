"""LoRA adapters: the request field (request.py), which files may be opened (files.py), the
registry of checked adapters (registry.py) and the merge maths (merge.py). Called by runtime/
and server/; it imports neither."""

from .files import MAX_ADAPTER_BYTES, WEIGHT_NAME, adapter_file, inside
from .registry import MAX_ADAPTERS, Adapter, Factors, Registry
from .request import MAX_LORAS_PER_REQUEST, MAX_SCALE, MIN_SCALE, PARAM, AdapterSet, LoraRef, adapter_set, describe, parse_lora, with_model

__all__ = ["MAX_ADAPTERS", "MAX_ADAPTER_BYTES", "MAX_LORAS_PER_REQUEST", "MAX_SCALE", "MIN_SCALE", "PARAM", "WEIGHT_NAME", "Adapter",
           "AdapterSet", "Factors", "LoraRef", "Registry", "adapter_file", "adapter_set", "describe", "inside", "parse_lora", "with_model"]
