"""Previews that cost almost nothing: partial images from a small map of the latent channels to RGB
instead of a full VAE decode, as image tools that stream previews do.

Two maps, both fitted once per VAE at load from the decoder's own outputs: latents go through the
real decoder (the family's `LatentLayout.decode`, so a VAE engine stand-in works as well as the
torch VAE), its pixels are averaged over each latent pixel's 8x8 footprint, and the map learns
latent pixel -> pooled colour.
- linear: 3 x C weights and a bias, by least squares.
- mlp (serve's default): that linear map plus a per-pixel SiLU network (C -> MLP_HIDDEN -> 3),
  started at zero and fitted with MLP_STEPS full-batch Adam steps. A trained VAE's colours are not
  linear in its latents (on the demo model the linear map read red as yellow and green as blue).
The latents are the model's own: a few small, short generations of plain colour prompts, each
step's predicted clean latent from the second quarter of the steps on (what previews show: blurred
and shrunk against the final latent; a map fitted on final latents alone gets their colours
wrong), plus random latents so that the rest of the space is not left to chance. A map reads each
grid divided by its RMS (`unit_rms`): VAE decoders start with a convolution and a GroupNorm, so a
grid's overall scale barely changes its colours, and the predicted clean latents of early steps
are the final ones shrunk. A map is cached as a small JSON file under `$OMNI_TRT_CACHE/previews/`
(default ~/.cache/omni-trt/previews/), named by its kind and a key of the decoder
(runtime.modulekey): for a torch VAE its class, config and a strided sample of every parameter
tensor (so two checkpoints of one config differ); for an engine stand-in the sha256 of the
decoder's ONNX files in the engine dir's manifest.

A preview is the map applied to the step's predicted clean latent grid, upsampled (bilinear) to at
most PREVIEW_MAX_SIDE pixels on its long side, aspect kept. The final image never goes through here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ..files import atomic_write, cache_root
from ..models import Family, SizeLimits
from .modulekey import module_key

log = logging.getLogger(__name__)

# --preview-decoder: the fitted network, the fitted linear map, or the VAE decoder (full-size previews).
DECODERS = ("mlp", "linear", "full")
DEFAULT_DECODER = "mlp"  # serve's default
PREVIEW_MAX_SIDE = 512  # fitted previews' long side at most (never larger than the image)
FIT_VERSION = 3  # bump when the fit changes: cached maps of older fits are then refitted (3: the mlp, step latents)
FIT_MAX_SIDE = 128  # the fit's images: the model's default size, scaled down to this long side (the profile's nearest)
FIT_LATENTS = 4  # random latents fitted on: half white noise, half smooth (image latents are spatially correlated)
HELD_BACK = 2  # random latents, or else generations (all their steps), kept out of the fit to measure it
# Generated at load: everyday prompts whose colours span the palette, FIT_SEEDS seeds each, at most
# FIT_STEPS steps.
FIT_PROMPTS = ("a red circle on a blue background", "a yellow square on a black background",
               "a green triangle on a white background", "a white circle on a red background",
               "a blue square on a yellow background", "a black triangle on a green background")
FIT_SEEDS = 3
FIT_STEPS = 8
FIT_BATCH = 2  # prompts a call (engines built for one image get them one by one)
MARGIN = 2  # latent pixels left out at each border: the decoder's padding tints them
MLP_HIDDEN = 32
MLP_STEPS = 400  # full-batch Adam steps, the learning rate MLP_LR annealed to 0 (cosine)
MLP_LR = 1e-2
MLP_ROWS = 4096  # latent pixels (a seeded sample) the network's steps run on: what keeps the fit at load cheap


def preview_size(width: int, height: int, max_side: int = PREVIEW_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of a fitted preview of a width x height image: the long side at most
    `max_side`, the aspect kept, never larger than the image."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True, eq=False)
class PreviewMap:
    """pixels = weight @ z + bias [+ out @ silu(hidden @ z + hidden_bias)] per latent pixel z (the
    bracket: kind "mlp"). weight: (3, C), bias: (3,), hidden: (H, C), hidden_bias: (H,), out:
    (3, H), float32 on the CPU; fit: how it was fitted and how well (held-back RMSE in 0..1 colour
    units, next to the RMSE of predicting the mean colour)."""

    weight: torch.Tensor
    bias: torch.Tensor
    fit: dict[str, Any] = field(default_factory=dict)
    unit_rms: bool = True  # the grid is divided by its RMS first (fitted so)
    hidden: torch.Tensor | None = None
    hidden_bias: torch.Tensor | None = None
    out: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])

    @property
    def kind(self) -> str:
        """What --preview-decoder names it: "mlp" or "linear"."""
        return "linear" if self.hidden is None else "mlp"

    def pixels(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latent grid -> (B, 3, h, w) pixels, about [-1, 1], unclamped."""
        z = as_unit_rms(grid) if self.unit_rms else grid.float()
        x = torch.einsum("oc,bchw->bohw", self.weight.to(z.device), z) + self.bias.to(z.device).view(1, 3, 1, 1)
        if self.hidden is None:
            return x
        h = F.silu(torch.einsum("kc,bchw->bkhw", self.hidden.to(z.device), z) + self.hidden_bias.to(z.device).view(1, -1, 1, 1))
        return x + torch.einsum("ok,bkhw->bohw", self.out.to(z.device), h)

    def images(self, grid: torch.Tensor, width: int, height: int) -> list[Any]:
        """PIL previews of a width x height image from its latent grid, at preview_size."""
        from PIL import Image

        size = preview_size(width, height)
        x = ((self.pixels(grid) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        # Upsampled as 8-bit by Pillow: about half the time of interpolating floats first.
        return [Image.fromarray(a).resize(size, Image.Resampling.BILINEAR) for a in x]

    def to_json(self) -> dict[str, Any]:
        out = {"version": FIT_VERSION, "kind": self.kind, "weight": self.weight.tolist(), "bias": self.bias.tolist(),
               "fit": self.fit, "unit_rms": self.unit_rms}
        if self.hidden is not None:
            out.update(hidden=self.hidden.tolist(), hidden_bias=self.hidden_bias.tolist(), out=self.out.tolist())
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], channels: int) -> PreviewMap:
        """A cached map; ValueError unless it is of this fit version and has `channels` inputs."""
        t = {k: torch.tensor(data[k], dtype=torch.float32) for k in ("weight", "bias", "hidden", "hidden_bias", "out") if k in data}
        weight, bias = t["weight"], t["bias"]
        if data.get("version") != FIT_VERSION or weight.shape != (3, channels) or bias.shape != (3,):
            raise ValueError(f"a map of version {data.get('version')} and shape {tuple(weight.shape)}, not ({3}, {channels})")
        hidden = t.get("hidden")
        if hidden is not None and (hidden.shape[1:] != (channels,) or t["hidden_bias"].shape != hidden.shape[:1]
                                   or t["out"].shape != (3, hidden.shape[0])):
            raise ValueError(f"an mlp map of shapes {tuple(hidden.shape)}, {tuple(t['out'].shape)} for {channels} channels")
        return cls(weight, bias, dict(data.get("fit", {})), bool(data.get("unit_rms", True)), hidden, t.get("hidden_bias"), t.get("out"))


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
    pixels of each grid divided by its RMS, as a unit_rms map reads them."""
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


@dataclass(frozen=True)
class FitData:
    """Pooled pairs (latent pixels, colours) to fit on and to measure on, and what they came from."""

    x: torch.Tensor
    y: torch.Tensor
    held_x: torch.Tensor | None
    held_y: torch.Tensor | None
    about: dict[str, Any]


def fit_data(decode: Callable[[torch.Tensor], torch.Tensor], channels: int, grid_height: int, grid_width: int,
             latents: int = FIT_LATENTS, held_back: int = HELD_BACK, seed: int = 0,
             generated: list[torch.Tensor] = (), unit_rms: bool = True) -> FitData:
    """`latents` random grids of grid_height x grid_width and the `generated` ones (the model's
    own: one (k, C, h, w) tensor per generation, its steps' grids) through the decoder, pooled;
    held back: `held_back` random grids, or, where there are generations, up to `held_back` whole
    generations (the measure that matters: the model's own latents, none of their steps fitted).
    decode((k, C, h, w) float32 CPU grids) -> (k, 3, H, W) pixels."""
    generator = torch.Generator().manual_seed(seed)
    random = [pooled_pairs(decode, sample_latents(channels, grid_height, grid_width, i % 2 == 1, generator), unit_rms)
              for i in range(latents + held_back)]
    own = [pooled_pairs(decode, grids, unit_rms) for grids in generated]
    own_held = min(held_back, len(own) // 3)
    fitted = random[:latents] + own[own_held:]
    held = own[:own_held] or random[latents:]
    about = {"grid": f"{grid_width}x{grid_height}", "latents": latents, "generated": len(own) - own_held,
             "generated_grids": sum(len(g) for g in generated[own_held:]), "held_back": held_back if not own_held else own_held}
    return FitData(torch.cat([p[0] for p in fitted]), torch.cat([p[1] for p in fitted]),
                   torch.cat([p[0] for p in held]) if held else None, torch.cat([p[1] for p in held]) if held else None, about)


def _measured(data: FitData, predict: Callable[[torch.Tensor], torch.Tensor], t0: float) -> dict[str, Any]:
    fit = dict(data.about)
    if data.held_x is not None:
        fit["rmse"] = round(colour_rmse(predict(data.held_x), data.held_y), 5)
        fit["mean_colour_rmse"] = round(colour_rmse(data.y.mean(0).expand_as(data.held_y), data.held_y), 5)  # a constant colour's
    fit["seconds"] = round(time.perf_counter() - t0, 3)
    return fit


def fit_linear(decode: Callable[[torch.Tensor], torch.Tensor], channels: int, grid_height: int, grid_width: int,
               latents: int = FIT_LATENTS, held_back: int = HELD_BACK, seed: int = 0,
               generated: list[torch.Tensor] = (), unit_rms: bool = True) -> PreviewMap:
    """Least squares of the decoder's pooled pixels on the latent pixels (with a bias), over
    fit_data's pairs (the arguments are its)."""
    t0 = time.perf_counter()
    data = fit_data(decode, channels, grid_height, grid_width, latents, held_back, seed, generated, unit_rms)
    weight, bias = _least_squares(data.x, data.y)
    fit = _measured(data, lambda x: x.float() @ weight.T + bias, t0)
    return PreviewMap(weight, bias, fit, unit_rms)


def _least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y).solution  # (C + 1, 3)
    return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


def fit_mlp(decode: Callable[[torch.Tensor], torch.Tensor], channels: int, grid_height: int, grid_width: int,
            latents: int = FIT_LATENTS, held_back: int = HELD_BACK, seed: int = 0,
            generated: list[torch.Tensor] = (), steps: int | None = None, rows: int = MLP_ROWS) -> PreviewMap:
    """The least-squares linear map plus a per-pixel SiLU network (C -> MLP_HIDDEN -> 3) whose output
    layer starts at zero, so the fit starts at the linear map; `steps` (MLP_STEPS) full-batch Adam steps on
    the squared error over `rows` of fit_data's pairs (the arguments are its; the least squares
    has them all). Seeded: the same pairs give the same map."""
    t0 = time.perf_counter()
    steps, hidden = MLP_STEPS if steps is None else steps, MLP_HIDDEN
    data = fit_data(decode, channels, grid_height, grid_width, latents, held_back, seed, generated, unit_rms=True)
    weight, bias = _least_squares(data.x, data.y)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data.x), generator=generator)[:rows]
    x, y = data.x[pick].float(), data.y[pick].float()  # new tensors (not inference ones): autograd keeps x
    params = [weight.clone(), bias.clone(), (torch.rand(hidden, channels, generator=generator) * 2 - 1) / math.sqrt(channels),
              torch.zeros(hidden), torch.zeros(3, hidden)]  # weight, bias, hidden, hidden_bias, out
    for p in params:
        p.requires_grad_(True)

    def predict(v: torch.Tensor) -> torch.Tensor:
        return v @ params[0].T + params[1] + F.silu(v @ params[2].T + params[3]) @ params[4].T

    opt = torch.optim.Adam(params, lr=MLP_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    threads = torch.get_num_threads()
    # One thread: ops this small gain little from more, and on a busy machine each op of several
    # threads waits for the slowest (on this shared 2-core machine, seconds become tens of seconds).
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                F.mse_loss(predict(x), y).backward()
                opt.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        fit = _measured(data, lambda v: predict(v.float()), t0)
        fit.update(hidden=hidden, steps=steps)
        weight, bias, hidden_w, hidden_b, out = (p.detach().contiguous() for p in params)
    return PreviewMap(weight, bias, fit, True, hidden_w, hidden_b, out)


FITS: dict[str, Callable[..., PreviewMap]] = {"mlp": fit_mlp, "linear": fit_linear}


def cache_dir() -> Path:
    """Where fitted maps are kept: $OMNI_TRT_CACHE/previews (the demo model's cache root)."""
    return cache_root() / "previews"


def decoder_key(pipe: Any, family: Family, decoder_id: str | None = None, kind: str = DEFAULT_DECODER) -> str | None:
    """What names a VAE decoder's map of `kind`: the fit version, kind and family, the VAE's class
    and config, and `decoder_id` (an engine's ONNX sha256) or else a strided sample of every
    parameter of the torch VAE (runtime.modulekey). None: nothing names it (a stand-in without an
    id), so it is fitted and not cached."""
    if decoder_id is None and not any(True for _ in pipe.vae.parameters()):
        return None
    return module_key(pipe.vae, FIT_VERSION, kind, family.name, decoder_id)


def load_or_fit(pipe: Any, family: Family, limits: SizeLimits, decoder_id: str | None = None, cache: Path | None = None,
                kind: str = DEFAULT_DECODER) -> PreviewMap:
    """The preview map of `kind` ("mlp" or "linear") of the pipeline's VAE: from the cache, else
    fitted (at fit_size: the model's default size, small, within `limits`) and cached."""
    if kind not in FITS:
        raise ValueError(f"unknown fitted preview decoder {kind!r}; choose one of {', '.join(FITS)}")
    layout = family.latent_layout
    channels = layout.channels(pipe)
    key = decoder_key(pipe, family, decoder_id, kind)
    path = (cache or cache_dir()) / f"{key[:32]}.json" if key else None
    if path is not None and path.is_file():
        try:
            preview = PreviewMap.from_json(json.loads(path.read_text()), channels)
            if preview.kind != kind:
                raise ValueError(f"a {preview.kind} map, not {kind}")
            log.info("preview decoder: %s map from %s", kind, path)
            return preview
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("preview decoder: refitting, %s is unusable (%s)", path, e)
    t0 = time.perf_counter()
    width, height = fit_size(family, limits)
    factor = int(pipe.vae_scale_factor)
    device = pipe.vae.device
    generated = generated_grids(pipe, family, width, height)
    preview = FITS[kind](lambda grid: layout.decode(pipe, grid.to(device)), channels, height // factor, width // factor,
                         generated=generated)
    preview.fit["load_seconds"] = round(time.perf_counter() - t0, 3)  # generating included
    log.info("preview decoder: %s map fitted in %.2fs (%.2fs with generating) on %d generations and %d random latents "
             "(held-back colour RMSE %s, a constant colour's %s)", kind, preview.fit["seconds"], preview.fit["load_seconds"],
             preview.fit["generated"], preview.fit["latents"], preview.fit.get("rmse"), preview.fit.get("mean_colour_rmse"))
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
    """The model's own latent grids: per generation of FIT_PROMPTS x FIT_SEEDS, made by the
    pipeline as a request would be (its defaults, at most FIT_STEPS steps), seeded, a
    (k, C, h, w) float32 CPU tensor of the predicted clean grids of its steps from the second
    quarter on (the last one is the final latent). FIT_BATCH prompts a call, or one where the
    engines' profile takes no more; [] where the pipeline cannot make them (an edit-only family,
    a failure: the fit then has the random latents alone)."""
    if not family.edits.generations:
        log.info("preview decoder: fitting on random latents only (this model generates only from an input image)")
        return []
    steps = max(2, min(family.defaults.steps, FIT_STEPS))
    prompts = [(p, 100 * s + i) for s in range(FIT_SEEDS) for i, p in enumerate(FIT_PROMPTS)]
    for batch in dict.fromkeys((FIT_BATCH, 1)):
        try:
            return [grids for i in range(0, len(prompts), batch)
                    for grids in _generate(pipe, family, prompts[i:i + batch], width, height, steps)]
        except Exception as e:  # previews are never worth a load
            failure = e
    log.warning("preview decoder: fitting on random latents only, generating failed (%s: %s)", type(failure).__name__, failure)
    return []


def _generate(pipe: Any, family: Family, prompts: list[tuple[str, int]], width: int, height: int, steps: int) -> list[torch.Tensor]:
    """One call for (prompt, seed) pairs, with what a request of them gets (the model's default
    guidance and negative prompt): per prompt, its predicted clean grids of steps >= steps // 4."""
    from .request import ImageAsk, pipeline_kwargs, resolve

    requests = [resolve(family, ImageAsk(prompt, size=f"{width}x{height}", steps=steps, seed=seed)) for prompt, seed in prompts]
    clean: list[torch.Tensor] = []
    with torch.inference_mode(), _clean_latents(pipe.scheduler, steps // 4, clean):
        pipe(**{**pipeline_kwargs(requests), "output_type": "latent"})
    if not clean:
        raise RuntimeError("the scheduler stepped no step")
    grids = torch.stack([family.latent_layout.grid(pipe, x0, height, width).float().cpu() for x0 in clean], 1)  # (B, k, C, h, w)
    return list(grids.unbind(0))


def predicted_clean(scheduler: Any, sample: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """Called after the scheduler's step: the step's predicted clean latents, float32. Every served
    family samples with flow matching, where x0 = x_t - sigma_t * v: exact, whatever CFG the
    pipeline combined v from."""
    sigma = scheduler.sigmas[scheduler.step_index - 1].to(device=sample.device, dtype=torch.float32)
    return sample.float() - sigma * model_output.float()


@contextmanager
def _clean_latents(scheduler: Any, first: int, into: list[torch.Tensor]) -> Iterator[None]:
    """The scheduler's step, also putting each step's predicted clean latents from step `first` on
    into `into` (predicted_clean, as the runtime's previews take them)."""
    before = scheduler.__dict__.get("step")  # a wrapper already there stays under this one
    real = scheduler.step

    def step(model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(model_output, timestep, sample, *args, **kwargs)
        if scheduler.step_index - 1 >= first:
            into.append(predicted_clean(scheduler, sample, model_output))
        return out

    scheduler.step = step
    try:
        yield
    finally:
        if before is None:
            del scheduler.step
        else:
            scheduler.step = before
