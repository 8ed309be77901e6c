"""Stable Diffusion 3 / 3.5: StableDiffusion3Pipeline."""

from ..autoencoder_kl import SCALED, vae_decoder_spec, vae_encoder_spec
from ..base import FIELD_GUIDANCE, FIELD_NEGATIVE_PROMPT, Defaults, Edits, Family, PromptRules, SizeRules, plain_count
from .transformer import transformer_spec

FAMILY = Family(
    name="sd3",
    pipeline_class="StableDiffusion3Pipeline",
    # SD3.5 Large's card: 28 steps, guidance 3.5; CFG doubles the transformer batch.
    defaults=Defaults(steps=28, width=1024, height=1024, guidance_scale=3.5),
    size=SizeRules(multiple_of=16, min_side=64, max_side=2048),
    fields=frozenset({FIELD_GUIDANCE, FIELD_NEGATIVE_PROMPT}),
    # 77 CLIP tokens + 256 T5 tokens (the pipeline's max_sequence_length), always padded.
    text_len=(333, 333, 333),
    edits=Edits("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    cfg_batch_above=1.0,
    components={"transformer": transformer_spec(), "vae_decoder": vae_decoder_spec(latent_channels=16),
                "vae_encoder": vae_encoder_spec(latent_channels=16)},
    latent_layout=SCALED,
    # T5 reads the prompt (the pipeline's max_sequence_length, 256); the CLIPs' 77 are truncated.
    prompt=PromptRules("tokenizer_3", plain_count, lambda pipe: 256),
)
