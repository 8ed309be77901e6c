"""FLUX.1-dev at its published shapes with random weights, for GPU benchmarks without downloads.

The transformer (19 double + 38 single blocks, 11.9B parameters) and the VAE are the published
architectures; the text encoders keep the widths the transformer reads (CLIP-L 768 pooled, T5-XXL
4096) but have one layer and the tiny tokenizers' vocabularies, since only the transformer and VAE
are benchmarked. The big modules are built with parameters on the meta device and materialised
once, in the target dtype, so the build needs about one model's worth of RAM, not two.

Also the helpers SD3's builder shares (sd3/real.py): clip_text_one_layer, t5_xxl_one_layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..autoencoder_kl import published_config
from ..random_weights import MAX_SHARD, random_model, torch_dtype
from ..tiny_text import clip_tokenizer, t5_tokenizer
from ..tiny_weights import init_small
from .tiny import MAX_TEXT, SCHEDULER_CONFIG

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

# black-forest-labs/FLUX.1-dev vae/config.json.
VAE_CONFIG: dict[str, Any] = published_config(scaling_factor=0.3611, shift_factor=0.1159)

# Per-layer shapes of the published text encoders (openai/clip-vit-large-patch14, google/t5-v1_1-xxl);
# depth 1 and the tiny vocabularies are the only changes.
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"
)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64)

def clip_text_one_layer(vocab_size: int, projection: bool, **widths: Any) -> Any:
    """A one-layer CLIP text encoder at the given published widths, on the tiny tokenizer's ids."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        num_hidden_layers=1,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,  # tiny_text.clip_tokenizer puts bos/eos last
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **widths,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_xxl_one_layer(vocab_size: int) -> Any:
    """A one-layer T5 v1.1-XXL encoder (d_model 4096, gated GELU): ~190M parameters."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            num_layers=1,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6,
            is_encoder_decoder=False,
            use_cache=False,
            **T5_XXL,
        )
    )


def build_real_shapes(out_dir: Path, dtype: str = "bf16", overrides: Mapping[str, Any] | None = None) -> None:
    """Write FluxPipeline with the published transformer and VAE (random weights) to out_dir.

    overrides: merged into TRANSFORMER_CONFIG (tests build {"num_layers": 1, "num_single_layers": 1}
    at full width). Full size: ~24 GB on disk in bf16 and about as much RAM while building."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    dt = torch_dtype(dtype)
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer(model_max_length=MAX_TEXT)
    text_encoder = clip_text_one_layer(len(tokenizer), projection=False, **CLIP_L)
    text_encoder_2 = t5_xxl_one_layer(len(tokenizer_2))
    init_small(text_encoder, text_encoder_2)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=random_model(AutoencoderKL, VAE_CONFIG, dt),
        text_encoder=text_encoder.to(dt),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.to(dt),
        tokenizer_2=tokenizer_2,
        transformer=random_model(FluxTransformer2DModel, {**TRANSFORMER_CONFIG, **(overrides or {})}, dt),
    )
    pipe.save_pretrained(out_dir, max_shard_size=MAX_SHARD)
