"""The AutoencoderKL of FLUX.1, Z-Image and SD3.5 at its published size and at a tiny size."""

from __future__ import annotations

from typing import Any


def autoencoder_kl_config(scaling_factor: float, shift_factor: float | None, *, tiny: bool = False) -> dict[str, Any]:
    """The AutoencoderKL that FLUX.1, Z-Image and SD3.5 ship (their vae/config.json; 83.8M
    parameters): they differ only in the latent scaling and shift. The class defaults are SD1's
    one-block VAE, so every field is spelled out. tiny: the same four stages (x8 like the real
    one) with 16 channels and one layer per block."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16) if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=8 if tiny else 32,
        sample_size=64 if tiny else 1024,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        latents_mean=None,
        latents_std=None,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def tiny_autoencoder_kl(scaling_factor: float, shift_factor: float | None) -> Any:
    """A tiny AutoencoderKL with diffusers' default init (decoded images have contrast)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(**autoencoder_kl_config(scaling_factor, shift_factor, tiny=True))
