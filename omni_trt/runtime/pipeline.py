"""Load a diffusers pipeline and run batches of requests through it, timing each stage."""

from __future__ import annotations

import copy
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping

import torch

from ..dtypes import check_dtype, default_dtype, torch_dtype
from ..errors import Cancelled, UsageError
from ..lora import MAX_LORAS_PER_REQUEST
from ..models import Family, SizeLimits, detect_family
from .adapters import (MAX_LORA_SESSIONS, InPlaceAdapters, ModuleWeights, OnnxWeights, RefitAdapters, SessionAdapters, TorchAdapters,
                       make_registry, weight_shapes)
from .compiled import KIND as COMPILED_KIND
from .calibration import step_cache_for
from .compiled import CompileInfo, compile_pipeline
from .denoise import StepHook
from .edits import edit_pipeline
from .preview import DECODERS as PREVIEW_DECODERS
from .preview import PreviewMap, load_or_fit, predicted_clean
from .promptcache import PromptCache
from .request import GenerationRequest, pipeline_kwargs
from .stepcache import CacheConfig

log = logging.getLogger(__name__)

STAGES = ("text_encode", "vae_encode", "denoise", "vae_decode")
Preview = Callable[[int, int, int, Any], None]  # (request index, image index, partial index, PIL image)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Trace:
    """What PipelineRuntime.trace gives: the call's step hook (steps computed and reused, calls,
    recorded norms), its images and stage seconds."""

    hook: StepHook
    images: list[Any]
    stages: dict[str, float]


@dataclass(frozen=True)
class LoraOptions:
    """serve's LoRA flags: modules (name, path) loaded and checked at start; lora_dir: where request
    and load-route paths may point (None: none may); max_per_request: adapters one request names."""

    modules: tuple[tuple[str, str], ...] = ()
    lora_dir: str | None = None
    max_per_request: int = MAX_LORAS_PER_REQUEST
    loading: bool = False  # --enable-lora-loading: the load/unload routes
    max_sessions: int = MAX_LORA_SESSIONS  # onnxruntime: sessions kept by adapter set (LRU)


@dataclass(frozen=True)
class LoadOptions:
    """How to load a pipeline."""

    device: str | None = None
    dtype: str | None = None
    vae_slicing: bool = False
    vae_tiling: bool = False
    warmup_size: str | None = None  # torch-compile: the WxH compiled at load (None: the family's default)
    # Partial images: "mlp" or "linear" (runtime.preview's maps, fitted or read from its cache at load;
    # `omni serve` defaults to mlp) or "full" (the VAE decoder; nothing to fit, for callers that never stream).
    preview_decoder: str = "full"
    lora: LoraOptions | None = None  # adapters served (None: no `lora` field)
    cache: CacheConfig = CacheConfig()  # the step cache (--cache-backend, --cache-config); default none
    prompt_cache_size: int = 0  # encode_prompt outputs kept (LRU); 0: none (serve's --prompt-cache-size: PROMPT_CACHE_SIZE)

    @property
    def target_device(self) -> str:
        """The device asked for, else cuda where there is one."""
        return self.device or default_device()


