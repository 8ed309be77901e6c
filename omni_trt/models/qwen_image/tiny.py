"""A tiny random-weight Qwen-Image pipeline with the real classes and a factor-8 VAE."""

from __future__ import annotations

from pathlib import Path

from ..tiny_text import qwen2_tokenizer
from ..tiny_weights import init_small

TEXT_HIDDEN = 32  # the text encoder's hidden size == the transformer's joint_attention_dim

# Qwen/Qwen-Image scheduler_config.json: resolution-dependent exponential shift, stretched so the
# last sigma is 0.02. Kept so tiny runs take the same scheduler code path as the real model.
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


def tiny_text_encoder(tokenizer):
    """Qwen2_5_VLForConditionalGeneration with a 2-layer text model and a 1-block vision tower
    (the pipeline only runs the text path, but the class always builds both)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads, head_dim = 2, TEXT_HIDDEN // 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=512,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            # the defaults are the 152k-vocab ids; point them into the tiny vocabulary
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            # multimodal RoPE sections must sum to head_dim / 2 (the real 7B: 16+24+24 = 128/2)
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=TEXT_HIDDEN,
            fullatt_block_indexes=[0],
        ),
    )
    assert head_dim // 2 == sum(config.text_config.rope_parameters["mrope_section"])
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels x 2x2 patch
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, like (16, 56, 56) -> 128
    )


def tiny_vae():
    """AutoencoderKLQwenImage with three down stages (factor 8) like the real one, narrow channels."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def build_tiny(out_dir: Path) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(0)
    transformer = tiny_transformer()
    tokenizer = qwen2_tokenizer()
    text_encoder = tiny_text_encoder(tokenizer)
    vae = tiny_vae()
    # std 0.2 ~ 1/sqrt(width) keeps the tiny transformer's activations at unit scale, so the prompt
    # (and true CFG) visibly steers the latents; at 0.02 the text barely reaches the output and
    # tests comparing engine and torch pipelines would not notice a wrong text path.
    init_small(transformer, std=0.2)
    init_small(text_encoder)
    # The VAE keeps its default init: decoded images have contrast to compare.
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(out_dir)
