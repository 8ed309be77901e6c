"""Previews that cost almost nothing: partial images from a linear map of the latent channels to
RGB (plus a bias) instead of a full VAE decode, as image tools that stream previews do.

The map is fitted once per VAE, at load: latents go through the real decoder (the family's
`LatentLayout.decode`, so a VAE engine stand-in works as well as the torch VAE), its pixels are
averaged over each latent pixel's 8x8 footprint, and least squares gives the 3 x C weights and the
bias. The latents are the model's own: a few small, short generations of plain colour prompts
(a trained VAE's latents live on a small part of latent space, and a map fitted on random latents
gets the colours of real ones wrong), plus random latents so that the rest of the space is not
left to chance. The map reads each grid divided by its RMS (`unit_rms`): VAE decoders start
with a convolution and a GroupNorm, so a grid's overall scale barely changes its colours, and the
predicted clean latents of early steps are the final ones shrunk; read raw, they come out grey. It is cached as a small JSON file under `$OMNI_TRT_CACHE/previews/` (default
~/.cache/omni-trt/previews/), named by a key of the decoder: for a torch VAE its class, config and
a strided sample of every parameter tensor (so two checkpoints of one config differ); for an engine
stand-in the sha256 of the decoder's ONNX files in the engine dir's manifest.

A preview is the map applied to the step's predicted clean latent grid, upsampled (bilinear) to at
most PREVIEW_MAX_SIDE pixels on its long side, aspect kept. The final image never goes through here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..files import atomic_write, cache_root
from ..models import Family, SizeLimits

log = logging.getLogger(__name__)

DECODERS = ("linear", "full")  # --preview-decoder: the fitted map, or the VAE decoder (full-size previews)
PREVIEW_MAX_SIDE = 512  # linear previews' long side at most (never larger than the image)
FIT_VERSION = 2  # bump when the fit changes: cached maps of older fits are then refitted
FIT_MAX_SIDE = 128  # the fit's images: the model's default size, scaled down to this long side (the profile's nearest)
FIT_LATENTS = 4  # latents fitted on: half white noise, half smooth (image latents are spatially correlated)
HELD_BACK = 2  # latents kept out of the fit, to measure it
# Generated at load: everyday prompts whose colours span the palette, at most FIT_STEPS steps (a
# clean-enough latent).
FIT_PROMPTS = ("a red circle on a blue background", "a yellow square on a black background",
               "a green triangle on a white background", "a white circle on a red background",
               "a blue square on a yellow background", "a black triangle on a green background")
FIT_STEPS = 8
FIT_BATCH = 2  # prompts a call (engines built for one image get them one by one)
MARGIN = 2  # latent pixels left out at each border: the decoder's padding tints them


def preview_size(width: int, height: int, max_side: int = PREVIEW_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of a linear preview of a width x height image: the long side at most
    `max_side`, the aspect kept, never larger than the image."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True, eq=False)
class LinearPreview:
    """pixels = weight @ latent + bias, per latent pixel. weight: (3, C), bias: (3,), float32 on
    the CPU; fit: how it was fitted and how well (held-back RMSE in 0..1 colour units, next to the
    RMSE of predicting the mean colour)."""

    weight: torch.Tensor
    bias: torch.Tensor
    fit: dict[str, Any] = field(default_factory=dict)
    unit_rms: bool = True  # the grid is divided by its RMS first (fitted so)

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])

    def pixels(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latent grid -> (B, 3, h, w) pixels, about [-1, 1], unclamped."""
        w = self.weight.to(grid.device)
        grid = as_unit_rms(grid) if self.unit_rms else grid.float()
        return torch.einsum("oc,bchw->bohw", w, grid) + self.bias.to(grid.device).view(1, 3, 1, 1)

    def images(self, grid: torch.Tensor, width: int, height: int) -> list[Any]:
        """PIL previews of a width x height image from its latent grid, at preview_size."""
        from PIL import Image

        size = preview_size(width, height)
        x = ((self.pixels(grid) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        # Upsampled as 8-bit by Pillow: about half the time of interpolating floats first.
        return [Image.fromarray(a).resize(size, Image.Resampling.BILINEAR) for a in x]

    def to_json(self) -> dict[str, Any]:
        return {"version": FIT_VERSION, "weight": self.weight.tolist(), "bias": self.bias.tolist(), "fit": self.fit,
                "unit_rms": self.unit_rms}

    @classmethod
    def from_json(cls, data: dict[str, Any], channels: int) -> LinearPreview:
        """A cached map; ValueError unless it is of this fit version and has `channels` inputs."""
        weight = torch.tensor(data["weight"], dtype=torch.float32)
        bias = torch.tensor(data["bias"], dtype=torch.float32)
        if data.get("version") != FIT_VERSION or weight.shape != (3, channels) or bias.shape != (3,):
            raise ValueError(f"a map of version {data.get('version')} and shape {tuple(weight.shape)}, not ({3}, {channels})")
        return cls(weight, bias, dict(data.get("fit", {})), bool(data.get("unit_rms", True)))


def sample_latents(channels: int, height: int, width: int, smooth: bool, generator: torch.Generator) -> torch.Tensor:
    """One random (1, C, h, w) latent grid, unit variance per channel: white noise, or noise at a
    quarter of the resolution upsampled (smooth, like an image's latents)."""
    if not smooth:
        return torch.randn(1, channels, height, width, generator=generator)
    base = torch.randn(1, channels, max(2, math.ceil(height / 4)), max(2, math.ceil(width / 4)), generator=generator)
    x = F.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)
    return x / x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def as_unit_rms(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) grids, each divided by its root mean square (float32)."""
    grid = grid.float()
    return grid / grid.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)


def pooled_pairs(decode: Callable[[torch.Tensor], torch.Tensor], grid: torch.Tensor, unit_rms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent pixels (N, C), the decoder's pixels averaged over each one's footprint (N, 3)),
    float64, the border MARGIN left out where the grid is large enough; unit_rms: the latent
    pixels of the grid divided by its RMS, as a unit_rms map reads them."""
    with torch.inference_mode():
        pixels = decode(grid).float().cpu()
    grid = as_unit_rms(grid) if unit_rms else grid
    factor = pixels.shape[-1] // grid.shape[-1]
    pooled = F.avg_pool2d(pixels, factor)
    m = MARGIN if min(grid.shape[-2:]) > 2 * MARGIN + 4 else 0
    if m:
        grid, pooled = grid[..., m:-m, m:-m], pooled[..., m:-m, m:-m]
    channels = grid.shape[1]
    return grid.permute(0, 2, 3, 1).reshape(-1, channels).double(), pooled.permute(0, 2, 3, 1).reshape(-1, 3).double()


def colour_rmse(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """RMSE in 0..1 colour units of two (N, 3) pixel sets in [-1, 1] (clamped, as images are)."""
    return float(((predicted.clamp(-1, 1) - target.clamp(-1, 1)) / 2).pow(2).mean().sqrt())


def fit_linear(decode: Callable[[torch.Tensor], torch.Tensor], channels: int, grid_height: int, grid_width: int,
               latents: int = FIT_LATENTS, held_back: int = HELD_BACK, seed: int = 0,
               generated: list[torch.Tensor] = (), unit_rms: bool = True) -> LinearPreview:
    """Least squares of the decoder's pooled pixels on the latent pixels (with a bias), over
    `latents` random grids of grid_height x grid_width and the `generated` grids (the model's own,
    each (1, C, h, w)); `held_back` more of each kind measure it.
    decode((1, C, h, w) float32 CPU grid) -> (1, 3, H, W) pixels."""
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    random = [pooled_pairs(decode, sample_latents(channels, grid_height, grid_width, i % 2 == 1, generator), unit_rms)
              for i in range(latents + held_back)]
    own = [pooled_pairs(decode, grid, unit_rms) for grid in generated]
    own_held = min(held_back, len(own) // 3)  # the measure that matters: the model's own latents
    fitted = random[:latents] + own[own_held:]
    x = torch.cat([p[0] for p in fitted])
    y = torch.cat([p[1] for p in fitted])
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y).solution  # (C + 1, 3)
    weight, bias = solution[:channels].T.float().contiguous(), solution[channels].float().contiguous()
    fit: dict[str, Any] = {"grid": f"{grid_width}x{grid_height}", "latents": latents, "generated": len(own) - own_held,
                           "held_back": held_back + own_held}
    if held_back or own_held:
        held = own[:own_held] or random[latents:]  # generated latents held back where there are some
        hx = torch.cat([p[0] for p in held])
        hy = torch.cat([p[1] for p in held])
        fit["rmse"] = round(colour_rmse(hx @ solution[:channels] + solution[channels], hy), 5)
        fit["mean_colour_rmse"] = round(colour_rmse(y.mean(0).expand_as(hy), hy), 5)  # what a constant colour scores
    fit["seconds"] = round(time.perf_counter() - t0, 3)
    return LinearPreview(weight, bias, fit, unit_rms)


def cache_dir() -> Path:
    """Where fitted maps are kept: $OMNI_TRT_CACHE/previews (the demo model's cache root)."""
    return cache_root() / "previews"


def decoder_key(pipe: Any, family: Family, decoder_id: str | None = None) -> str | None:
    """What names a VAE decoder's map: family, VAE class and config, and `decoder_id` (an engine's
    ONNX sha256) or else a strided sample of every parameter of the torch VAE. None: nothing
    names it (a stand-in without an id), so it is fitted and not cached."""
    vae = pipe.vae
    params = list(vae.named_parameters())
    if decoder_id is None and not params:
        return None
    h = hashlib.sha256(f"{FIT_VERSION}:{family.name}:{type(vae).__name__}:{decoder_id}\n".encode())
    h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    if decoder_id is None:
        for name, p in params:
            flat = p.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 32)][:32].float().cpu()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:".encode() + sample.numpy().tobytes())
    return h.hexdigest()


