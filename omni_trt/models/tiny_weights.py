"""Random weights for tiny pipelines: small enough that activations stay finite."""

from __future__ import annotations

from typing import Any


def init_small(*modules: Any, std: float = 0.02) -> None:
    """Normal(0, std) for every weight matrix and every parameter a model leaves uninitialised
    (Z-Image's pad tokens start as torch.empty and can hold NaN); norms keep their ones."""
    import torch

    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if p.ndim >= 2 or "pad_token" in name:
                    p.normal_(0.0, std)


def tiny_autoencoder_kl(scaling_factor: float, shift_factor: float | None, latent_channels: int = 16) -> Any:
    """A Flux/Z-Image/SD3-style AutoencoderKL, downsampling x8 like the real one."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=64,
    )
