"""Z-Image pipelines with random weights: the tiny demo/test pipeline, and Z-Image-Turbo's
published architectures for GPU benchmarks offline.

Real shapes: the transformer (~6.15B parameters) and the VAE are the real Tongyi-MAI/Z-Image-Turbo
configs; the text encoder is ONE Qwen3-4B layer (hidden 2560 = the transformer's cap_feat_dim) over
the tiny tokenizer, since the benchmarks time the transformer and the VAE, not the prompt encoder.
Speed does not depend on weight values, so the weights are small random normals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..dtypes import torch_dtype
from .autoencoder import autoencoder_kl_config, tiny_autoencoder_kl
from .text import QWEN3_CHAT_TEMPLATE, qwen2_tokenizer
from .weights import MAX_SHARD, dtype_scope, init_small, random_model

SCALING, SHIFT = 0.3611, 0.1159  # Z-Image-Turbo's vae/config.json (the FLUX.1 latent space)
VAE_CONFIG: dict[str, Any] = autoencoder_kl_config(SCALING, SHIFT)

# Tongyi-MAI/Z-Image-Turbo transformer/config.json. Differs from the diffusers class defaults
# only in axes_lens (published [1536, 512, 512], class default [1024, 512, 512]); MODELS.md and
# the checkpoint win. axes_lens sizes the RoPE tables (no parameters).
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)
TINY_TEXT = 32  # the tiny text encoder's width == the tiny transformer's cap_feat_dim
# The tiny transformer: the real one's structure at width 64.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    TRANSFORMER_CONFIG,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=TINY_TEXT,
    axes_dims=[8, 12, 12],
    axes_lens=[512, 128, 128],
)

# Z-Image-Turbo scheduler/config.json: static shift 3 (9 steps = 8 transformer passes).
SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

# Qwen3-4B's per-layer shapes (the real text encoder has 36 such layers); one layer is kept.
# The pipeline reads hidden_states[-2], which with one layer is the embedding output: the
# width (what the transformer sees) is right, the encoder's cost is not the real one.
TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=1,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=True,
)
TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    hidden_size=TINY_TEXT,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=1024,
)


def text_encoder(vocab_size: int, config: Mapping[str, Any]) -> Any:
    """A Qwen3Model of `config` (built normally: at most ~100M parameters), weights from init_small."""
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(vocab_size=vocab_size, **config))


def _pipeline(transformer: Any, vae: Any, text: Any, tokenizer: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_tiny(out_dir: Path) -> None:
    """A tiny random-weight Z-Image pipeline with the real classes and a factor-8 VAE."""
    import torch
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    text = text_encoder(512, TINY_TEXT_ENCODER_CONFIG)
    init_small(transformer, text)
    tokenizer = qwen2_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE)
    _pipeline(transformer, tiny_autoencoder_kl(SCALING, SHIFT), text, tokenizer).save_pretrained(out_dir)


def build_real_shapes(out_dir: Path, dtype: str = "bf16", *, overrides: Mapping[str, Any] | None = None) -> None:
    """Write a ZImagePipeline with the published transformer and VAE, random weights, in `dtype`.

    overrides: merged into TRANSFORMER_CONFIG (tests build full width at one layer with
    {"n_layers": 1, "n_refiner_layers": 1}). Peak RAM is about the transformer in `dtype`
    (12.3 GB in bf16) plus one 5 GB shard while saving; the folder takes about 12.7 GB in bf16.
    """
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel

    dt = torch_dtype(dtype)
    torch.manual_seed(0)
    tokenizer = qwen2_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE)
    # The VAE (84M) keeps diffusers' default init: init_small would shrink every conv and decode
    # flat grey, and the default init is known to stay finite (the tiny pipelines keep it too).
    with dtype_scope(dt):
        vae = AutoencoderKL(**VAE_CONFIG).eval()
    text = text_encoder(len(tokenizer), TEXT_ENCODER_CONFIG)
    init_small(text)
    transformer = random_model(ZImageTransformer2DModel, {**TRANSFORMER_CONFIG, **(overrides or {})}, dt)
    pipe = _pipeline(transformer, vae, text.to(dt).eval(), tokenizer)
    pipe.save_pretrained(Path(out_dir), max_shard_size=MAX_SHARD)
