"""The Qwen-Image VAE decoder (AutoencoderKLQwenImage.decode) for single images (one frame).

A video VAE: latents are (B, z_dim, frames, H/8, W/8) and the text-to-image pipeline always
passes one frame and reads frame 0 of the output. For the first (only) frame:
- every causal 3D conv pads two zero frames in front, so only its last temporal tap sees data:
  a 2D conv with that tap's kernel is exact (a third of the conv FLOPs and no 5D conv);
- the decoder's temporal upsamplers skip their `time_conv` on the first frame;
- `nearest-exact` x2 upsampling picks the same pixels as `nearest` (a plain ONNX Resize).
The wrapper keeps the input/output layout of `decode` (frame axis fixed to 1).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any, Mapping

from ..base import ComponentSpec, Engine, Point, ReferenceCase, TensorSpec

FACTOR = 8  # pixels per latent cell: len(temperal_downsample) == 3 down stages
REAL_Z_DIM = 16


def _latent_shape(z_dim: int):
    return lambda p: (p.batch, z_dim, 1, p.height // FACTOR, p.width // FACTOR)


def _image_shape(p: Point) -> tuple[int, ...]:
    return (p.batch, 3, 1, p.height, p.width)


def _single_frame_decoder(vae: Any) -> tuple[Any, Any]:
    """Copies of post_quant_conv and the decoder rewritten for one frame (the originals stay as
    they are; the decoder is a small part of the VAE)."""
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

    return rewrite(copy.deepcopy(vae.post_quant_conv)), rewrite(copy.deepcopy(vae.decoder))


def _wrapper(vae: Any) -> Any:
    import torch

    class QwenImageVaeDecoder(torch.nn.Module):
        """decode() of one frame: post_quant_conv, the decoder without feature caches, clamp."""

        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.post_quant_conv, self.decoder = _single_frame_decoder(vae)

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


def _standin(config: Mapping[str, Any], engine: Engine) -> Any:
    import torch

    from ..standin import VaeStandIn

    class QwenImageVaeStandIn(VaeStandIn):
        """Answers `vae.decode(z, return_dict=False)` for one frame from an engine; no weights.
        Exposes what QwenImagePipeline reads: config (z_dim, latents_mean/std),
        temperal_downsample (its vae_scale_factor), dtype, device."""

        def __init__(self) -> None:
            super().__init__(config, engine)
            self.z_dim = config["z_dim"]
            self.temperal_downsample = list(config["temperal_downsample"])
            self.temperal_upsample = self.temperal_downsample[::-1]
            self.spatial_compression_ratio = 2 ** len(self.temperal_downsample)

        def decode(self, z: torch.Tensor, return_dict: bool = True) -> Any:
            if z.ndim != 5 or z.shape[2] != 1:
                raise ValueError(f"the Qwen-Image VAE engine decodes one frame (B, C, 1, H, W), got {tuple(z.shape)}")
            image = self.engine({"latent": z})["image"]
            return (image,) if not return_dict else SimpleNamespace(sample=image)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.decode(z, return_dict=False)[0]

    return QwenImageVaeStandIn()


def decode_latents(pipe: Any, latents: Any, height: int, width: int) -> list[Any]:
    """What QwenImagePipeline does after its loop: unpack to one frame, undo the per-channel
    normalisation, decode, take frame 0, postprocess."""
    import torch

    cfg = pipe.vae.config
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    image = pipe.vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type="pil")


def vae_decoder_spec(config: Mapping[str, Any] | None = None) -> ComponentSpec:
    """The VAE decoder component; `config` fixes z_dim (None: the released model, 16)."""
    z_dim = (config or {}).get("z_dim", REAL_Z_DIM)
    return ComponentSpec(
        name="vae_decoder",
        pipeline_attr="vae",
        inputs=(TensorSpec("latent", _latent_shape(z_dim), {0: "batch", 3: "latent_height", 4: "latent_width"}),),
        outputs=(TensorSpec("image", _image_shape, {0: "batch", 3: "height", 4: "width"}),),
        wrapper=_wrapper,
        reference_case=_reference_case,
        standin=_standin,
        allow_fp16=False,  # untested in fp16; bf16 or fp32 as for the Flux-style VAEs
    )
