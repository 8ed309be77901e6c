"""A tiny random-weight Z-Image pipeline with the real classes and a factor-8 VAE."""

from __future__ import annotations

from pathlib import Path

from ..tiny_text import QWEN3_CHAT_TEMPLATE, qwen2_tokenizer
from ..tiny_weights import init_small, tiny_autoencoder_kl

TEXT_HIDDEN = 32


def build_tiny(out_dir: Path) -> None:
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_HIDDEN,
        axes_dims=[8, 12, 12],
        axes_lens=[512, 128, 128],
    )
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=512,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
        )
    )
    init_small(transformer, text_encoder)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_autoencoder_kl(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=qwen2_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE),
        transformer=transformer,
    )
    pipe.save_pretrained(out_dir)
