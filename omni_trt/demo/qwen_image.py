"""Qwen-Image pipelines with random weights: the tiny test pipeline, and Qwen/Qwen-Image's
published architectures for GPU benchmarks offline.

Real shapes: the transformer (~20.4B parameters, 40.9 GB in bf16) and the VAE are the real
configs; the text encoder is a Qwen2.5-VL with ONE Qwen2.5-VL-7B text layer (hidden 3584 = the
transformer's joint_attention_dim) and a one-block vision tower, over the tiny tokenizer: the
benchmarks time the transformer and the VAE, not the prompt encoder. Speed does not depend on
weight values, so the weights are small random normals.
"""

from __future__ import annotations

import functools

from pathlib import Path
from typing import Any, Mapping

from ..dtypes import torch_dtype
from .text import qwen2_tokenizer
from .weights import MAX_SHARD, dtype_scope, init_small, random_model

# Qwen/Qwen-Image scheduler_config.json: resolution-dependent exponential shift, stretched so the
# last sigma is 0.02. Tiny runs take the same scheduler code path as the real model.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
    invert_sigmas=False,
    stochastic_sampling=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
)

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
TINY_TEXT = 32  # the tiny text encoder's hidden size == the tiny transformer's joint_attention_dim
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    TRANSFORMER_CONFIG,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TINY_TEXT,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, like (16, 56, 56) -> 128
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
# Three down stages (factor 8) like the real one, narrow channels.
TINY_VAE_CONFIG: dict[str, Any] = dict(VAE_CONFIG, base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)

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
TINY_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=TINY_TEXT,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=2048,
    # multimodal RoPE sections must sum to head_dim / 2 (the real 7B: 16+24+24 = 128/2)
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
)


def text_encoder(tokenizer: Any, text_config: Mapping[str, Any]) -> Any:
    """Qwen2_5_VLForConditionalGeneration with the given text model and a one-block vision tower
    (the class always builds one; the text-to-image pipeline never runs it)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            {"vocab_size": len(tokenizer)},
            **text_config,
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
            out_hidden_size=text_config["hidden_size"],
            fullatt_block_indexes=[0],
        ),
    )
    text = config.text_config
    assert text.hidden_size // text.num_attention_heads // 2 == sum(text.rope_parameters["mrope_section"])
    return Qwen2_5_VLForConditionalGeneration(config)


def _pipeline(transformer: Any, vae: Any, text: Any, tokenizer: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_tiny(out_dir: Path) -> None:
    """A tiny random-weight Qwen-Image pipeline with the real classes and a factor-8 VAE."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    tokenizer = qwen2_tokenizer()
    text = text_encoder(tokenizer, TINY_TEXT_CONFIG)
    vae = AutoencoderKLQwenImage(**TINY_VAE_CONFIG)
    # std 0.2 ~ 1/sqrt(width) keeps the tiny transformer's activations at unit scale, so the prompt
    # (and true CFG) visibly steers the latents; at 0.02 the text barely reaches the output and
    # tests comparing engine and torch pipelines would not notice a wrong text path.
    init_small(transformer, std=0.2)
    init_small(text)
    # The VAE keeps its default init: decoded images have contrast to compare.
    _pipeline(transformer, vae, text, tokenizer).save_pretrained(out_dir)


def build_real_shapes(out_dir: Path, dtype: str = "bf16", *, overrides: Mapping[str, Any] | None = None) -> None:
    """Write a QwenImagePipeline with the published transformer and VAE, random weights, in `dtype`.

    overrides: merged into TRANSFORMER_CONFIG (tests build full width at one layer with
    {"num_layers": 1}). Peak RAM is about the transformer in `dtype` (40.9 GB in bf16) plus one
    5 GB shard while saving; the folder takes about 41.6 GB on disk in bf16.
    """
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    dt = torch_dtype(dtype)
    torch.manual_seed(0)
    tokenizer = qwen2_tokenizer()
    # The VAE (127M) keeps diffusers' default init: init_small would also randomise its RMS-norm
    # gammas (shaped (C, 1, 1, 1)) and decode noise; the default init stays finite.
    with dtype_scope(dt):
        vae = AutoencoderKLQwenImage(**VAE_CONFIG).eval()
    # Built on meta and given storage in `dtype` (as the transformer): a float32 build, its init pass
    # and a cast took ~6 s for the 0.24B one-layer encoder, ~1.5 s this way.
    text = random_model(functools.partial(text_encoder, tokenizer), {"text_config": TEXT_CONFIG}, dt)
    transformer = random_model(QwenImageTransformer2DModel, {**TRANSFORMER_CONFIG, **(overrides or {})}, dt)
    _pipeline(transformer, vae, text, tokenizer).save_pretrained(Path(out_dir), max_shard_size=MAX_SHARD)
