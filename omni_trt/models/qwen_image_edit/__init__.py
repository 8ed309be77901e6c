"""Qwen-Image-Edit (Qwen/Qwen-Image-Edit-2511, -2509): QwenImageEditPlusPipeline.

Instruction edits only: the pipeline needs 1-3 input images, which both its Qwen2.5-VL text
encoder (at ~384² through the processor's vision tokens) and its VAE (at ~1024², as reference
tokens after the generated ones) read. The transformer and VAE are Qwen-Image's classes; the
transformer's edit switches (zero_cond_t) are read from its config by the export, never from a
name. The processor is loaded without its video half (processor.py: no torchvision needed).
"""

from dataclasses import replace
from math import sqrt
from typing import Any, Callable

from ..base import FIELD_NEGATIVE_PROMPT, FIELD_TRUE_CFG, ComponentSpec, Defaults, Edits, Family, Point, PromptRules, SizeRules
from ..qwen_image import _count
from ..qwen_image.vae import LAYOUT, vae_decoder_spec, vae_encoder_spec
from .processor import load_replacements
from .transformer import transformer_spec

MAX_SEQUENCE_LENGTH = 512  # QwenImageEditPlusPipeline's max_sequence_length default
MAX_REFERENCES = 3  # the model card's 1-3 input images
# Qwen2-VL's smart_resize refuses ratios past 200; the pipeline rounds the condition image's short
# side (at 384² area) to 32 px, which reaches 0 past about 576: 100 keeps both well inside.
MAX_ASPECT = 100.0
# QwenImageEditPlusPipeline's VAE_IMAGE_SIZE: every input image reaches the VAE encoder and the
# transformer at about this area, at its own aspect, whatever the output size.
REFERENCE_AREA = 1024 * 1024
REFERENCE_MULTIPLE = 32  # its calculate_dimensions rounds each side to this


def reference_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) the pipeline resizes an input image of this size to (calculate_dimensions)."""
    w = sqrt(REFERENCE_AREA * width / height)
    return round(w / REFERENCE_MULTIPLE) * REFERENCE_MULTIPLE, round(w * height / width / REFERENCE_MULTIPLE) * REFERENCE_MULTIPLE


def reference_sizes(lo: tuple[int, int], hi: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """Min, opt and max reference (width, height), per axis, over every aspect an input image fitted
    into output sizes lo..hi can have (lo_w/hi_h to hi_w/lo_h, within MAX_ASPECT); opt: square.
    A reference's width grows with its aspect and its height shrinks, so the ends bound each axis."""
    wide = reference_size(min(hi[0], MAX_ASPECT * lo[1]), lo[1])
    tall = reference_size(lo[0], min(hi[1], MAX_ASPECT * lo[0]))
    square = reference_size(1, 1)
    low, high = (min(wide[0], tall[0]), min(wide[1], tall[1])), (max(wide[0], tall[0]), max(wide[1], tall[1]))
    return low, (min(max(square[0], low[0]), high[0]), min(max(square[1], low[1]), high[1])), high


def _at_references(spec: ComponentSpec) -> ComponentSpec:
    """The VAE encoder as this pipeline uses it: it encodes the references only, so its tensors are
    at a point's reference size (Point.at_reference_size)."""
    def moved(shape: Callable[[Point], Any]) -> Callable[[Point], Any]:
        return lambda p: shape(p.at_reference_size())

    return replace(spec, inputs=tuple(replace(t, shape=moved(t.shape)) for t in spec.inputs),
                   outputs=tuple(replace(t, shape=moved(t.shape)) for t in spec.outputs),
                   reference_case=lambda module, point, *a: spec.reference_case(module, point.at_reference_size(), *a))


FAMILY = Family(
    name="qwen-image-edit",
    pipeline_class="QwenImageEditPlusPipeline",
    # The 2511 model card: 40 steps, true CFG 4.0 (a second transformer call per step, only when a
    # negative prompt is given, as for Qwen-Image).
    defaults=Defaults(steps=40, width=1024, height=1024, true_cfg_scale=4.0),
    size=SizeRules(multiple_of=16, min_side=64, max_side=2048),
    fields=frozenset({FIELD_TRUE_CFG, FIELD_NEGATIVE_PROMPT}),
    # The encoder's output keeps the images' vision tokens (~196 per input image) beside the prompt's.
    text_len=(1, 256, 1024),
    edits=Edits(references=MAX_REFERENCES, reference_max_aspect=MAX_ASPECT, generations=False, reference_sizes=reference_sizes),
    cfg_batch_above=None,
    components={"transformer": transformer_spec(), "vae_decoder": vae_decoder_spec(), "vae_encoder": _at_references(vae_encoder_spec())},
    latent_layout=LAYOUT,
    prompt=PromptRules("tokenizer", _count, lambda pipe: MAX_SEQUENCE_LENGTH),
    # Export samples: the second with a reference image, so validation covers the reference tokens
    # and their timestep-0 modulation.
    sample_points=(Point(batch=2, height=48, width=64, text_len=24),
                   Point(batch=3, height=80, width=32, text_len=40, references=1)),
    load_replacements=load_replacements,
    # QwenImageEditPlusPipeline refuses more than one prompt per call: n images are n calls
    # (seed + i each, as one call would give them).
    call_images=1,
)
