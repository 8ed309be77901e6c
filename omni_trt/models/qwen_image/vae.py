"""The Qwen-Image VAE (AutoencoderKLQwenImage) for single images (one frame): the decoder
(`decode`) and the encoder (`encode`, for edits).

A video VAE: latents are (B, z_dim, frames, H/8, W/8); the text-to-image pipeline always passes one
frame and reads frame 0 of the output, and the edit pipelines encode one frame (B, 3, 1, H, W).
For the first (only) frame:
- every causal 3D conv pads two zero frames in front, so only its last temporal tap sees data:
  a 2D conv with that tap's kernel is exact (a third of the conv FLOPs and no 5D conv);
- the temporal resamplers skip their `time_conv` on the first frame (the decoder's upsamplers
  and the encoder's downsamplers alike: the first chunk only fills their feature caches);
- `nearest-exact` x2 upsampling picks the same pixels as `nearest` (a plain ONNX Resize).
The wrappers keep the input/output layout of `decode`/`encode` (frame axis fixed to 1).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from ..base import ComponentSpec, Engine, LatentLayout, Point, ReferenceCase, TensorSpec

FACTOR = 8  # pixels per latent cell: len(temperal_downsample) == 3 down stages
REAL_Z_DIM = 16
LATENT_DIMS = {0: "batch", 3: "latent_height", 4: "latent_width"}  # axis 2: the one frame
IMAGE_DIMS = {0: "batch", 3: "height", 4: "width"}


def _latent_shape(z_dim: int):
    return lambda p: (p.batch, z_dim, 1, p.height // FACTOR, p.width // FACTOR)


def _image_shape(p: Point) -> tuple[int, ...]:
    return (p.batch, 3, 1, p.height, p.width)


def _single_frame(module: Any) -> Any:
    """A copy of `module` (the encoder or decoder, a quant conv) rewritten for one frame; the
    original stays as it is. Run it without feature caches."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (
        QwenImageCausalConv3d,
        QwenImageResample,
        QwenImageUpsample,
    )

    class LastTapConv(torch.nn.Module):
        """A causal 3D conv on one frame: conv2d with the kernel's last temporal tap."""

        def __init__(self, conv: QwenImageCausalConv3d) -> None:
            super().__init__()
            pad_w, _, pad_h = conv._padding[:3]  # F.pad order: (w, w, h, h, t_front, t_back)
            self.conv = torch.nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size[1:],
                stride=conv.stride[1:],
                padding=(pad_h, pad_w),
                bias=conv.bias is not None,
            ).to(device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                self.conv.weight.copy_(conv.weight[:, :, -1])
                if conv.bias is not None:
                    self.conv.bias.copy_(conv.bias)

        def forward(self, x: torch.Tensor, cache_x: Any = None) -> torch.Tensor:
            return self.conv(x.squeeze(2)).unsqueeze(2)

    def rewrite(module: torch.nn.Module) -> torch.nn.Module:
        if isinstance(module, QwenImageCausalConv3d):
            return LastTapConv(module)
        for name, child in list(module.named_children()):
            if isinstance(module, QwenImageResample) and name == "time_conv":
                delattr(module, name)  # only runs from the second frame on
                continue
            if isinstance(child, QwenImageUpsample):
                child.mode = "nearest"  # == nearest-exact at scale 2
            setattr(module, name, rewrite(child))
        return module

    return rewrite(copy.deepcopy(module))


def _wrapper(vae: Any) -> Any:
    import torch

    class QwenImageVaeDecoder(torch.nn.Module):
        """decode() of one frame: post_quant_conv, the decoder without feature caches, clamp."""

        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.post_quant_conv, self.decoder = _single_frame(vae.post_quant_conv), _single_frame(vae.decoder)

        def forward(self, latent: torch.Tensor) -> torch.Tensor:
            x = self.decoder(self.post_quant_conv(latent))
            return torch.clamp(x, min=-1.0, max=1.0)

    return QwenImageVaeDecoder(vae)


def _reference_case(vae: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    import torch

    latent = torch.randn(_latent_shape(vae.config.z_dim)(point), generator=generator).to(dtype)
    with torch.no_grad():
        image = vae.decode(latent, return_dict=False)[0]
    return ReferenceCase(inputs={"latent": latent}, expected={"image": image})


def _encoder_wrapper(vae: Any) -> Any:
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    class QwenImageVaeEncoder(torch.nn.Module):
        """encode() of one frame up to the latent distribution's parameters: the encoder without
        feature caches, quant_conv, and diffusers' own split into mean and (clamped) logvar."""

        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.encoder, self.quant_conv = _single_frame(vae.encoder), _single_frame(vae.quant_conv)

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            posterior = DiagonalGaussianDistribution(self.quant_conv(self.encoder(image)))
            return posterior.mean, posterior.logvar

    return QwenImageVaeEncoder(vae)


def _encoder_reference_case(vae: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    from ..autoencoder_kl import image_case

    return image_case(vae, _image_shape(point), dtype, generator)


def _standin(config: Mapping[str, Any], engine: Engine, vae_encoder: Engine | None = None) -> Any:
    import torch

    from ..standin import VaeStandIn

    class QwenImageVaeStandIn(VaeStandIn):
        """Answers `vae.decode(z)` and `vae.encode(x)` for one frame from engines; no weights.
        Exposes what the Qwen-Image pipelines read: config (z_dim, latents_mean/std; the edit
        pipelines normalise the sampled latents with them themselves), temperal_downsample (their
        vae_scale_factor), dtype, device."""

        def __init__(self) -> None:
            super().__init__(config, engine, vae_encoder)
            self.z_dim = config["z_dim"]
            self.temperal_downsample = list(config["temperal_downsample"])
            self.temperal_upsample = self.temperal_downsample[::-1]
            self.spatial_compression_ratio = 2 ** len(self.temperal_downsample)

        def check(self, x: torch.Tensor, what: str) -> None:
            if x.ndim != 5 or x.shape[2] != 1:
                raise ValueError(f"the Qwen-Image VAE engine {what} one frame (B, C, 1, H, W), got {tuple(x.shape)}")

    return QwenImageVaeStandIn()


def _grid(pipe: Any, latents: Any, height: int, width: int) -> Any:
    """QwenImagePipeline's packed tokens unpacked to one frame (B, C, 1, h, w), the frame axis dropped."""
    return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)[:, :, 0]


def _decode(pipe: Any, grid: Any) -> Any:
    """What QwenImagePipeline does after its loop: undo the per-channel normalisation, decode the
    one frame, take frame 0."""
    import torch

    cfg = pipe.vae.config
    latents = grid.unsqueeze(2).to(pipe.vae.dtype)
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    return pipe.vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]


LAYOUT = LatentLayout(grid=_grid, decode=_decode, channels=lambda pipe: int(pipe.vae.config.z_dim))


def vae_decoder_spec(config: Mapping[str, Any] | None = None) -> ComponentSpec:
    """The VAE decoder component; `config` fixes z_dim (None: the released model, 16)."""
    z_dim = (config or {}).get("z_dim", REAL_Z_DIM)
    return ComponentSpec(
        name="vae_decoder",
        pipeline_attr="vae",
        inputs=(TensorSpec("latent", _latent_shape(z_dim), LATENT_DIMS),),
        outputs=(TensorSpec("image", _image_shape, IMAGE_DIMS),),
        wrapper=_wrapper,
        reference_case=_reference_case,
        standin=_standin,
        allow_fp16=False,  # untested in fp16; bf16 or fp32 as for the Flux-style VAEs
    )


def vae_encoder_spec(config: Mapping[str, Any] | None = None) -> ComponentSpec:
    """The VAE encoder component (edits); `config` fixes z_dim (None: the released model, 16)."""
    latent = _latent_shape((config or {}).get("z_dim", REAL_Z_DIM))
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
