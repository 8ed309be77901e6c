"""Qwen-Image (Qwen/Qwen-Image): QwenImagePipeline."""

from ..base import FIELD_NEGATIVE_PROMPT, FIELD_TRUE_CFG, Defaults, Edits, Family, SizeRules
from .transformer import transformer_spec
from .vae import vae_decoder_spec, vae_encoder_spec

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
)
