"""Qwen-Image (Qwen/Qwen-Image): QwenImagePipeline."""

from ..base import FIELD_NEGATIVE_PROMPT, FIELD_TRUE_CFG, Defaults, Edits, Family, PromptRules, SizeRules
from .transformer import transformer_spec
from .vae import LAYOUT, vae_decoder_spec, vae_encoder_spec

MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline's max_sequence_length default


def _count(pipe, tokenizer, text: str) -> int:
    """The pipeline formats the prompt into its template and drops the template's prefix tokens."""
    ids = tokenizer(pipe.prompt_template_encode.format(text), truncation=False)["input_ids"]
    return len(ids) - pipe.prompt_template_encode_start_idx

FAMILY = Family(
    name="qwen-image",
    pipeline_class="QwenImagePipeline",
    # True CFG runs only when a negative prompt is given (a second transformer call per step).
    defaults=Defaults(steps=50, width=1024, height=1024, true_cfg_scale=4.0),
    size=SizeRules(multiple_of=16, min_side=64, max_side=2048),
    fields=frozenset({FIELD_TRUE_CFG, FIELD_NEGATIVE_PROMPT}),
    text_len=(1, 128, 512),
    edits=Edits("QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
    cfg_batch_above=None,
    # Specs carry the released model's static feature dims; transformer_spec(config) /
    # vae_decoder_spec(config) / vae_encoder_spec(config) give them for another config (the tiny test model).
    components={"transformer": transformer_spec(), "vae_decoder": vae_decoder_spec(), "vae_encoder": vae_encoder_spec()},
    latent_layout=LAYOUT,
    prompt=PromptRules("tokenizer", _count, lambda pipe: MAX_SEQUENCE_LENGTH),
)
