"""The prompt cache: the text encoder's outputs for a call's prompts, kept in an LRU.

It wraps the pipeline's own `encode_prompt`, so every family gets it from the same code, keyed by
the call's arguments (prompts, negative prompts, guidance flags, sequence length, device) and the
pipeline that encodes. A hit returns a copy of what the miss computed, so it gives the same image
bit for bit. Calls given anything but plain values (tensors, images: the edit families' encoders
read the input images) bypass it. Entries stay on the encoder's device: an operator sizes it
(`--prompt-cache-size`) by the model's embedding size (Qwen-Image: 512 tokens x 3584 x bf16 = 3.7
MB an entry)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

import torch

from .denoise import tree_map

DEFAULT_SIZE = 256
_NOT_PLAIN = object()
_PLAIN = (str, int, float, bool, type(None), torch.device, torch.dtype)


def call_key(args: tuple, kwargs: dict[str, Any]) -> tuple | None:
    """A hashable key of a call made of plain values (lists of them included), else None."""

    def plain(v: Any) -> Any:
        if isinstance(v, _PLAIN):
            return (type(v).__name__, str(v) if isinstance(v, (torch.device, torch.dtype)) else v)
        if isinstance(v, (list, tuple)):
            items = tuple(plain(x) for x in v)
            return _NOT_PLAIN if _NOT_PLAIN in items else ("seq", items)
        return _NOT_PLAIN

    parts = tuple(plain(v) for v in args) + tuple((k, plain(v)) for k, v in sorted(kwargs.items()))
    if _NOT_PLAIN in parts or any(p[1] is _NOT_PLAIN for p in parts[len(args):]):
        return None
    return parts


class PromptCache:
    """An LRU of encode_prompt outputs; size 0 keeps nothing. hits/misses count since the last
    take_counts() (the runtime reports them per batch)."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def wrap(self, fn: Callable[..., Any], owner: str) -> Callable[..., Any]:
        """`fn` (a pipeline's encode_prompt) through the cache; `owner` names the encoder."""
        if self.size <= 0:
            return fn

        def cached(*args: Any, **kwargs: Any) -> Any:
            key = call_key(args, kwargs)  # before the call: some pipelines rewrite their prompt list
            if key is None:
                return fn(*args, **kwargs)
            key = (owner, key)
            with self._lock:
                hit = self._entries.get(key)
                if hit is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
            if hit is not None:
                return tree_map(torch.clone, hit)
            out = fn(*args, **kwargs)
            with self._lock:
                self.misses += 1
                self._entries[key] = tree_map(torch.clone, out)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            return out

        return cached

    def take_counts(self) -> tuple[int, int]:
        with self._lock:
            out = (self.hits, self.misses)
            self.hits = self.misses = 0
        return out
