"""FLUX.1 (black-forest-labs/FLUX.1-dev): FluxPipeline."""

from ..autoencoder_kl import PACKED, vae_decoder_spec, vae_encoder_spec
from ..base import (
    FIELD_GUIDANCE,
    FIELD_NEGATIVE_PROMPT,
    FIELD_TRUE_CFG,
    Defaults,
    Edits,
    Family,
    PromptRules,
    SizeRules,
    plain_count,
)
from .transformer import transformer_spec

FAMILY = Family(
    name="flux",
    pipeline_class="FluxPipeline",
    # Guidance is an embedding (no CFG batch); true CFG needs a negative prompt and true_cfg_scale > 1.
    defaults=Defaults(steps=28, width=1024, height=1024, guidance_scale=3.5, true_cfg_scale=1.0),
    size=SizeRules(multiple_of=16, min_side=64, max_side=2048),
    fields=frozenset({FIELD_GUIDANCE, FIELD_TRUE_CFG, FIELD_NEGATIVE_PROMPT}),
    # T5 prompts are always padded to max_sequence_length (512).
    text_len=(512, 512, 512),
    edits=Edits("FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    cfg_batch_above=None,
    components={"transformer": transformer_spec(), "vae_decoder": vae_decoder_spec(latent_channels=16),
                "vae_encoder": vae_encoder_spec(latent_channels=16)},
    latent_layout=PACKED,
    # T5 reads the prompt (512 tokens); CLIP's 77 are truncated by the pipeline, as always for FLUX.1.
    prompt=PromptRules("tokenizer_2", plain_count, lambda pipe: 512),
)