@dataclass(frozen=True)
class EngineSwap:
    """What an engine dir changes in a runtime (runtime.loader builds it).

    kind: what runs the swapped components ("onnxruntime", "tensorrt"); replacements: pipeline
    attribute -> stand-in module (those weights are never loaded); batch_limits: component ->
    largest batch its engine takes; limits: the sizes its profile covers; profile: the built
    min/max points per component (for /v1/models); call_kwargs: extra pipeline kwargs;
    edit_unavailable: why edits cannot run and the command that adds the VAE encoder (None: they can);
    decoder_id: what names the VAE decoder engine (its ONNX sha256s), the preview map's cache key."""

    kind: str
    replacements: Mapping[str, Any]
    components: Mapping[str, str] = field(default_factory=dict)
    batch_limits: Mapping[str, int] = field(default_factory=dict)
    limits: SizeLimits | None = None  # None: the family's own
    profile: Mapping[str, Any] = field(default_factory=dict)
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    edit_unavailable: str | None = None
    decoder_id: str | None = None
    engine_dir: str | None = None  # where the engines are (the step cache's calibration is in its manifest)
    # LoRA on engines: the transformer's engine, its ONNX file and weight map (torch name ->
    # (initializer, transposed)), and why adapters cannot be served (a rebuild command), if so.
    lora_engine: Any = None
    lora_onnx: str | None = None
    lora_weights: Mapping[str, tuple[str, bool]] = field(default_factory=dict)
    lora_unavailable: str | None = None


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
    calls: list[int] = field(default_factory=list)  # images per pipeline call (chunks of the batch)
    lora_switch: float | None = None  # seconds spent switching adapter sets before it (None: no switch)
    steps: tuple[int, int] = (0, 0)  # each request's denoising steps (computed, reused): one plan a batch
    prompt_cache: tuple[int, int] = (0, 0)  # prompt cache (hits, misses) in this batch's calls