def load_or_fit(pipe: Any, family: Family, limits: SizeLimits, decoder_id: str | None = None, cache: Path | None = None) -> LinearPreview:
    """The linear preview map of the pipeline's VAE: from the cache, else fitted (at the size
    fit_size: the model's default size, small, within `limits`) and cached."""
    layout = family.latent_layout
    channels = layout.channels(pipe)
    key = decoder_key(pipe, family, decoder_id)
    path = (cache or cache_dir()) / f"{key[:32]}.json" if key else None
    if path is not None and path.is_file():
        try:
            preview = LinearPreview.from_json(json.loads(path.read_text()), channels)
            log.info("preview decoder: linear map from %s", path)
            return preview
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("preview decoder: refitting, %s is unusable (%s)", path, e)
    width, height = fit_size(family, limits)
    factor = int(pipe.vae_scale_factor)
    device = pipe.vae.device
    generated = generated_grids(pipe, family, width, height)
    preview = fit_linear(lambda grid: layout.decode(pipe, grid.to(device)), channels, height // factor, width // factor,
                         generated=generated)
    log.info("preview decoder: linear map fitted in %.2fs on %d generated and %d random latents (held-back colour RMSE %s, "
             "a constant colour's %s)", preview.fit["seconds"], preview.fit["generated"], preview.fit["latents"],
             preview.fit.get("rmse"), preview.fit.get("mean_colour_rmse"))
    if path is not None:
        try:
            atomic_write(path, json.dumps({**preview.to_json(), "family": family.name}) + "\n")
        except OSError as e:  # a read-only home: the map still works, it is fitted again next load
            log.warning("preview decoder: cannot cache the map in %s (%s)", path, e)
    return preview


