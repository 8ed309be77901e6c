"""FLUX.2 [klein] (black-forest-labs/FLUX.2-klein-4B, -9B and their -base variants): Flux2KleinPipeline.

Generations, and reference edits through the pipeline's own `image` argument (its multi-reference
conditioning: each input image is encoded by the VAE and its tokens join the image sequence).
The step-wise distilled checkpoints (`is_distilled` in model_index.json) and the base ones take
different defaults: `variant_defaults` reads the flag, no name is checked.
"""

from typing import Any, Mapping

from ..base import FIELD_GUIDANCE, Defaults, Edits, Family, Point, PromptRules, SizeRules
from .transformer import transformer_spec
from .vae import LAYOUT, vae_decoder_spec, vae_encoder_spec

MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's max_sequence_length; prompts are padded to it
MAX_REFERENCES = 4  # BFL's documented multi-reference limit for klein
# The distilled checkpoints' model cards: 4 steps, guidance ignored (the pipeline skips CFG when
# is_distilled). The base checkpoints: the pipeline's own defaults (50 steps, CFG at 4.0).
DISTILLED = Defaults(steps=4, width=1024, height=1024, guidance_scale=1.0)
BASE = Defaults(steps=50, width=1024, height=1024, guidance_scale=4.0)


def variant_defaults(index: Mapping[str, Any]) -> Defaults:
    """The defaults of a klein checkpoint from its model_index.json (`is_distilled`)."""
    return DISTILLED if index.get("is_distilled", False) else BASE


def _count(pipe, tokenizer, text: str) -> int:
    """The pipeline wraps the prompt in the Qwen3 chat template (thinking off) before tokenizing."""
    templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    return len(tokenizer(templated, truncation=False)["input_ids"])


FAMILY = Family(
    name="flux2-klein",
    pipeline_class="Flux2KleinPipeline",
    defaults=DISTILLED,  # the published klein 4B / 9B are the distilled ones
    variants=variant_defaults,
    size=SizeRules(multiple_of=16, min_side=64, max_side=2048),
    # CFG is a second transformer call on an empty negative prompt the pipeline makes itself
    # (base variants only): no negative_prompt, no true_cfg_scale.
    fields=frozenset({FIELD_GUIDANCE}),
    text_len=(MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH),
    cfg_batch_above=None,
    # Flux2ImageProcessor.check_image_input refuses references past 8:1.
    edits=Edits(references=MAX_REFERENCES, reference_max_aspect=8.0),
    components={"transformer": transformer_spec(), "vae_decoder": vae_decoder_spec(), "vae_encoder": vae_encoder_spec()},
    latent_layout=LAYOUT,
    prompt=PromptRules("tokenizer", _count, lambda pipe: MAX_SEQUENCE_LENGTH),
    # Export samples: the second with a reference image, so validation covers reference tokens.
    sample_points=(Point(batch=2, height=48, width=64, text_len=MAX_SEQUENCE_LENGTH),
                   Point(batch=3, height=80, width=32, text_len=MAX_SEQUENCE_LENGTH, references=1)),
)
