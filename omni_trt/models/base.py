"""The family contract: what export, build, runtime and server need to know about one model family.

Each family module builds one `Family` from these pieces. Shape arithmetic lives in
`TensorSpec.shape` (a function of a request-space `Point`), and export sample inputs, engine
profiles and runtime range checks are all derived from it, so it is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

if TYPE_CHECKING:  # torch is heavy; the server's pure parts import this module too
    import torch

# Build order; the VAE encoder (edits only) comes last, so a text-to-image engine dir is the first two.
COMPONENTS = ("transformer", "vae_decoder", "vae_encoder")
EDIT_TASKS = ("img2img", "inpaint")  # no mask: image-to-image; a mask: inpainting
# The edit task of a family whose input images go to its own pipeline's `image` argument
# (multi-reference / instruction edits: Edits.references).
REFERENCE_TASK = "reference"


# A pipeline folder may carry its own request defaults (the trained demo model draws 128x128 in a
# few steps, not its family's 1024x1024): runtime.loader reads them from the folder, so no code
# checks a model's name; the demo's trainer writes them.
DEFAULTS_FILE = "omni_trt_defaults.json"


@dataclass(frozen=True)
class Defaults:
    """Request defaults of a family; the same on every endpoint."""

    steps: int
    width: int
    height: int
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None


@dataclass(frozen=True)
class SizeRules:
    """Which image sizes a family can make (pixels)."""

    multiple_of: int
    min_side: int
    max_side: int


@dataclass(frozen=True)
class Point:
    """A point in request space that fixes every tensor dim of a component.

    batch: the component's batch (for the transformer this includes CFG copies when the
    family runs CFG as one batch); height/width: image pixels; text_len: text tokens the
    transformer sees (after any padding the family does).
    """

    batch: int
    height: int
    width: int
    text_len: int
    references: int = 0  # reference images the transformer also sees (Edits.references)
    # The size of each reference image, where the pipeline resizes them whatever the output size
    # (Edits.reference_sizes); 0: the point's own height and width.
    reference_height: int = 0
    reference_width: int = 0

    def at_reference_size(self) -> "Point":
        """This point with a reference image's height and width as its own."""
        return replace(self, height=self.reference_height or self.height, width=self.reference_width or self.width)


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX / engine input or output.

    shape: concrete shape at a request point. dynamic: axis -> dim name; tensors sharing a
    name share the dim (one torch.export.Dim, one ONNX dim_param). dtype: "compute" means
    the export dtype (bf16/fp16/fp32); otherwise a torch dtype name ("float32", "int64", "bool").
    """

    name: str
    shape: Callable[[Point], tuple[int, ...]]
    dynamic: Mapping[int, str] = field(default_factory=dict)
    dtype: str = "compute"


class Engine(Protocol):
    """What a stand-in module calls: named tensors in, named tensors out."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def __call__(self, feeds: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]: ...


@dataclass(frozen=True)
class ReferenceCase:
    """Inputs for the tensor-only wrapper, and what the ORIGINAL diffusers forward returned
    for the equivalent original inputs (the validation target)."""

    inputs: dict[str, "torch.Tensor"]
    expected: dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class ComponentSpec:
    """One exportable component (the transformer, the VAE decoder or the VAE encoder) of a family.

    pipeline_attr: the pipeline attribute holding the module ("transformer" or "vae").
    wrapper(module): a tensor-only nn.Module; forward takes the inputs in `inputs` order and
        returns the outputs in `outputs` order (a tensor or a tuple of tensors).
    reference_case(module, point, dtype, generator): random original inputs at `point`, run
        through the original forward; the same values prepared for the wrapper.
    standin(config, engine, **parts): a module the pipeline can call in place of the original
        (same signature and return type), built from the component's config alone (no weights).
    part_of: the component whose stand-in also answers for this one, where both replace the same
        pipeline attribute (the VAE encoder is part of the VAE decoder's `vae` stand-in); this
        component has no stand-in of its own, and its engine reaches the owner's `standin` as the
        keyword argument named after it (None there: built without it).
    allow_fp16: False where fp16 is known to be inaccurate (Flux-style VAEs).
    """

    name: str
    pipeline_attr: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrapper: Callable[[Any], Any]
    reference_case: Callable[..., ReferenceCase]
    standin: Callable[..., Any] | None = None
    part_of: str | None = None
    allow_fp16: bool = True

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def shapes(self, point: Point) -> dict[str, tuple[int, ...]]:
        return {t.name: tuple(t.shape(point)) for t in self.inputs}

    def profile(self, lo: Point, opt: Point, hi: Point) -> dict[str, tuple[tuple[int, ...], ...]]:
        """min/opt/max shape per input, for a TensorRT optimization profile."""
        return {t.name: (tuple(t.shape(lo)), tuple(t.shape(opt)), tuple(t.shape(hi))) for t in self.inputs}


