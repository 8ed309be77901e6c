"""Qwen-Image's published architectures with random weights, for GPU benchmarks offline.

The transformer (~20.4B parameters, 40.9 GB in bf16) and the VAE are the real Qwen/Qwen-Image
configs; the text encoder is a Qwen2.5-VL with ONE Qwen2.5-VL-7B text layer (hidden 3584 = the
transformer's joint_attention_dim) and a one-block vision tower, over the tiny tokenizer: the
benchmarks time the transformer and the VAE, not the prompt encoder. Speed does not depend on
weight values, so the weights are small random normals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..random_weights import MAX_SHARD, default_dtype, random_model, torch_dtype
from ..tiny_text import qwen2_tokenizer
from ..tiny_weights import init_small
from .tiny import SCHEDULER_CONFIG  # already the published scheduler config

# Qwen/Qwen-Image transformer/config.json, equal to the diffusers class defaults. The published
# file also has pooled_projection_dim 768, which this class does not take (unused); the newer
# class switches (zero_cond_t, use_additional_t_cond, use_layer3d_rope: Edit/Layered variants)
# stay at their defaults (off), as for the text-to-image checkpoint.
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=[16, 56, 56],
)

# Qwen/Qwen-Image vae/config.json, equal to the AutoencoderKLQwenImage class defaults (the
# latents_mean/std statistics are the class defaults too and are left to them).
VAE_CONFIG: dict[str, Any] = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)

# Qwen2.5-VL-7B's text-layer shapes (the real encoder has 28 such layers); one layer is kept.
# 28 heads x 128 = 3584; the multimodal RoPE sections sum to head_dim / 2.
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=1,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=128000,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)


def text_encoder(tokenizer: Any, dtype: Any) -> Any:
    """Qwen2_5_VLForConditionalGeneration with one real-width text layer (~240M parameters) and a
    tiny vision tower (the class always builds one; the text-to-image pipeline never runs it)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            TEXT_CONFIG,
            vocab_size=len(tokenizer),
            # the defaults are the 152k-vocab ids; point them into the tiny vocabulary
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=TEXT_CONFIG["hidden_size"],
            fullatt_block_indexes=[0],
        ),
    )
    text = config.text_config
    assert text.hidden_size // text.num_attention_heads // 2 == sum(text.rope_parameters["mrope_section"])
    model = Qwen2_5_VLForConditionalGeneration(config)
    init_small(model)
    return model.to(dtype).eval()


def build_real_shapes(out_dir: Path, dtype: str = "bf16", *, overrides: Mapping[str, Any] | None = None) -> None:
    """Write a QwenImagePipeline with the published transformer and VAE, random weights, in `dtype`.

    overrides: merged into TRANSFORMER_CONFIG (tests build full width at one layer with
    {"num_layers": 1}). Peak RAM is about the transformer in `dtype` (40.9 GB in bf16) plus one
    5 GB shard while saving; the folder takes about 41.6 GB on disk in bf16.
    """
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    dt = torch_dtype(dtype)
    torch.manual_seed(0)
    tokenizer = qwen2_tokenizer()
    # The VAE (127M) keeps diffusers' default init: init_small would also randomise its RMS-norm
    # gammas (shaped (C, 1, 1, 1)) and decode noise; the default init stays finite.
    with default_dtype(dt):
        vae = AutoencoderKLQwenImage(**VAE_CONFIG).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder(tokenizer, dt),
        tokenizer=tokenizer,
        transformer=random_model(QwenImageTransformer2DModel, {**TRANSFORMER_CONFIG, **(overrides or {})}, dt),
    )
    pipe.save_pretrained(Path(out_dir), max_shard_size=MAX_SHARD)
