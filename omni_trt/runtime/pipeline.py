"""Load a diffusers pipeline and run batches of requests through it, timing each stage."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..models import Family, detect_family
from .request import GenerationRequest, SizeLimits, pipeline_kwargs

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STAGES = ("text_encode", "denoise", "vae_decode")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """bf16 on GPU, fp32 on CPU (CPU bf16 kernels are slow and some are missing)."""
    return "fp32" if device == "cpu" else "bf16"


@dataclass
class LoadOptions:
    device: str | None = None
    dtype: str | None = None
    vae_slicing: bool = False
    vae_tiling: bool = False
    # pipeline attribute -> module replacing it (engine stand-ins); those weights are never loaded
    replacements: dict[str, Any] = field(default_factory=dict)


class StageTimer:
    """Wall time per stage of one pipeline call, from hooks on the pipeline's own calls.
    On a GPU the hooks synchronise so the time lands in the stage that spent it."""

    def __init__(self, device: str) -> None:
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.calls[name] = self.calls.get(name, 0) + 1


def _timed(fn: Callable, timer_ref: list[StageTimer | None], stage: str) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        timer = timer_ref[0]
        if timer is None:
            return fn(*args, **kwargs)
        with timer.stage(stage):
            return fn(*args, **kwargs)

    return wrapper


@dataclass
class BatchResult:
    images: list[list[Any]]  # per request, its PIL images in order
    stages: dict[str, float]  # seconds per stage, plus "total"


class PipelineRuntime:
    """A loaded pipeline; `generate()` runs one batch of compatible requests in one call.
    Not thread-safe: the server's single worker thread owns it."""

    kind = "torch"

    def __init__(self, model: str, family: Family, pipe: Any, device: str, dtype: str) -> None:
        self.model = model
        self.family = family
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.limits = SizeLimits.of(family)
        # Set where engines replace components: each engine's largest batch, what runs each
        # component, the built profile (for /v1/models), extra pipeline kwargs.
        self.batch_limits: dict[str, int] = {}
        self.max_call_images: int | None = None  # operator's cap on images per call (--max-batch-size)
        self.components: dict[str, str] = {}
        self.profile: dict[str, Any] | None = None
        self.call_kwargs: dict[str, Any] = {}
        self._timer: list[StageTimer | None] = [None]
        self._lock = threading.Lock()
        # Instance attributes shadow the methods the pipeline calls on itself and its modules.
        pipe.encode_prompt = _timed(pipe.encode_prompt, self._timer, "text_encode")
        pipe.vae.decode = _timed(pipe.vae.decode, self._timer, "vae_decode")
        pipe.transformer.forward = _timed(pipe.transformer.forward, self._timer, "denoise")

    def describe(self) -> dict[str, Any]:
        out = {"runtime": self.kind, "family": self.family.name, "device": self.device, "dtype": self.dtype}
        if self.components:
            out["components"] = dict(self.components)
        if self.profile is not None:
            out["engine_profile"] = self.profile
        return out

    def max_images(self, guidance_scale: float | None) -> int | None:
        """Images one pipeline call can take: the operator's cap and the engines' batch ranges
        (None: no limit). Where CFG doubles the transformer batch, half as many."""
        limits = [self.max_call_images] if self.max_call_images else []
        if "transformer" in self.batch_limits:
            limits.append(self.batch_limits["transformer"] // self.family.transformer_batch(1, guidance_scale))
        if "vae_decoder" in self.batch_limits:
            limits.append(self.batch_limits["vae_decoder"])
        return max(1, min(limits)) if limits else None

    @property
    def max_batch(self) -> int | None:
        """Images per call at the family's default guidance."""
        return self.max_images(self.family.defaults.guidance_scale)

    def generate(self, requests: list[GenerationRequest]) -> BatchResult:
        chunks = self._chunks(requests)
        images: list[list[Any]] = [[] for _ in requests]
        stages: dict[str, float] = {}
        with self._lock:
            for chunk in chunks:
                out, seconds = self._call([r for _, r in chunk])
                it = iter(out)
                for index, r in chunk:
                    images[index].extend(next(it) for _ in range(r.n))
                for k, v in seconds.items():
                    stages[k] = stages.get(k, 0.0) + v
        return BatchResult(images, stages)

    def _chunks(self, requests: list[GenerationRequest]) -> list[list[tuple[int, GenerationRequest]]]:
        """Split so no call exceeds max_batch images; a request larger than that is split by
        image, its seeds kept (seed + index), so the images are the same as in one call."""
        limit = self.max_images(requests[0].guidance_scale)
        if limit is None:
            return [list(enumerate(requests))]
        chunks: list[list[tuple[int, GenerationRequest]]] = [[]]
        used = 0
        for index, r in enumerate(requests):
            offset = 0
            while offset < r.n:
                if used == limit:
                    chunks.append([])
                    used = 0
                take = min(r.n - offset, limit - used)
                part = _replace(r, n=take, seed=r.image_seeds()[offset])
                chunks[-1].append((index, part))
                used += take
                offset += take
        return chunks

    def _call(self, requests: list[GenerationRequest]) -> tuple[list[Any], dict[str, float]]:
        timer = StageTimer(self.device)
        self._timer[0] = timer
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self.pipe(**pipeline_kwargs(requests), **self.call_kwargs)
        finally:
            self._timer[0] = None
        seconds = dict(timer.seconds)
        seconds["total"] = time.perf_counter() - t0
        return list(out.images), seconds


def _replace(r: GenerationRequest, **changes: Any) -> GenerationRequest:
    from dataclasses import replace

    return replace(r, **changes)


def _standin_type_note(record: logging.LogRecord) -> bool:
    """Drop diffusers' warning that a stand-in is not the class model_index.json names: that is
    the point of a stand-in. Every other record passes."""
    message = record.getMessage()
    return not (message.startswith("Expected types for") and "StandIn" in message)


def load_pipeline(model: str, options: LoadOptions | None = None, family: Family | None = None) -> PipelineRuntime:
    """Load a pipeline from a hub id or a local folder; replaced components are passed to
    from_pretrained so their weights are never read."""
    from diffusers import DiffusionPipeline

    options = options or LoadOptions()
    family = family or detect_family(model)
    device = options.device or default_device()
    dtype = options.dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    log.info("loading %s (%s) on %s in %s", model, family.pipeline_class, device, dtype)
    t0 = time.perf_counter()
    type_notes = logging.getLogger("diffusers.pipelines.pipeline_utils")
    type_notes.addFilter(_standin_type_note)
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=DTYPES[dtype], **options.replacements)
    finally:
        type_notes.removeFilter(_standin_type_note)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    log.info("loaded in %.1fs", time.perf_counter() - t0)
    return PipelineRuntime(model, family, pipe, device, dtype)
