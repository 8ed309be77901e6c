"""Generation requests: parsing, family defaults and validation as pure functions.

Every endpoint's body becomes an `ImageAsk` (server.protocol), and `resolve()` turns an ask
into a `GenerationRequest` for the family, so defaults and messages are the same everywhere,
`omni generate` included. Each rule (size, steps, strength, cost) is a small function of its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import RequestError
from ..models import SizeLimits, parse_size
from .stepcache import MagSettings, request_settings
from ..models.base import FIELD_GUIDANCE, FIELD_NEGATIVE_PROMPT, FIELD_TRUE_CFG, REFERENCE_TASK, Family

MAX_IMAGES = 10
MAX_STEPS = 200
MAX_SCALE = 20.0
SEED_LIMIT = 2**63
CHARS_PER_TOKEN = 32  # a prompt longer than this per allowed token cannot fit: refused untokenized
MAX_PARTIAL_IMAGES = 3  # OpenAI's range for partial_images
EMPTY_PROMPT = "prompt must not be empty or only whitespace"  # one refusal (422) on every route
QUALITIES = ("low", "medium", "high", "auto")
BACKGROUNDS = ("auto", "opaque", "transparent")
# gpt-image's quality as a share of the family's default steps (its recommended count is "high").
QUALITY_SHARE = {"low": 1 / 3, "medium": 2 / 3, "high": 1.0, "auto": 1.0}


@dataclass(frozen=True)
class RequestCaps:
    """What one request may cost, set by the operator (serve's --max-* flags).

    max_prompt_tokens: prompt tokens the model reads (None: all the model can read); prompts
    over CHARS_PER_TOKEN characters per allowed token are refused without tokenizing.
    max_megapixel_steps: width x height x images x steps / 1e6, the work a request asks for."""

    max_prompt_tokens: int | None = None
    max_megapixel_steps: float | None = None


def megapixel_steps(width: int, height: int, n: int, steps: int) -> float:
    return width * height * n * steps / 1e6


def check_text(name: str, value: Any, max_chars: int | None = None) -> str:
    """A text field: a string of valid Unicode (no lone surrogates, which no tokenizer or log
    can take) and, given max_chars, no longer than that."""
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string", name, status=422)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{name} is not valid Unicode text (an unpaired surrogate at character {e.start}); send UTF-8 text", name, status=422) from None
    if max_chars is not None and len(value) > max_chars:
        raise RequestError(f"{name} is {len(value)} characters, more than this server reads ({max_chars})", name)
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request with every default filled in."""

    prompt: str
    width: int
    height: int
    steps: int
    seed: int
    n: int = 1
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    output_format: str = "png"
    output_compression: int | None = None
    partial_images: int = 0  # previews to stream (0: none)
    quality: str = "auto"  # as asked; reported back
    background: str = "auto"
    # Edits: the input image (RGB) and mask (L, white = repaint), and how much of it is redone.
    image: Any = field(default=None, compare=False, repr=False)
    mask: Any = field(default=None, compare=False, repr=False)
    strength: float | None = None
    request_id: str = field(default="", compare=False)
    route: str = field(default="", compare=False)  # what the request came by (metrics' label)
    lora: tuple[tuple[str, float], ...] = ()  # the adapter set (omni_trt.lora.AdapterSet): sorted, no zero scales
    # Reference edits (Edits.references): the input images, together, for the pipeline's own `image`.
    references: tuple = field(default=(), compare=False, repr=False)
    # The step cache's settings for this request (runtime.stepcache.MagSettings); None: uncached.
    cache: Any = None

    @property
    def task(self) -> str:
        """text2img, or the edit task (models.base.EDIT_TASKS): img2img, inpaint (with a mask)."""
        if self.references:
            return REFERENCE_TASK
        if self.image is None:
            return "text2img"
        return "inpaint" if self.mask is not None else "img2img"

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        return (self.task, self.strength, self.width, self.height, self.steps, self.guidance_scale, self.true_cfg_scale,
                self.negative_prompt is None, self.lora, tuple(map(id, self.references)), self.cache)

    @property
    def first_step(self) -> int:
        """The step an edit starts at: diffusers' edit pipelines skip the first (1 - strength)
        of the schedule (t_start = int(steps - steps * strength))."""
        return first_step(self.steps, self.strength)

    def image_seeds(self) -> list[int]:
        """One seed per image, from (request seed, image index): the same alone or batched."""
        return [(self.seed + i) % SEED_LIMIT for i in range(self.n)]

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def preview_steps(self) -> list[int]:
        """0-based denoising steps whose predicted clean image is streamed: evenly spaced, the
        last step excluded (that one is the final image), at most steps - 1 of them."""
        if self.partial_images <= 0:
            return []
        start, run = self.first_step, self.steps - self.first_step
        picks = {start + max(0, (j + 1) * run // (self.partial_images + 1) - 1) for j in range(self.partial_images)}
        return sorted(p for p in picks if p < self.steps - 1)


def _number(name: str, value: Any, lo: float, hi: float, integer: bool) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}", name, status=422)
    if not lo <= value <= hi:
        raise RequestError(f"{name} must be between {lo:g} and {hi:g}, got {value}", name, status=422)
    return value if integer else float(value)


@dataclass(frozen=True)
class ImageAsk:
    """What a client asked for, as it asked (typed, not yet checked against the model): the one
    form every endpoint's body turns itself into (server.protocol), and `omni generate` builds.
    prompt_param: the field a refusal of the prompt names (chat's prompt is its `messages`)."""

    prompt: str
    size: str | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1
    steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    output_format: str = "png"
    output_compression: int | None = None
    partial_images: int = 0
    quality: str | None = None
    background: str | None = None
    strength: float | None = None
    prompt_param: str = "prompt"
    lora: Any = None  # the `lora` field as sent; omni_trt.lora parses it against the server's adapters
    cache: Any = None  # the `cache` field as sent; runtime.stepcache.request_settings reads it against the server's


def first_step(steps: int, strength: float | None) -> int:
    """The step an edit starts at: diffusers' edit pipelines skip the first (1 - strength) of the
    schedule (t_start = int(steps - steps * strength)); 0 for a generation."""
    if strength is None:
        return 0
    return int(max(steps - min(steps * strength, steps), 0))


def resolve_size(family: Family, limits: SizeLimits, size: str | None, width: int | None, height: int | None,
                 image: Any = None) -> tuple[int, int]:
    """(width, height): `size` wins over width/height; "auto" or nothing is the family's default,
    or for an edit the input's size fitted to what the model (and engines) can make."""
    if size == "auto":
        size = None
    if size is None and image is not None and width is None and height is None:
        width, height = limits.fit(*image.size)
    if size is not None:
        width, height = parse_size(size)
    else:
        for name, v in (("width", width), ("height", height)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise RequestError(f"invalid size: {name} must be a positive integer, got {v!r}", "size", status=422)
        width = width or family.defaults.width
        height = height or family.defaults.height
    limits.check(width, height)
    return width, height


def resolve_steps(family: Family, steps: int | None, quality: str) -> int:
    """An explicit num_inference_steps wins over quality (a share of the family's default)."""
    if steps is None:
        return max(1, round(family.defaults.steps * QUALITY_SHARE[quality]))
    return _number("num_inference_steps", steps, 1, MAX_STEPS, integer=True)


def resolve_strength(family: Family, task: str, strength: float | None, steps: int) -> float:
    """An edit's strength (the family's default for the task when not given), refused when it
    leaves no step to run."""
    strength = family.edits.strength(task) if strength is None else _number("strength", strength, 0.0, 1.0, integer=False)
    if first_step(steps, strength) >= steps:
        raise RequestError(f"strength {strength:g} at {steps} steps leaves no step to run: raise strength or "
                           "num_inference_steps (an edit runs strength x steps of them)", "strength")
    return strength


def check_cost(width: int, height: int, n: int, steps: int, caps: RequestCaps) -> None:
    """Refuse a request over the operator's megapixel-steps cap, saying what to ask for instead."""
    if caps.max_megapixel_steps is None:
        return
    cost = megapixel_steps(width, height, n, steps)
    if cost > caps.max_megapixel_steps:
        raise RequestError(
            f"this request asks for {n} image(s) of {width}x{height} at {steps} steps = {cost:.0f} megapixel-steps, more "
            f"than this server's cap of {caps.max_megapixel_steps:g}; ask for fewer images (n), fewer steps "
            "(num_inference_steps) or a smaller size", "n")


def check_choice(name: str, value: str | None, choices: tuple[str, ...]) -> str:
    """A field with a closed set of values; None is "auto"."""
    value = value or "auto"
    if value not in choices:
        raise RequestError(f"{name} must be one of {', '.join(choices)}, got {value!r}", name, status=422)
    return value


def edit_inputs(family: Family, inputs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """An edit's (image, mask) pairs as requests: each image its own, or, for a family that edits
    through its pipeline's `image` argument (Edits.references), all of them as one request's."""
    if not family.edits.references or inputs[0][0] is None:
        return inputs
    return [(tuple(image for image, _ in inputs), inputs[0][1])]


def check_references(family: Family, limits: SizeLimits, images: Any, mask: Any, strength: float | None) -> tuple:
    """The input images of a family that edits through its own pipeline's `image` argument
    (Edits.references): 1 to its most, each fitted to the sizes the model (and its engines) make,
    so their tokens stay inside what was built. No mask or strength: those are image-to-image's."""
    if images is None:
        return ()
    images = tuple(images) if isinstance(images, (list, tuple)) else (images,)
    if len(images) > family.edits.references:
        raise RequestError(f"{len(images)} input images: this model takes at most {family.edits.references} per request", "image")
    if mask is not None or strength is not None:
        raise RequestError("this model edits from the prompt and its input images: it takes no mask or strength",
                           "mask" if mask is not None else "strength")
    most = family.edits.reference_max_aspect
    for im in images:
        if most is not None and max(im.size) > most * min(im.size):
            raise RequestError(f"an input image is {im.size[0]}x{im.size[1]}: this model takes images up to {most:g}:1", "image")
    return tuple(fit_inputs(im, None, *limits.fit(*im.size))[0] for im in images)


def edit_only_input(family: Family, size: str | None) -> Any:
    """None, or for an edit-only family (Edits.generations False) a plain grey input image at `size`
    (None: the family's default size): what a warm-up or a benchmark edits where others generate."""
    if family.edits.generations:
        return None
    from PIL import Image

    width, height = parse_size(size) if size else (family.defaults.width, family.defaults.height)
    return Image.new("RGB", (width, height), (128, 128, 128))


def fit_inputs(image: Any, mask: Any, width: int, height: int) -> tuple[Any, Any]:
    """The edit's input (and mask) at the output size: not every family's edit pipeline resizes it
    itself (ZImageImg2ImgPipeline takes the image's own size), so every family gets it the same."""
    if image.size == (width, height):
        return image, mask
    from PIL import Image

    image = image.resize((width, height), Image.Resampling.LANCZOS)
    if mask is not None:
        mask = mask.resize((width, height), Image.Resampling.NEAREST)
    return image, mask


def resolve(family: Family, ask: ImageAsk, *, limits: SizeLimits | None = None, caps: RequestCaps | None = None,
            image: Any = None, mask: Any = None, request_id: str = "", cache: MagSettings | None = None,
            route: str = "") -> GenerationRequest:
    """Fill the family's defaults and validate. Fields that do not apply to the family (e.g.
    true_cfg_scale for Z-Image) are dropped, not errors: generic clients send them to every model.
    Token counts need the tokenizer: the caller checks them. cache: the server's step-cache
    settings, which the request's `cache` field keeps, changes or turns off."""
    try:
        out = _resolve(family, ask, limits or SizeLimits.of(family), caps or RequestCaps(), image, mask, request_id)
        return replace(out, cache=request_settings(ask.cache, cache), route=route)
    except RequestError as e:
        if e.param == "prompt":
            e.param = ask.prompt_param
        raise


def _resolve(family: Family, ask: ImageAsk, limits: SizeLimits, caps: RequestCaps, image: Any, mask: Any,
             request_id: str) -> GenerationRequest:
    max_chars = caps.max_prompt_tokens * CHARS_PER_TOKEN if caps.max_prompt_tokens else None
    prompt = check_text("prompt", ask.prompt, max_chars)
    if not prompt.strip():
        raise RequestError(EMPTY_PROMPT, "prompt", status=422)
    quality = check_choice("quality", ask.quality, QUALITIES)
    background = check_choice("background", ask.background, BACKGROUNDS)
    if background == "transparent":
        raise RequestError("background 'transparent' is not available: no served model makes an alpha channel; "
                           "use 'opaque' or 'auto'", "background")
    partial_images = _number("partial_images", ask.partial_images, 0, MAX_PARTIAL_IMAGES, integer=True)
    if image is None and not family.edits.generations:  # an edit-only model (Edits.generations)
        raise RequestError("this model edits images and cannot generate from text alone: send the images to "
                           "/v1/images/edits (or a chat message with an image)", "image")
    references = ()
    if family.edits.references:
        image, references = None, check_references(family, limits, image, mask, ask.strength)
    width, height = resolve_size(family, limits, ask.size, ask.width, ask.height, references[0] if references else image)
    n = _number("n", ask.n, 1, MAX_IMAGES, integer=True)
    steps = resolve_steps(family, ask.steps, quality)
    guidance_scale, true_cfg_scale = (None if v is None else _number(name, v, 0.0, MAX_SCALE, integer=False)
                                      for name, v in (("guidance_scale", ask.guidance_scale), ("true_cfg_scale", ask.true_cfg_scale)))
    negative_prompt = None if ask.negative_prompt is None else check_text("negative_prompt", ask.negative_prompt, max_chars)
    seed = random.randrange(2**31) if ask.seed is None else _number("seed", ask.seed, 0, SEED_LIMIT - 1, integer=True)
    if ask.output_format not in ("png", "jpeg", "webp"):
        raise RequestError(f"output_format must be one of png, jpeg, webp, got {ask.output_format!r}", "output_format", status=422)
    compression = ask.output_compression
    if compression is not None:
        compression = _number("output_compression", compression, 0, 100, integer=True)
    strength = None
    if image is not None:
        image, mask = fit_inputs(image, mask, width, height)
        strength = resolve_strength(family, "inpaint" if mask is not None else "img2img", ask.strength, steps)
    elif ask.strength is not None or mask is not None:
        raise RequestError("strength and mask apply to edits: send an image", "strength" if ask.strength is not None else "mask")
    check_cost(width, height, n, steps, caps)
    defaults, fields = family.defaults, family.fields
    return GenerationRequest(
        prompt=prompt,
        width=width,
        height=height,
        steps=steps,
        seed=seed,
        n=n,
        negative_prompt=negative_prompt if FIELD_NEGATIVE_PROMPT in fields else None,
        guidance_scale=(defaults.guidance_scale if guidance_scale is None else guidance_scale) if FIELD_GUIDANCE in fields else None,
        true_cfg_scale=(defaults.true_cfg_scale if true_cfg_scale is None else true_cfg_scale) if FIELD_TRUE_CFG in fields else None,
        output_format=ask.output_format,
        output_compression=compression,
        partial_images=partial_images,
        quality=quality,
        background=background,
        image=image,
        mask=mask,
        strength=strength,
        request_id=request_id,
        references=references,
    )


def pipeline_kwargs(requests: list[GenerationRequest]) -> dict[str, Any]:
    """One diffusers call for a batch of compatible requests: prompts repeated per image,
    one generator per image."""
    import torch

    first = requests[0]
    assert all(r.batch_key() == first.batch_key() for r in requests), "batch mixes incompatible requests"
    prompts = [r.prompt for r in requests for _ in range(r.n)]
    kwargs: dict[str, Any] = {
        # A fresh list: ZImagePipeline writes the templated text back into the caller's list.
        "prompt": list(prompts),
        "height": first.height,
        "width": first.width,
        "num_inference_steps": first.steps,
        "num_images_per_prompt": 1,
        "generator": [torch.Generator("cpu").manual_seed(s) for r in requests for s in r.image_seeds()],
        "output_type": "pil",
    }
    if first.negative_prompt is not None:
        kwargs["negative_prompt"] = [r.negative_prompt for r in requests for _ in range(r.n)]
    if first.guidance_scale is not None:
        kwargs["guidance_scale"] = first.guidance_scale
    if first.true_cfg_scale is not None:
        kwargs["true_cfg_scale"] = first.true_cfg_scale
    if first.references:  # the same references condition every image of the call (batch_key)
        kwargs["image"] = list(first.references)
    if first.image is not None:  # one input image (and mask) per output image
        kwargs["image"] = [r.image for r in requests for _ in range(r.n)]
        kwargs["strength"] = first.strength
        if first.mask is not None:
            kwargs["mask_image"] = [r.mask for r in requests for _ in range(r.n)]
    return kwargs
