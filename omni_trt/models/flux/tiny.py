"""A tiny random-weight FLUX.1-dev-style pipeline: the real classes (CLIP-L + T5 text encoders,
FluxTransformer2DModel with guidance embeddings, a factor-8 AutoencoderKL), saved with
save_pretrained so DiffusionPipeline.from_pretrained(dir) loads it like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..tiny_text import clip_tokenizer, t5_tokenizer
from ..tiny_weights import init_small, tiny_autoencoder_kl

CLIP_HIDDEN = 24  # == transformer pooled_projection_dim (FluxPipeline uses CLIP's pooler_output)
T5_HIDDEN = 40  # == transformer joint_attention_dim
MAX_TEXT = 512  # FluxPipeline's max_sequence_length; the family's text_len
TRANSFORMER_STD = 0.1  # weights large enough that every block shows in the output

# black-forest-labs/FLUX.1-dev scheduler_config.json: shift depends on the image token count.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def tiny_clip_text(vocab_size: int, hidden: int, projection: bool) -> object:
    """A 2-layer CLIP text encoder with CLIP-L's token ids (bos/eos from the tiny tokenizer)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_t5(vocab_size: int, hidden: int) -> object:
    """A 2-layer T5 v1.1-style encoder (gated GELU, as T5-XXL in Flux and SD3)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=hidden,
            d_kv=8,
            d_ff=2 * hidden,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
    )


def build_tiny(out_dir: Path) -> None:
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer(model_max_length=MAX_TEXT)
    text_encoder = tiny_clip_text(len(tokenizer), CLIP_HIDDEN, projection=False)
    text_encoder_2 = tiny_t5(len(tokenizer_2), T5_HIDDEN)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=True,  # FLUX.1-dev; schnell has none
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) does for 128
    )
    init_small(text_encoder, text_encoder_2)
    # At std 0.02 the blocks move the output by ~1e-3 (relative), so a wrong RoPE table would
    # still pass the 1e-4 export gate; at 0.1 it moves it by ~1e-2.
    init_small(transformer, std=TRANSFORMER_STD)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=tiny_autoencoder_kl(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(out_dir)