# Optional request fields a family may take, beyond prompt/size/steps/seed/n.
FIELD_NEGATIVE_PROMPT = "negative_prompt"
FIELD_GUIDANCE = "guidance_scale"
FIELD_TRUE_CFG = "true_cfg_scale"


@dataclass(frozen=True)
class PromptRules:
    """How a family's pipeline reads a prompt, so a server can refuse what it cannot read before
    queueing it (the pipelines truncate silently, and a tiny config can be shorter still).

    count(pipe, text): tokens the text encoder that bounds the prompt sees for `text`, counted
        the way the pipeline builds its input (chat template, prefix it drops, special tokens).
    max_tokens(pipe): the most the pipeline reads (its max_sequence_length default, or less
        where the loaded model's own config cannot take that many).
    tokenizer: the pipeline attribute holding that encoder's tokenizer.
    """

    tokenizer: str
    count: Callable[[Any, Any, str], int]  # (pipe, tokenizer, text); tokenizer: a private copy
    max_tokens: Callable[[Any], int]


def plain_count(pipe: Any, tokenizer: Any, text: str) -> int:
    """Tokens of `text` as the tokenizer encodes it alone, special tokens included (T5's EOS)."""
    return len(tokenizer(text, truncation=False)["input_ids"])


@dataclass(frozen=True)
class Edits:
    """How a family edits images: diffusers' own Img2Img and Inpaint pipelines (class names in
    `diffusers`), built with `from_pipe` over the text-to-image pipeline's modules, and the default
    `strength` per task (those pipelines' own defaults in diffusers 0.42)."""

    img2img_pipeline: str | None = None
    inpaint_pipeline: str | None = None
    img2img_strength: float = 0.6
    inpaint_strength: float = 0.6
    # > 0: the family edits through its own pipeline's `image` argument instead (task "reference"):
    # up to this many input images condition one call together; no strength, no mask.
    references: int = 0
    reference_max_aspect: float | None = None  # the longest side over the shortest a reference may have
    # False: the pipeline needs an input image (an edit-only model): generations are refused.
    generations: bool = True
    # Where the pipeline resizes every reference to a size of its own whatever the output size
    # (Qwen-Image-Edit: about 1024x1024 area at the image's aspect): ((min_w, min_h), (max_w, max_h))
    # output sizes -> the min, opt and max (width, height) a reference then has, per axis, for the
    # engine profiles. None: references at the output size.
    reference_sizes: Callable[[tuple[int, int], tuple[int, int]], tuple[tuple[int, int], ...]] | None = None

    def pipeline_class(self, task: str) -> str | None:
        """The diffusers class name for `task`; None for "reference": the family's own pipeline."""
        if task == REFERENCE_TASK:
            return None
        return {"img2img": self.img2img_pipeline, "inpaint": self.inpaint_pipeline}[_task(task)]

    def strength(self, task: str) -> float:
        return {"img2img": self.img2img_strength, "inpaint": self.inpaint_strength}[_task(task)]


def _task(task: str) -> str:
    if task not in EDIT_TASKS:
        raise ValueError(f"edit task {task!r}: choose one of {', '.join(EDIT_TASKS)}")
    return task


@dataclass(frozen=True)
class LatentLayout:
    """How a family's pipeline turns the latents its scheduler steps on into pixels, in two halves,
    so previews can take either the full decoder or a cheap map on the latent grid.

    grid(pipe, latents, height, width): the scheduler's latents (packed for Flux/Qwen-Image) as a
        (B, C, H/8, W/8) grid of latent pixels, still in the normalised space the transformer sees.
    decode(pipe, grid): that grid undone (unscale/shift or per-channel mean/std) and through the
        VAE as the pipeline does after its loop: pixels (B, 3, H, W), about [-1, 1], not clamped.
    channels(pipe): C, the latent channels of the grid.
    """

    grid: Callable[[Any, Any, int, int], Any]
    decode: Callable[[Any, Any], Any]
    channels: Callable[[Any], int]