def fit_size(family: Family, limits: SizeLimits) -> tuple[int, int]:
    """The size the map is fitted at: where the model draws (its default size), no larger than
    FIT_MAX_SIDE on the long side (generating at load must stay cheap), within `limits`."""
    width, height = family.defaults.width, family.defaults.height
    scale = min(1.0, FIT_MAX_SIDE / max(width, height))
    return limits.fit(round(width * scale), round(height * scale))


def generated_grids(pipe: Any, family: Family, width: int, height: int) -> list[torch.Tensor]:
    """The model's own latent grids, (1, C, h, w) float32 on the CPU, one per FIT_PROMPTS, made by
    the pipeline as a request would be (its default guidance), seeded; FIT_BATCH prompts a call, or
    one where the engines' profile takes no more; [] where the pipeline cannot make them (the fit
    then has the random latents alone)."""
    steps = max(2, min(family.defaults.steps, FIT_STEPS))
    for batch in dict.fromkeys((FIT_BATCH, 1)):
        try:
            return [grid for i in range(0, len(FIT_PROMPTS), batch)
                    for grid in _generate(pipe, family, list(FIT_PROMPTS[i:i + batch]), width, height, steps, seed=i)]
        except Exception as e:  # previews are never worth a load
            failure = e
    log.warning("preview decoder: fitting on random latents only, generating failed (%s: %s)", type(failure).__name__, failure)
    return []


def _generate(pipe: Any, family: Family, prompts: list[str], width: int, height: int, steps: int, seed: int) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = pipe(prompt=prompts, width=width, height=height, num_inference_steps=steps,
                   generator=[torch.Generator(device="cpu").manual_seed(seed + j) for j in range(len(prompts))],  # batching changes nothing
                   output_type="latent")
    latents = out.images if hasattr(out, "images") else out[0]
    return list(family.latent_layout.grid(pipe, latents, height, width).float().cpu().split(1))
