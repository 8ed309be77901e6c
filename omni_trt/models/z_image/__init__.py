"""Z-Image (Tongyi-MAI/Z-Image-Turbo): ZImagePipeline."""

from ..autoencoder_kl import SCALED, vae_decoder_spec, vae_encoder_spec
from ..base import (
    FIELD_GUIDANCE,
    FIELD_NEGATIVE_PROMPT,
    Defaults,
    Edits,
    Family,
    Point,
    PromptRules,
    SizeRules,
)
from .transformer import SEQ_MULTI_OF, transformer_spec

MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's max_sequence_length default


def _count(pipe, tokenizer, text: str) -> int:
    """The pipeline wraps the prompt in the tokenizer's chat template (thinking enabled)."""
    templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    return len(tokenizer(templated, truncation=False)["input_ids"])


def _max_tokens(pipe) -> int:
    """Captions are padded to a multiple of 32 and image RoPE positions start after them on axis
    0, so the transformer's axes_lens[0] bounds the caption too (a tiny config's 512 takes 480)."""
    axis0 = int(pipe.transformer.config["axes_lens"][0])
    return min(MAX_SEQUENCE_LENGTH, (axis0 - 2) // SEQ_MULTI_OF * SEQ_MULTI_OF)

FAMILY = Family(
    name="z-image",
    pipeline_class="ZImagePipeline",
    # Turbo: 9 steps (8 transformer passes), no CFG.
    defaults=Defaults(steps=9, width=1024, height=1024, guidance_scale=0.0),
    # VAE x8 then 2x2 patches.
    size=SizeRules(multiple_of=16, min_side=64, max_side=2048),
    fields=frozenset({FIELD_GUIDANCE, FIELD_NEGATIVE_PROMPT}),
    # Captions are padded to a multiple of 32 inside the model; 512 is the pipeline's max.
    text_len=(32, 128, 512),
    # diffusers' own edit pipelines; strengths are their defaults (ZImageInpaintPipeline's is 1.0).
    edits=Edits("ZImageImg2ImgPipeline", "ZImageInpaintPipeline", inpaint_strength=1.0),
    cfg_batch_above=0.0,
    components={"transformer": transformer_spec(), "vae_decoder": vae_decoder_spec(latent_channels=16),
                "vae_encoder": vae_encoder_spec(latent_channels=16)},
    latent_layout=SCALED,
    prompt=PromptRules("tokenizer", _count, _max_tokens),
    # Image tokens and captions are both padded to multiples of 32, so the derived points (text_len
    # 32, <= 32 image tokens) would make the two dims equal and torch.export would merge them.
    # Here: batch 2, 32 image tokens, 96 caption tokens; then batch 3, 64 image tokens (35 real),
    # 128 caption tokens (captions of 123/84/45 tokens: pad-to-32 rows and batch padding).
    sample_points=(
        Point(batch=2, height=64, width=96, text_len=96),
        Point(batch=3, height=80, width=112, text_len=128),
    ),
)