@dataclass(frozen=True)
class Family:
    """Everything about one model family, declared once.

    name: short name used on the command line ("z-image").
    pipeline_class: diffusers class name in model_index.json.
    fields: which optional request fields apply (FIELD_*); others are ignored for this family.
    text_len: (min, opt, max) text tokens the transformer sees, for engine profiles.
    cfg_batch_above: the pipeline doubles the transformer batch for CFG when guidance_scale is
        above this (Z-Image: 0, SD3: 1); None where CFG is a second call (Qwen-Image, Flux).
    components: ComponentSpec per name in COMPONENTS.
    prompt: how the pipeline reads a prompt (PromptRules).
    latent_layout: how its latents become pixels (LatentLayout); `decode_latents` is the whole way.
    pixels_per_token: image pixels per side of one transformer token (VAE x8, 2x2 patches).
    edits: its image-to-image and inpainting pipelines and default strengths.
    sample_points: two distinct points (every dynamic dim > 1 and different) used for export
        and validation; None lets export derive them from the size rules.
    """

    name: str
    pipeline_class: str
    defaults: Defaults
    size: SizeRules
    fields: frozenset[str]
    text_len: tuple[int, int, int]
    cfg_batch_above: float | None
    components: Mapping[str, ComponentSpec]
    prompt: PromptRules
    latent_layout: LatentLayout
    edits: Edits
    sample_points: tuple[Point, Point] | None = None
    pixels_per_token: int = 16
    # LoRA: the transformer layers adapters usually target (diffusers' attention projections in every
    # served family); the pipeline class's own LoraLoaderMixin reads and converts the files.
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # A checkpoint's own defaults from its model_index.json (FLUX.2 klein: distilled or base); None: `defaults`.
    variants: Callable[[Mapping[str, Any]], Defaults] | None = None
    # from_pretrained keyword arguments the family builds itself from the model (a hub id or folder):
    # parts diffusers cannot load as saved (Qwen-Image-Edit: its processor without torchvision).
    load_replacements: Callable[[str], Mapping[str, Any]] | None = None
    # The most images one pipeline call can make, where the pipeline itself refuses more
    # (QwenImageEditPlusPipeline: one prompt per call); None: no limit of its own.
    call_images: int | None = None

    def defaults_for(self, index: Mapping[str, Any]) -> Defaults:
        """The request defaults of the model whose model_index.json is `index`."""
        return self.defaults if self.variants is None else self.variants(index)

    def image_tokens(self, width: int, height: int) -> int:
        """Transformer tokens of one image (OpenAI's usage.output_tokens)."""
        return (width // self.pixels_per_token) * (height // self.pixels_per_token)

    def decode_latents(self, pipe: Any, latents: Any, height: int, width: int) -> list[Any]:
        """PIL images from latents in the layout the scheduler steps on, decoded as the pipeline
        does after its loop (unpack, unscale, VAE, postprocess): full-decoder previews."""
        pixels = self.latent_layout.decode(pipe, self.latent_layout.grid(pipe, latents, height, width))
        return pipe.image_processor.postprocess(pixels, output_type="pil")

    def transformer_batch(self, images: int, guidance_scale: float | None) -> int:
        """The transformer's batch for `images` images: doubled where the family runs CFG as one
        batch and the guidance asks for it. True CFG (a second call) keeps the batch."""
        if self.cfg_batch_above is None:
            return images
        scale = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        return images * 2 if scale is not None and scale > self.cfg_batch_above else images

    def standins(self, configs: Mapping[str, Mapping[str, Any]], engines: Mapping[str, Engine],
                 missing: Callable[[str], Engine | None] = lambda name: None) -> dict[str, Any]:
        """Stand-in modules per pipeline attribute for the components in `engines`: one per
        attribute, built by the component owning it with the engines of the components that are
        part of it (`missing(name)` for those not in `engines`). configs: pipeline attr -> config."""
        orphans = [n for n in engines if self.components[n].part_of is not None and self.components[n].part_of not in engines]
        if orphans:
            raise ValueError(f"{', '.join(orphans)} run inside the stand-in of {', '.join(self.components[n].part_of for n in orphans)}: give that engine too")
        out: dict[str, Any] = {}
        for name, engine in engines.items():
            spec = self.components[name]
            if spec.part_of is not None:
                continue
            if spec.standin is None:
                raise ValueError(f"{self.name} {name} has no engine stand-in")
            parts = {p: engines[p] if p in engines else missing(p) for p, s in self.components.items() if s.part_of == name}
            out[spec.pipeline_attr] = spec.standin(configs[spec.pipeline_attr], engine, **parts)
        return out
