"""A tiny random-weight Stable Diffusion 3.5-style pipeline: the real classes (CLIP-L and
CLIP-bigG with projections, T5, SD3Transformer2DModel with RMS qk-norm and a dual-attention
block like SD3.5 Medium, a factor-8 AutoencoderKL), loadable with DiffusionPipeline.from_pretrained."""

from __future__ import annotations

from pathlib import Path

from ..flux.tiny import TRANSFORMER_STD, tiny_clip_text, tiny_t5
from ..tiny_text import clip_tokenizer, t5_tokenizer
from ..tiny_weights import init_small, tiny_autoencoder_kl

# The pipeline concatenates the two CLIPs' hidden states and zero-pads them to T5's width, and
# their projections to the pooled vector: CLIP_L + CLIP_G <= T5 and pooled == CLIP_L + CLIP_G.
CLIP_L, CLIP_G, T5_HIDDEN = 32, 48, 96
MAX_T5 = 256  # the pipeline's default max_sequence_length: 77 CLIP + 256 T5 = 333 text tokens


def build_tiny(out_dir: Path) -> None:
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    tokenizer_3 = t5_tokenizer(model_max_length=512)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN,
        caption_projection_dim=32,  # == heads x head_dim, as in the real configs
        pooled_projection_dim=CLIP_L + CLIP_G,
        out_channels=16,
        pos_embed_max_size=32,  # latent patches per side: up to 512x512 pixels here
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    text_encoders = (
        tiny_clip_text(len(tokenizer), CLIP_L, projection=True),
        tiny_clip_text(len(tokenizer_2), CLIP_G, projection=True),
        tiny_t5(len(tokenizer_3), T5_HIDDEN),
    )
    init_small(*text_encoders)
    init_small(transformer, std=TRANSFORMER_STD)  # why: see flux/tiny.py
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_autoencoder_kl(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=text_encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoders[2],
        tokenizer_3=tokenizer_3,
        transformer=transformer,
    )
    pipe.save_pretrained(out_dir)
