"""The VAE of the AutoencoderKL families (Z-Image, Flux, SD3): decoder and encoder export as they are."""

from __future__ import annotations

from typing import Any, Mapping

from .base import ComponentSpec, Engine, LatentLayout, Point, ReferenceCase, TensorSpec

FACTOR = 8  # pixels per latent cell
LATENT_DIMS = {0: "batch", 2: "latent_height", 3: "latent_width"}
IMAGE_DIMS = {0: "batch", 2: "height", 3: "width"}


def _latent_shape(channels: int):
    return lambda p: (p.batch, channels, p.height // FACTOR, p.width // FACTOR)


def _image_shape(p: Point) -> tuple[int, ...]:
    return (p.batch, 3, p.height, p.width)


def _wrapper(vae: Any) -> Any:
    import torch

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(latent, return_dict=False)[0]

    return VaeDecoder(vae)


def _reference_case(vae: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    import torch

    shape = _latent_shape(vae.config.latent_channels)(point)
    latent = torch.randn(shape, generator=generator).to(dtype)
    with torch.no_grad():
        image = vae.decode(latent, return_dict=False)[0]
    return ReferenceCase(inputs={"latent": latent}, expected={"image": image})


def _encoder_wrapper(vae: Any) -> Any:
    import torch

    class VaeEncoder(torch.nn.Module):
        """encode() up to the latent distribution's parameters (its clamped logvar included);
        sampling from them stays on the host with the pipeline's generator."""

        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            posterior = self.vae.encode(image, return_dict=False)[0]
            return posterior.mean, posterior.logvar

    return VaeEncoder(vae)


def image_case(vae: Any, shape: tuple[int, ...], dtype: Any, generator: Any) -> ReferenceCase:
    """Pixels in [-1, 1] (what the edit pipelines pass) through the original `vae.encode`: the
    encoder's reference case, for both VAE classes (the Qwen-Image one has a frame axis)."""
    import torch

    image = (torch.rand(shape, generator=generator) * 2 - 1).to(dtype)
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
    return ReferenceCase(inputs={"image": image}, expected={"mean": posterior.mean, "logvar": posterior.logvar})


def _encoder_reference_case(vae: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    return image_case(vae, _image_shape(point), dtype, generator)


def _standin(config: Mapping[str, Any], engine: Engine, vae_encoder: Engine | None = None) -> Any:
    from .standin import VaeStandIn

    class AutoencoderKLStandIn(VaeStandIn):
        """Answers `vae.decode(z)` and `vae.encode(x)` (latent_dist) from engines; no weights."""

    return AutoencoderKLStandIn(config, engine, vae_encoder)


def _decode(pipe: Any, grid: Any) -> Any:
    """What ZImagePipeline, StableDiffusion3Pipeline and FluxPipeline do after their loop: unscale
    and shift, decode."""
    cfg = pipe.vae.config
    return pipe.vae.decode(grid.to(pipe.vae.dtype) / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]


def _channels(pipe: Any) -> int:
    return int(pipe.vae.config.latent_channels)


# Z-Image and SD3 step on the latent grid itself.
SCALED = LatentLayout(grid=lambda pipe, latents, height, width: latents, decode=_decode, channels=_channels)
# FluxPipeline steps on 2x2-packed tokens: unpacked first.
PACKED = LatentLayout(grid=lambda pipe, latents, height, width: pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor),
                      decode=_decode, channels=_channels)


def vae_decoder_spec(latent_channels: int = 16) -> ComponentSpec:
    return ComponentSpec(
        name="vae_decoder",
        pipeline_attr="vae",
        inputs=(TensorSpec("latent", _latent_shape(latent_channels), LATENT_DIMS),),
        outputs=(TensorSpec("image", _image_shape, IMAGE_DIMS),),
        wrapper=_wrapper,
        reference_case=_reference_case,
        standin=_standin,
        allow_fp16=False,  # NVIDIA's demo: fp16 Flux-style VAEs lose accuracy
    )


def vae_encoder_spec(latent_channels: int = 16) -> ComponentSpec:
    """The VAE encoder (edits): pixels -> the latent distribution's mean and logvar."""
    latent = _latent_shape(latent_channels)
    return ComponentSpec(
        name="vae_encoder",
        pipeline_attr="vae",
        inputs=(TensorSpec("image", _image_shape, IMAGE_DIMS),),
        outputs=(TensorSpec("mean", latent, LATENT_DIMS), TensorSpec("logvar", latent, LATENT_DIMS)),
        wrapper=_encoder_wrapper,
        reference_case=_encoder_reference_case,
        part_of="vae_decoder",  # both replace `vae`: one stand-in answers decode and encode
        allow_fp16=False,
    )