@dataclass(frozen=True, eq=False)
class PipelineRuntime:
    """A loaded pipeline; `generate()` runs one batch of compatible requests. Built once by
    load_pipeline from everything it needs, and never changed after: the server's worker thread
    and the request handlers read it concurrently."""

    model: str
    family: Family
    pipe: Any
    device: str
    dtype: str
    swap: EngineSwap | None = None  # the engines swapped in; None: plain torch
    compiled: CompileInfo | None = None  # torch-compile: what was compiled, the warm-up's cost
    preview: PreviewMap | None = None  # partial images from this map; None: full VAE decodes
    # LoRA: the registry and what switches sets (runtime.adapters: TorchAdapters, InPlaceAdapters,
    # SessionAdapters or RefitAdapters); None: no adapters served. Changed only under _lock.
    adapters: Any = None
    # The step cache (runtime.calibration.StepCache); None: every step computes. Set at load.
    step_cache: Any = None
    prompt_cache: PromptCache = field(default_factory=lambda: PromptCache(0))
    _timer: list = field(default_factory=lambda: [None], init=False, repr=False)
    _hook: list = field(default_factory=lambda: [None], init=False, repr=False)  # this call's StepHook
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # A private copy of the prompt tokenizer: HF tokenizers change their truncation and padding
    # state on every call, so counting on the pipeline's own one beside the worker would race.
    _counter: Any = field(default=None, init=False, repr=False)
    _count_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _edit_pipes: dict = field(default_factory=dict, init=False, repr=False)  # task -> from_pipe pipeline, made on first use

    def __post_init__(self) -> None:
        # Instance attributes shadow the methods the pipeline calls on itself and its modules.
        pipe = self.pipe
        pipe.encode_prompt = self.prompt_cache.wrap(_timed(pipe.encode_prompt, self._timer, "text_encode"), "text2img")
        pipe.vae.decode = _timed(pipe.vae.decode, self._timer, "vae_decode")
        pipe.vae.encode = _timed(pipe.vae.encode, self._timer, "vae_encode")
        pipe.transformer.forward = _stepped(_timed(pipe.transformer.forward, self._timer, "denoise"), self._hook)

    @property
    def cache_settings(self) -> Any:
        """The server's step-cache settings (MagSettings) requests start from; None: no step cache."""
        return self.step_cache.settings if self.step_cache is not None else None

    def set_step_cache(self, cache: Any) -> None:
        """Put a step cache in effect: at load, before serving (and around calibration's table)."""
        object.__setattr__(self, "step_cache", cache)

    def pipeline_for(self, task: str) -> Any:
        """The pipeline that runs `task`: the loaded text-to-image one, or the family's edit
        pipeline built over its modules with from_pipe (once; weights and engines are shared).
        Called under the runtime's lock."""
        if task == "text2img":
            return self.pipe
        if task not in self._edit_pipes:
            pipe = edit_pipeline(self.pipe, self.family, self.dtype, task)
            pipe.encode_prompt = self.prompt_cache.wrap(_timed(pipe.encode_prompt, self._timer, "text_encode"), task)  # a method of its own
            self._edit_pipes[task] = pipe
        return self._edit_pipes[task]

    @property
    def max_prompt_tokens(self) -> int:
        """The most prompt tokens this pipeline reads (and its built engines take)."""
        most = self.family.prompt.max_tokens(self.pipe)
        built = self.swap.call_kwargs.get("max_sequence_length") if self.swap else None
        return min(most, built) if built else most

    def prompt_tokens(self, text: str) -> int:
        """Tokens the pipeline's text encoder would see for `text`; safe beside generate()."""
        with self._count_lock:
            if self._counter is None:
                counter = copy.deepcopy(getattr(self.pipe, self.family.prompt.tokenizer))
                counter.model_max_length = 1 << 62  # it counts; the "longer than max" warning is for models
                object.__setattr__(self, "_counter", counter)
            return self.family.prompt.count(self.pipe, self._counter, text)

    @property
    def kind(self) -> str:
        if self.swap:
            return self.swap.kind
        return COMPILED_KIND if self.compiled else "torch"

    @property
    def limits(self) -> SizeLimits:
        return (self.swap.limits if self.swap else None) or SizeLimits.of(self.family)

    @property
    def edit_unavailable(self) -> str | None:
        """Why this runtime cannot edit images, with the command that fixes it; None: it can."""
        return self.swap.edit_unavailable if self.swap else None

    @property
    def components(self) -> Mapping[str, str]:
        return self.swap.components if self.swap else {}

    def describe(self) -> dict[str, Any]:
        out = {"runtime": self.kind, "family": self.family.name, "device": self.device, "dtype": self.dtype}
        if self.swap:
            out["components"] = dict(self.swap.components)
            out["engine_profile"] = dict(self.swap.profile)
        if self.compiled:
            out["compile"] = self.compiled.describe()
        out["preview_decoder"] = self.preview.kind if self.preview is not None else "full"
        if self.adapters is not None:
            out["lora"] = self.adapters.describe()
        out["cache"] = self.step_cache.describe() if self.step_cache is not None else {"backend": "none"}
        out["prompt_cache_size"] = self.prompt_cache.size
        return out

    def max_images(self, guidance_scale: float | None, cap: int | None = None) -> int | None:
        """Images one pipeline call can take: `cap` (the operator's), the pipeline's own limit
        (Family.call_images) and the engines' batch ranges (None: no limit). Where CFG doubles
        the transformer batch, half as many."""
        limits = [cap] if cap else []
        if self.family.call_images:
            limits.append(self.family.call_images)
        batch = self.swap.batch_limits if self.swap else {}
        if "transformer" in batch:
            limits.append(batch["transformer"] // self.family.transformer_batch(1, guidance_scale))
        if "vae_decoder" in batch:
            limits.append(batch["vae_decoder"])
        return max(1, min(limits)) if limits else None

    def max_batch(self, cap: int | None = None) -> int | None:
        """Images per call at the family's default guidance."""
        return self.max_images(self.family.defaults.guidance_scale, cap)

    def generate(self, requests: list[GenerationRequest], max_images: int | None = None,
                 should_stop: Callable[[], Cancelled | None] | None = None, on_preview: Preview | None = None) -> BatchResult:
        """One batch of compatible requests, in pipeline calls of at most `max_images` images
        (and what the engines take).

        should_stop() is asked after every denoising step and between calls; the Cancelled it
        returns is raised there, so abandoned work stops within one step (diffusers' own
        `interrupt` would still run the remaining loop and the decode). on_preview(request index,
        image index, partial index, image) gets each request's partial images (its
        preview_steps()): the predicted clean image of that step, decoded like the final one."""
        chunks = self._chunks(requests, max_images)
        images: list[list[Any]] = [[] for _ in requests]
        stages: dict[str, float] = {}
        calls: list[int] = []
        with self._lock:
            switch = self._activate(requests[0].lora)
            for chunk in chunks:
                _stop_if(should_stop)
                calls.append(sum(r.n for _, _, r in chunk))
                previews = _preview_plan(chunk) if on_preview else {}
                hook = self._step_hook(chunk[0][2])
                out, seconds = self._call([r for _, _, r in chunk], should_stop, previews, on_preview, hook)
                it = iter(out)
                for index, _, r in chunk:
                    images[index].extend(next(it) for _ in range(r.n))
                for k, v in seconds.items():
                    stages[k] = stages.get(k, 0.0) + v
            hits = self.prompt_cache.take_counts()
        return BatchResult(images, stages, calls, switch, (hook.computed, hook.reused), hits)

    def _step_hook(self, request: GenerationRequest, record: bool = False) -> StepHook:
        """The call's view of the step cache: the request's plan (every request of a batch has the
        same one: batch_key), from its first step."""
        plan = self.step_cache.plan(request.steps, request.first_step, request.cache) if self.step_cache is not None else None
        return StepHook(plan, request.first_step, record)

    def trace(self, requests: list[GenerationRequest], record: bool = False) -> Trace:
        """One pipeline call of compatible requests (no previews, no adapters), outside the server:
        its hook (the output norms per step when `record`), images and stage seconds."""
        hook = self._step_hook(requests[0], record)
        with self._lock:
            self._activate(())
            images, stages = self._call(requests, hook=hook)
        return Trace(hook, images, stages)

    def _activate(self, lora: tuple[tuple[str, float], ...]) -> float | None:
        """Put the batch's adapter set into effect (under the lock, between batches)."""
        if self.adapters is None:
            if lora:
                raise UsageError("this server serves no LoRA adapters", "lora")
            return None
        return self.adapters.activate(lora)

    def _chunks(self, requests: list[GenerationRequest], cap: int | None) -> list[list[tuple[int, int, GenerationRequest]]]:
        """(request index, first image index, part) per call, so no call exceeds the image
        limit; a request larger than that is split by image, its seeds kept (seed + index), so
        the images are the same as in one call."""
        limit = self.max_images(requests[0].guidance_scale, cap)
        if limit is None:
            return [[(i, 0, r) for i, r in enumerate(requests)]]
        chunks: list[list[tuple[int, int, GenerationRequest]]] = [[]]
        used = 0
        for index, r in enumerate(requests):
            offset = 0
            while offset < r.n:
                if used == limit:
                    chunks.append([])
                    used = 0
                take = min(r.n - offset, limit - used)
                part = replace(r, n=take, seed=r.image_seeds()[offset])
                chunks[-1].append((index, offset, part))
                used += take
                offset += take
        return chunks

    def _call(self, requests: list[GenerationRequest], should_stop: Callable[[], Cancelled | None] | None = None,
              previews: Mapping[int, list[tuple[int, int, int, int]]] | None = None,
              on_preview: Preview | None = None, hook: StepHook | None = None) -> tuple[list[Any], dict[str, float]]:
        timer = StageTimer(self.device)
        self._timer[0] = timer
        hook = hook or StepHook(None)
        self._hook[0] = hook
        t0 = time.perf_counter()
        extra = dict(self.swap.call_kwargs) if self.swap else {}
        if should_stop is not None:
            def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                _stop_if(should_stop)
                return tensors

            extra["callback_on_step_end"] = on_step
        pipe = self.pipeline_for(requests[0].task)
        scheduler = pipe.scheduler
        scheduler.step = self._counting_step(pipe, hook, previews or {}, on_preview, requests[0].height, requests[0].width)
        try:
            with torch.inference_mode():
                out = pipe(**pipeline_kwargs(requests), **extra)
        finally:
            self._timer[0] = None
            self._hook[0] = None
            scheduler.__dict__.pop("step", None)
        seconds = dict(timer.seconds)
        seconds["total"] = time.perf_counter() - t0
        return list(out.images), seconds

    def _counting_step(self, pipe: Any, hook: StepHook, previews: Mapping[int, list[tuple[int, int, int, int]]],
                       on_preview: Preview | None, height: int, width: int) -> Callable[..., Any]:
        """The scheduler's own step, which also ends the step cache's step (`hook`) and decodes the
        predicted clean latents (preview.predicted_clean) at the preview steps: by the fitted map
        where there is one (small previews), else by the VAE as the final image is (full-size previews)."""
        scheduler = pipe.scheduler
        real = type(scheduler).step.__get__(scheduler)

        def step(model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
            out = real(model_output, timestep, sample, *args, **kwargs)
            hook.end_step()
            wanted = previews.get(scheduler.step_index - 1)
            if wanted:
                x0 = predicted_clean(scheduler, sample, model_output)
                rows = torch.tensor([w[0] for w in wanted], device=sample.device)
                if self.preview is not None:
                    grid = self.family.latent_layout.grid(pipe, x0[rows], height, width)
                    images = self.preview.images(grid, width, height)
                else:
                    images = self.family.decode_latents(pipe, x0[rows].to(sample.dtype), height, width)
                for (_, index, image, partial), im in zip(wanted, images):
                    on_preview(index, image, partial, im)
            return out

        return step


def _stepped(fn: Callable, hook_ref: list[StepHook | None]) -> Callable:
    """The transformer's forward through the call's step hook (reuse, recording), if any."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hook = hook_ref[0]
        return fn(*args, **kwargs) if hook is None else hook.forward(fn, args, kwargs)

    return wrapper


def _preview_plan(chunk: list[tuple[int, int, GenerationRequest]]) -> dict[int, list[tuple[int, int, int, int]]]:
    """step -> [(row in the call's batch, request index, image index, partial index)]."""
    plan: dict[int, list[tuple[int, int, int, int]]] = {}
    row = 0
    for index, offset, part in chunk:
        for partial, step in enumerate(part.preview_steps()):
            plan.setdefault(step, []).extend((row + k, index, offset + k, partial) for k in range(part.n))
        row += part.n
    return plan


def _stop_if(should_stop: Callable[[], Cancelled | None] | None) -> None:
    reason = should_stop() if should_stop is not None else None
    if reason is not None:
        raise reason


def _standin_type_note(record: logging.LogRecord) -> bool:
    """Drop diffusers' warning that a stand-in is not the class model_index.json names: that is
    the point of a stand-in. Every other record passes."""
    message = record.getMessage()
    return not (message.startswith("Expected types for") and "StandIn" in message)


def load_pipeline(model: str, options: LoadOptions | None = None, family: Family | None = None, swap: EngineSwap | None = None,
                  source: str | None = None, torch_compile: bool = False) -> PipelineRuntime:
    """Load a pipeline from a hub id or a local folder, with `swap`'s stand-ins passed to
    from_pretrained so the replaced weights are never read. source: where to load from when it
    is not `model` itself (a hub model's local snapshot of configs). torch_compile: compile the
    transformer and VAE decoder and warm them up at options.warmup_size (runtime.compiled).
    options.preview_decoder "mlp" or "linear": the preview map is loaded or fitted here (runtime.preview)."""
    from diffusers import DiffusionPipeline

    options = options or LoadOptions()
    if options.preview_decoder not in PREVIEW_DECODERS:
        raise UsageError(f"unknown preview decoder {options.preview_decoder!r}; choose one of {', '.join(PREVIEW_DECODERS)}")
    family = family or detect_family(model)
    device = options.target_device
    dtype = check_dtype(options.dtype or default_dtype(device))
    log.info("loading %s (%s) on %s in %s", model, family.pipeline_class, device, dtype)
    t0 = time.perf_counter()
    type_notes = logging.getLogger("diffusers.pipelines.pipeline_utils")
    type_notes.addFilter(_standin_type_note)
    try:
        # A family's own parts where diffusers cannot load them as saved (Family.load_replacements), then the engines' stand-ins.
        replacements = dict(family.load_replacements(source or model)) if family.load_replacements else {}
        replacements.update(swap.replacements if swap else {})
        pipe = DiffusionPipeline.from_pretrained(source or model, dtype=torch_dtype(dtype), **replacements)
    finally:
        type_notes.removeFilter(_standin_type_note)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    log.info("loaded in %.1fs", time.perf_counter() - t0)
    # Fitted on the eager VAE and before the stage timers: its decodes are neither compiled nor timed.
    preview = _fitted_preview(pipe, family, swap, options.preview_decoder) if options.preview_decoder != "full" else None
    # Before PipelineRuntime hooks its stage timers on: those stay outside the compiled graphs.
    compiled = compile_pipeline(pipe, family, device, options.warmup_size) if torch_compile else None
    adapters = _adapters(pipe, options.lora, swap, compiled) if options.lora else None
    runtime = PipelineRuntime(model, family, pipe, device, dtype, swap=swap, compiled=compiled, preview=preview, adapters=adapters,
                              prompt_cache=PromptCache(options.prompt_cache_size))
    if options.cache.settings is not None:  # after the hooks: calibration runs through them
        runtime.set_step_cache(step_cache_for(runtime, options.cache))
    return runtime


def _adapters(pipe: Any, lora: LoraOptions, swap: EngineSwap | None, compiled: CompileInfo | None) -> Any:
    """The registry with serve's adapters loaded and checked, and what switches them: diffusers'
    PEFT layers (torch), merged weights copied in place (torch-compile), sessions with merged
    initializers (onnxruntime) or a refit (tensorrt)."""
    kw = dict(max_per_request=lora.max_per_request, loading=lora.loading)
    if compiled is not None:  # merged into the compiled modules' weights in place: a switch recompiles nothing
        weights = ModuleWeights(pipe.transformer)
        return InPlaceAdapters(weights, make_registry(type(pipe), weights.shapes(), dict(lora.modules), lora.lora_dir), **kw)
    if swap is None:
        registry = make_registry(type(pipe), weight_shapes(pipe.transformer), dict(lora.modules), lora.lora_dir)
        return TorchAdapters(pipe, registry, **kw)
    if swap.lora_unavailable:
        raise UsageError(swap.lora_unavailable, "--lora-modules")
    weights = OnnxWeights(swap.lora_onnx, swap.lora_weights)
    if swap.kind == "tensorrt":
        weights.keep(swap.lora_engine.refittable_weights())
    registry = make_registry(type(pipe), weights.shapes(), dict(lora.modules), lora.lora_dir)
    if swap.kind == "tensorrt":
        return RefitAdapters(swap.lora_engine, registry, weights, **kw)
    return SessionAdapters(swap.lora_engine, registry, weights, max_sessions=lora.max_sessions, **kw)


def _fitted_preview(pipe: Any, family: Family, swap: EngineSwap | None, kind: str) -> PreviewMap | None:
    """The preview map of `kind` (mlp, linear), or None (full decodes, with a warning) where it
    cannot be fitted: previews are never worth a model that does not load."""
    limits = (swap.limits if swap else None) or SizeLimits.of(family)
    try:
        return load_or_fit(pipe, family, limits, swap.decoder_id if swap else None, kind=kind)
    except Exception as e:
        log.warning("preview decoder: no %s map (%s: %s); previews are full VAE decodes", kind, type(e).__name__, e)
        return None
