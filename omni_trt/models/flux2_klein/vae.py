"""The FLUX.2 VAE (AutoencoderKLFlux2): decoder and encoder, with the pipeline's batch-norm
latent normalisation folded into the engines.

Flux2KleinPipeline normalises latents itself with the VAE's BatchNorm running statistics (on the
2x2-patchified latents: 4 x latent_channels), reading `vae.bn` around every `vae.decode` and
`vae.encode`. Those statistics are weights, and an engine stand-in carries none: so the decoder
engine takes the latents still normalised (it applies the statistics, then decodes) and the
encoder engine returns them normalised, while the stand-in's `bn` is the identity (mean 0, var 1,
eps 0). Both equal the original: stats (x) then decode, encode then (x - mean) / std.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..autoencoder_kl import FACTOR, IMAGE_DIMS, LATENT_DIMS, image_case
from ..base import ComponentSpec, Engine, LatentLayout, Point, ReferenceCase, TensorSpec

REAL_LATENT_CHANNELS = 32  # AutoencoderKLFlux2's default, as the FLUX.2 checkpoints ship it


def _latent_shape(channels: int):
    return lambda p: (p.batch, channels, p.height // FACTOR, p.width // FACTOR)


def _image_shape(p: Point) -> tuple[int, ...]:
    return (p.batch, 3, p.height, p.width)


def _stats(vae: Any) -> tuple[Any, Any]:
    """(mean, std) of the patchified latents, (1, 4C, 1, 1): what the pipeline computes from vae.bn."""
    import torch

    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    return mean, torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)


def _patchify(x: Any) -> Any:
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._patchify_latents(x)


def _unpatchify(x: Any) -> Any:
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._unpatchify_latents(x)


def denormalize(vae: Any, latent: Any) -> Any:
    """The latents the pipeline hands to vae.decode, from the normalised ones (latent grid layout)."""
    mean, std = _stats(vae)
    return _unpatchify(_patchify(latent) * std.to(latent.dtype) + mean.to(latent.dtype))


def normalize(vae: Any, mean: Any, logvar: Any) -> tuple[Any, Any]:
    """encode()'s distribution in the pipeline's normalised space: mean (m - mu) / std, logvar - 2 log std."""
    import torch

    mu, std = _stats(vae)
    m = (_patchify(mean) - mu.to(mean.dtype)) / std.to(mean.dtype)
    lv = _patchify(logvar) - 2 * torch.log(std.to(logvar.dtype))
    return _unpatchify(m), _unpatchify(lv)


def _wrapper(vae: Any) -> Any:
    import torch

    class Flux2VaeDecoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(denormalize(self.vae, latent), return_dict=False)[0]

    return Flux2VaeDecoder(vae)


def _reference_case(vae: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    import torch

    latent = torch.randn(_latent_shape(vae.config.latent_channels)(point), generator=generator).to(dtype)
    with torch.no_grad():
        image = vae.decode(denormalize(vae, latent), return_dict=False)[0]
    return ReferenceCase(inputs={"latent": latent}, expected={"image": image})


def _encoder_wrapper(vae: Any) -> Any:
    import torch

    class Flux2VaeEncoder(torch.nn.Module):
        """encode() up to the latent distribution's parameters, normalised as the pipeline does."""

        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            posterior = self.vae.encode(image, return_dict=False)[0]
            return normalize(self.vae, posterior.mean, posterior.logvar)

    return Flux2VaeEncoder(vae)


def _encoder_reference_case(vae: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    import torch

    case = image_case(vae, _image_shape(point), dtype, generator)
    with torch.no_grad():
        mean, logvar = normalize(vae, case.expected["mean"], case.expected["logvar"])
    return ReferenceCase(inputs=case.inputs, expected={"mean": mean, "logvar": logvar})


def _standin(config: Mapping[str, Any], engine: Engine, vae_encoder: Engine | None = None) -> Any:
    import torch

    from ..standin import VaeStandIn

    class Flux2VaeStandIn(VaeStandIn):
        """`vae.decode` / `vae.encode` from engines that carry the batch-norm statistics; `bn` is
        the identity (eps 0 in its config), so the pipeline's own normalisation changes nothing."""

        def __init__(self) -> None:
            super().__init__({**config, "batch_norm_eps": 0.0}, engine, vae_encoder)
            channels = 4 * int(config.get("latent_channels", REAL_LATENT_CHANNELS))
            self.bn = torch.nn.BatchNorm2d(channels, eps=0.0, affine=False)  # running mean 0, var 1

    return Flux2VaeStandIn()


def _grid(pipe: Any, latents: Any, height: int, width: int) -> Any:
    """Flux2KleinPipeline's packed tokens (B, h*w, 4C), row-major as its latent ids lay them out,
    as the (B, C, H/8, W/8) latent grid (still normalised). Its output_type="latent" is that grid
    already unpatchified and denormalised (B, C, H/8, W/8): normalised again here, with `vae.bn`."""
    if latents.ndim == 4:
        mean, std = _stats(pipe.vae)
        return _unpatchify((_patchify(latents) - mean.to(latents)) / std.to(latents))
    rows, cols = height // (2 * pipe.vae_scale_factor), width // (2 * pipe.vae_scale_factor)
    return _unpatchify(latents.reshape(latents.shape[0], rows, cols, -1).permute(0, 3, 1, 2))


def _decode(pipe: Any, grid: Any) -> Any:
    """What the pipeline does after its loop: the batch-norm statistics undone, then the VAE."""
    grid = grid.to(pipe.vae.dtype)
    return pipe.vae.decode(denormalize(pipe.vae, grid), return_dict=False)[0]


LAYOUT = LatentLayout(grid=_grid, decode=_decode, channels=lambda pipe: int(pipe.vae.config.latent_channels))


def vae_decoder_spec(config: Mapping[str, Any] | None = None) -> ComponentSpec:
    channels = (config or {}).get("latent_channels", REAL_LATENT_CHANNELS)
    return ComponentSpec(
        name="vae_decoder",
        pipeline_attr="vae",
        inputs=(TensorSpec("latent", _latent_shape(channels), LATENT_DIMS),),
        outputs=(TensorSpec("image", _image_shape, IMAGE_DIMS),),
        wrapper=_wrapper,
        reference_case=_reference_case,
        standin=_standin,
        allow_fp16=False,  # as for the other Flux-style VAEs
    )


def vae_encoder_spec(config: Mapping[str, Any] | None = None) -> ComponentSpec:
    """The VAE encoder: reference images of edits -> their normalised latent distribution."""
    latent = _latent_shape((config or {}).get("latent_channels", REAL_LATENT_CHANNELS))
    return ComponentSpec(
        name="vae_encoder",
        pipeline_attr="vae",
        inputs=(TensorSpec("image", _image_shape, IMAGE_DIMS),),
        outputs=(TensorSpec("mean", latent, LATENT_DIMS), TensorSpec("logvar", latent, LATENT_DIMS)),
        wrapper=_encoder_wrapper,
        reference_case=_encoder_reference_case,
        part_of="vae_decoder",
        allow_fp16=False,
    )
