"""Stable Diffusion 3.5 Large at its published shapes with random weights, for GPU benchmarks
without downloads.

The transformer (38 MMDiT blocks of 38 x 64, 8.06B parameters) and the VAE are the published
architectures; the three text encoders keep the widths the pipeline and transformer read (CLIP-L
768 + CLIP-bigG 1280 = 2048 pooled and zero-padded to T5-XXL's 4096) but have one layer and the tiny
tokenizers' vocabularies. Built like flux/real.py: parameters materialised once, in the target dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..autoencoder_kl import published_config
from ..flux.real import CLIP_L, clip_text_one_layer, t5_xxl_one_layer
from ..random_weights import MAX_SHARD, random_model, torch_dtype
from ..tiny_text import clip_tokenizer, t5_tokenizer
from ..tiny_weights import init_small

# stabilityai/stable-diffusion-3.5-large transformer/config.json. Differs from the
# SD3Transformer2DModel defaults (SD3 Medium's 2B) in num_layers (18), num_attention_heads (18),
# caption_projection_dim (1152), pos_embed_max_size (96) and qk_norm (None); the published values
# are used. 8.06B parameters.
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=38,  # class default 18
    attention_head_dim=64,
    num_attention_heads=38,  # class default 18
    joint_attention_dim=4096,  # T5-XXL d_model
    caption_projection_dim=2432,  # = 38 x 64; class default 1152
    pooled_projection_dim=2048,  # CLIP-L 768 + CLIP-bigG 1280 projections
    out_channels=16,
    pos_embed_max_size=192,  # up to 3072 px per side; class default 96
    dual_attention_layers=(),  # 3.5 Medium's MMDiT-X blocks; Large has none
    qk_norm="rms_norm",  # class default None
)

# stabilityai/stable-diffusion-3.5-large vae/config.json: Flux's VAE but for scaling and shift.
VAE_CONFIG: dict[str, Any] = published_config(scaling_factor=1.5305, shift_factor=0.0609)

# stabilityai/stable-diffusion-3.5-large scheduler/scheduler_config.json (static shift, no dynamic).
SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)

# laion/CLIP-ViT-bigG-14 text tower as shipped in SD3.5 (text_encoder_2).
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
MAX_T5 = 512  # tokenizer_3's model_max_length; the pipeline's default max_sequence_length is 256


def build_real_shapes(out_dir: Path, dtype: str = "bf16", overrides: Mapping[str, Any] | None = None) -> None:
    """Write StableDiffusion3Pipeline with the published SD3.5 Large transformer and VAE (random
    weights) to out_dir.

    overrides: merged into TRANSFORMER_CONFIG (tests build {"num_layers": 1} at full width).
    Full size: ~16 GB on disk in bf16 and about as much RAM while building."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    dt = torch_dtype(dtype)
    torch.manual_seed(0)
    # SD3's bigG tokenizer pads with "!", as the published tokenizer_2 does.
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    tokenizer_3 = t5_tokenizer(model_max_length=MAX_T5)
    text_encoders = (
        clip_text_one_layer(len(tokenizer), projection=True, **CLIP_L),
        clip_text_one_layer(len(tokenizer_2), projection=True, **CLIP_G),
        t5_xxl_one_layer(len(tokenizer_3)),
    )
    init_small(*text_encoders)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=random_model(AutoencoderKL, VAE_CONFIG, dt),
        text_encoder=text_encoders[0].to(dt),
        tokenizer=tokenizer,
        text_encoder_2=text_encoders[1].to(dt),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoders[2].to(dt),
        tokenizer_3=tokenizer_3,
        transformer=random_model(SD3Transformer2DModel, {**TRANSFORMER_CONFIG, **(overrides or {})}, dt),
    )
    pipe.save_pretrained(out_dir, max_shard_size=MAX_SHARD)
