"""Stable Diffusion 3.5 pipelines with random weights: the tiny test pipeline (the real classes:
CLIP-L and CLIP-bigG with projections, T5, SD3Transformer2DModel with RMS qk-norm and a
dual-attention block like SD3.5 Medium, a factor-8 AutoencoderKL), and SD3.5 Large's published
shapes for GPU benchmarks without downloads.

Real shapes: the transformer (38 MMDiT blocks of 38 x 64, 8.06B parameters) and the VAE are the
published architectures; the three text encoders keep the widths the pipeline and transformer read
(CLIP-L 768 + CLIP-bigG 1280 = 2048 pooled and zero-padded to T5-XXL's 4096) but have one layer and
the tiny tokenizers' vocabularies. Built like flux.py: parameters materialised once, in the target dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..dtypes import torch_dtype
from .autoencoder import autoencoder_kl_config, tiny_autoencoder_kl
from .flux import CLIP_L, T5_XXL, TRANSFORMER_STD, clip_text, t5_encoder, tiny_clip, tiny_t5
from .text import clip_tokenizer, t5_tokenizer
from .weights import MAX_SHARD, init_small, random_model

SCALING, SHIFT = 1.5305, 0.0609  # stabilityai/stable-diffusion-3.5-large vae/config.json
VAE_CONFIG: dict[str, Any] = autoencoder_kl_config(SCALING, SHIFT)

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
# The pipeline concatenates the two CLIPs' hidden states and zero-pads them to T5's width, and
# their projections to the pooled vector: CLIP_L + CLIP_G <= T5 and pooled == CLIP_L + CLIP_G.
TINY_CLIP_L, TINY_CLIP_G, TINY_T5 = 32, 48, 96
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    TRANSFORMER_CONFIG,
    sample_size=32,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TINY_T5,
    caption_projection_dim=32,  # == heads x head_dim, as in the real configs
    pooled_projection_dim=TINY_CLIP_L + TINY_CLIP_G,
    pos_embed_max_size=32,  # latent patches per side: up to 512x512 pixels here
    dual_attention_layers=(0,),
)

# stabilityai/stable-diffusion-3.5-large scheduler/scheduler_config.json (static shift, no dynamic).
SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)

# laion/CLIP-ViT-bigG-14 text tower as shipped in SD3.5 (text_encoder_2).
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
MAX_T5 = 512  # tokenizer_3's model_max_length; the pipeline's default max_sequence_length is 256


def _pipeline(transformer: Any, vae: Any, encoders: tuple[Any, Any, Any], tokenizers: tuple[Any, Any, Any]) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=encoders[2],
        tokenizer_3=tokenizers[2],
        transformer=transformer,
    )


def _tokenizers() -> tuple[Any, Any, Any]:
    # SD3's bigG tokenizer pads with "!", as the published tokenizer_2 does.
    return clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer(model_max_length=MAX_T5)


def build_tiny(out_dir: Path) -> None:
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    tokenizers = _tokenizers()
    transformer = SD3Transformer2DModel(**TINY_TRANSFORMER_CONFIG)
    encoders = (
        clip_text(len(tokenizers[0]), projection=True, **tiny_clip(TINY_CLIP_L)),
        clip_text(len(tokenizers[1]), projection=True, **tiny_clip(TINY_CLIP_G)),
        t5_encoder(len(tokenizers[2]), **tiny_t5(TINY_T5)),
    )
    init_small(*encoders)
    init_small(transformer, std=TRANSFORMER_STD)  # why: see flux.py
    _pipeline(transformer, tiny_autoencoder_kl(SCALING, SHIFT), encoders, tokenizers).save_pretrained(out_dir)


def build_real_shapes(out_dir: Path, dtype: str = "bf16", overrides: Mapping[str, Any] | None = None) -> None:
    """Write StableDiffusion3Pipeline with the published SD3.5 Large transformer and VAE (random
    weights) to out_dir.

    overrides: merged into TRANSFORMER_CONFIG (tests build {"num_layers": 1} at full width).
    Full size: ~16 GB on disk in bf16 and about as much RAM while building."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    dt = torch_dtype(dtype)
    torch.manual_seed(0)
    tokenizers = _tokenizers()
    encoders = (
        clip_text(len(tokenizers[0]), projection=True, **CLIP_L),
        clip_text(len(tokenizers[1]), projection=True, **CLIP_G),
        t5_encoder(len(tokenizers[2]), **T5_XXL),
    )
    init_small(*encoders)
    vae = random_model(AutoencoderKL, VAE_CONFIG, dt)
    transformer = random_model(SD3Transformer2DModel, {**TRANSFORMER_CONFIG, **(overrides or {})}, dt)
    encoders = tuple(e.to(dt) for e in encoders)
    _pipeline(transformer, vae, encoders, tokenizers).save_pretrained(out_dir, max_shard_size=MAX_SHARD)
