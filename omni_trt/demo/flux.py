"""FLUX.1-dev pipelines with random weights: the tiny test pipeline (the real classes: CLIP-L + T5
text encoders, FluxTransformer2DModel with guidance embeddings, a factor-8 AutoencoderKL), and
the published shapes for GPU benchmarks without downloads.

Real shapes: the transformer (19 double + 38 single blocks, 11.9B parameters) and the VAE are the
published architectures; the text encoders keep the widths the transformer reads (CLIP-L 768
pooled, T5-XXL 4096) but have one layer and the tiny tokenizers' vocabularies, since only the
transformer and VAE are benchmarked. The big modules are built with parameters on the meta device
and materialised once, in the target dtype, so the build needs about one model's worth of RAM.

Also the text encoders SD3's builders share (sd3.py): clip_text, t5_encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..dtypes import torch_dtype
from .autoencoder import autoencoder_kl_config, tiny_autoencoder_kl
from .text import clip_tokenizer, t5_tokenizer
from .weights import MAX_SHARD, init_small, random_model

SCALING, SHIFT = 0.3611, 0.1159  # FLUX.1-dev vae/config.json
VAE_CONFIG: dict[str, Any] = autoencoder_kl_config(SCALING, SHIFT)
MAX_TEXT = 512  # FluxPipeline's max_sequence_length; the family's text_len
TRANSFORMER_STD = 0.1  # tiny: weights large enough that every block shows in the output

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

# black-forest-labs/FLUX.1-dev transformer/config.json. Differs from the FluxTransformer2DModel
# defaults only in guidance_embeds (default False, i.e. schnell); the rest restates the defaults
# so a diffusers default change cannot move the benchmark. 11.90B parameters.
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x 2x2 packing
    out_channels=None,  # = in_channels
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,  # T5-XXL d_model
    pooled_projection_dim=768,  # CLIP-L pooler output
    guidance_embeds=True,  # published config; class default False
    axes_dims_rope=(16, 56, 56),
)
TINY_CLIP, TINY_T5 = 24, 40  # == the tiny transformer's pooled_projection_dim, joint_attention_dim
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    TRANSFORMER_CONFIG,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TINY_T5,
    pooled_projection_dim=TINY_CLIP,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) does for 128
)

# Per-layer shapes of the published text encoders (openai/clip-vit-large-patch14, google/t5-v1_1-xxl).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6)


def tiny_clip(hidden: int) -> dict[str, Any]:
    """A 2-layer CLIP text tower of width `hidden`."""
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden, num_attention_heads=2, num_hidden_layers=2)


def tiny_t5(hidden: int) -> dict[str, Any]:
    """A 2-layer T5 v1.1-style encoder of width `hidden`."""
    return dict(d_model=hidden, d_kv=8, d_ff=2 * hidden, num_heads=4, num_layers=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=32)


def clip_text(vocab_size: int, projection: bool, **config: Any) -> Any:
    """A CLIP text encoder (one layer unless `config` says otherwise) on the tiny tokenizer's
    ids: clip_tokenizer puts bos/eos last."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = {"num_hidden_layers": 1, **config}
    cfg = CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **config)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def t5_encoder(vocab_size: int, **config: Any) -> Any:
    """A T5 v1.1 encoder (gated GELU, as T5-XXL in Flux and SD3), one layer unless `config` says."""
    from transformers import T5Config, T5EncoderModel

    config = {"num_layers": 1, **config}
    return T5EncoderModel(T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, **config))


def _pipeline(transformer: Any, vae: Any, clip: Any, t5: Any, tokenizers: tuple[Any, Any]) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizers[0],
        text_encoder_2=t5,
        tokenizer_2=tokenizers[1],
        transformer=transformer,
    )


def build_tiny(out_dir: Path) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    tokenizers = clip_tokenizer(), t5_tokenizer(model_max_length=MAX_TEXT)
    clip = clip_text(len(tokenizers[0]), projection=False, **tiny_clip(TINY_CLIP))
    t5 = t5_encoder(len(tokenizers[1]), **tiny_t5(TINY_T5))
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    init_small(clip, t5)
    # At std 0.02 the blocks move the output by ~1e-3 (relative), so a wrong RoPE table would
    # still pass the 1e-4 export gate; at 0.1 it moves it by ~1e-2.
    init_small(transformer, std=TRANSFORMER_STD)
    _pipeline(transformer, tiny_autoencoder_kl(SCALING, SHIFT), clip, t5, tokenizers).save_pretrained(out_dir)


def build_real_shapes(out_dir: Path, dtype: str = "bf16", overrides: Mapping[str, Any] | None = None) -> None:
    """Write FluxPipeline with the published transformer and VAE (random weights) to out_dir.

    overrides: merged into TRANSFORMER_CONFIG (tests build {"num_layers": 1, "num_single_layers": 1}
    at full width). Full size: ~24 GB on disk in bf16 and about as much RAM while building."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    dt = torch_dtype(dtype)
    torch.manual_seed(0)
    tokenizers = clip_tokenizer(), t5_tokenizer(model_max_length=MAX_TEXT)
    clip = clip_text(len(tokenizers[0]), projection=False, **CLIP_L)
    t5 = t5_encoder(len(tokenizers[1]), **T5_XXL)
    init_small(clip, t5)
    vae = random_model(AutoencoderKL, VAE_CONFIG, dt)
    transformer = random_model(FluxTransformer2DModel, {**TRANSFORMER_CONFIG, **(overrides or {})}, dt)
    _pipeline(transformer, vae, clip.to(dt), t5.to(dt), tokenizers).save_pretrained(out_dir, max_shard_size=MAX_SHARD)
