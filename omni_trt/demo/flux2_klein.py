"""FLUX.2 [klein] pipelines with random weights: the tiny test pipeline (the real classes: a Qwen3
text encoder, Flux2Transformer2DModel, AutoencoderKLFlux2), and klein 4B's published shapes for GPU
benchmarks without downloads.

Flux2KleinPipeline stacks the text encoder's hidden states 9, 18 and 27 (joint_attention_dim =
3 x hidden), so every text encoder here has 28 layers: the tiny one is narrow, the real-shape one
has Qwen3-4B's width (2560, what the transformer reads) with narrow attention and MLP, since only
the transformer and the VAE are benchmarked. Speed does not depend on weight values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..dtypes import torch_dtype
from .text import QWEN3_CHAT_TEMPLATE, qwen2_tokenizer
from .weights import MAX_SHARD, dtype_scope, init_small, random_model

MAX_TEXT = 512  # the pipeline's max_sequence_length
TEXT_LAYERS = 28  # hidden_states[27] is read: 27 layers after the embeddings

# black-forest-labs/FLUX.2-klein-4B scheduler_config.json: the pipeline passes its empirical mu.
SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

# black-forest-labs/FLUX.2-klein-4B transformer/config.json (3.9B parameters).
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=128,  # 32 latent channels x 2x2 patches
    out_channels=None,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,  # 3 x Qwen3-4B's 2560
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
TINY_TEXT = 16  # the tiny Qwen3's width; joint_attention_dim = 3 x 16
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    TRANSFORMER_CONFIG,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=3 * TINY_TEXT,
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim, as (32, 32, 32, 32) does for 128
)

# AutoencoderKLFlux2's class defaults are the published FLUX.2 VAE (32 latent channels, x8).
VAE_CONFIG: dict[str, Any] = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=32, norm_num_groups=32)
TINY_VAE_CONFIG: dict[str, Any] = dict(VAE_CONFIG, block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                                       sample_size=64)

TEXT_CONFIG: dict[str, Any] = dict(hidden_size=2560, intermediate_size=256, num_hidden_layers=TEXT_LAYERS, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True)
TINY_TEXT_CONFIG: dict[str, Any] = dict(hidden_size=TINY_TEXT, intermediate_size=32, num_hidden_layers=TEXT_LAYERS, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True)


def text_encoder(vocab_size: int, config: Mapping[str, Any]) -> Any:
    """Qwen3ForCausalLM (the class the pipeline names) of `config`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size, **config))


def random_bn(vae: Any, seed: int = 2) -> None:
    """Batch-norm statistics away from (0, 1), so a path that skipped the pipeline's latent
    normalisation would show (the published VAE's are far from it too)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.5)
        vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(vae.bn.running_var.shape, generator=g))


def _pipeline(transformer: Any, vae: Any, text: Any, tokenizer: Any, is_distilled: bool) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=text,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=is_distilled)


def build_tiny(out_dir: Path, is_distilled: bool = True) -> None:
    """A tiny random-weight klein pipeline (distilled, as the published 4B / 9B; is_distilled=False: a base variant)."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    torch.manual_seed(0)
    tokenizer = qwen2_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE, model_max_length=MAX_TEXT)
    text = text_encoder(len(tokenizer), TINY_TEXT_CONFIG)
    transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER_CONFIG)
    init_small(text)
    # std 0.2: the blocks move the output enough that the prompt and the references show (0.1: ~0.03/255).
    init_small(transformer, std=0.2)
    torch.manual_seed(1)
    vae = AutoencoderKLFlux2(**TINY_VAE_CONFIG)  # default init: decoded images have contrast
    random_bn(vae)
    _pipeline(transformer, vae, text, tokenizer, is_distilled).save_pretrained(out_dir)


def build_real_shapes(out_dir: Path, dtype: str = "bf16", *, overrides: Mapping[str, Any] | None = None) -> None:
    """Write a Flux2KleinPipeline with klein 4B's transformer and the FLUX.2 VAE (random weights).

    overrides: merged into TRANSFORMER_CONFIG (tests build {"num_layers": 1, "num_single_layers": 1}
    at full width). Full size: ~7.8 GB in bf16."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    dt = torch_dtype(dtype)
    torch.manual_seed(0)
    tokenizer = qwen2_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE, model_max_length=MAX_TEXT)
    with dtype_scope(dt):
        vae = AutoencoderKLFlux2(**VAE_CONFIG).eval()
    random_bn(vae)
    text = text_encoder(len(tokenizer), TEXT_CONFIG)
    init_small(text)
    transformer = random_model(Flux2Transformer2DModel, {**TRANSFORMER_CONFIG, **(overrides or {})}, dt)
    _pipeline(transformer, vae, text.to(dt).eval(), tokenizer, True).save_pretrained(Path(out_dir), max_shard_size=MAX_SHARD)
