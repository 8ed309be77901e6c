"""The VAE decoder of the AutoencoderKL families (Z-Image, Flux, SD3): exports as it is."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

from .base import ComponentSpec, Engine, Point, ReferenceCase, TensorSpec

FACTOR = 8  # pixels per latent cell


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


def _standin(config: Mapping[str, Any], engine: Engine) -> Any:
    from .standin import VaeStandIn

    class VaeDecoderStandIn(VaeStandIn):
        """Answers `vae.decode(z, return_dict=False)` from an engine; no weights."""

        def decode(self, z: Any, return_dict: bool = True) -> Any:
            image = self.engine({"latent": z})["image"]
            return (image,) if not return_dict else SimpleNamespace(sample=image)

        def forward(self, z: Any) -> Any:
            return self.decode(z, return_dict=False)[0]

    return VaeDecoderStandIn(config, engine)


def decode_scaled(pipe: Any, latents: Any, height: int, width: int) -> list[Any]:
    """What ZImagePipeline and StableDiffusion3Pipeline do after their loop: unscale and shift,
    decode, postprocess."""
    cfg = pipe.vae.config
    latents = latents.to(pipe.vae.dtype) / cfg.scaling_factor + cfg.shift_factor
    return pipe.image_processor.postprocess(pipe.vae.decode(latents, return_dict=False)[0], output_type="pil")


def decode_packed(pipe: Any, latents: Any, height: int, width: int) -> list[Any]:
    """FluxPipeline's: its 2x2-packed token latents unpacked first."""
    return decode_scaled(pipe, pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor), height, width)


def vae_decoder_spec(latent_channels: int = 16) -> ComponentSpec:
    dims = {0: "batch", 2: "latent_height", 3: "latent_width"}
    return ComponentSpec(
        name="vae_decoder",
        pipeline_attr="vae",
        inputs=(TensorSpec("latent", _latent_shape(latent_channels), dims),),
        outputs=(TensorSpec("image", _image_shape, {0: "batch", 2: "height", 3: "width"}),),
        wrapper=_wrapper,
        reference_case=_reference_case,
        standin=_standin,
        allow_fp16=False,  # NVIDIA's demo: fp16 Flux-style VAEs lose accuracy
    )
