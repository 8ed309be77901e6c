"""Whether fitted previews show the final image's colours, on the trained demo model: the last of
3 previews and the final image read back by the demo's checker (omni_trt/demo/quality.py) over
its benchmark prompts, for each map the server can fit at load (mlp, serve's default, and linear;
the model's own latents), side by side with a linear map fitted on random latents alone, the full
VAE decoder (`--preview-decoder full`: the ceiling any preview decoder of the same predicted image
can reach) and that decoder's pixels averaged over each latent pixel's footprint (the ceiling of
any map that gives one colour per latent pixel, as both fitted maps do). Also per map: the
held-back colour RMSE against the full decoder's pooled colours on these prompts' last-preview
latents, and the seconds of its fit at load (generating included).

    python benchmarks/preview_colours.py [--prompts 30] [--out benchmarks/results/preview-colours-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """A preview map that also keeps the latent grids it was given (the last preview's, per prompt)."""

    def __init__(self, inner):
        self.inner, self.grids = inner, []

    def images(self, grid, width, height):
        self.grids.append(grid.detach().float().cpu().clone())
        return self.inner.images(grid, width, height)


class Pooled:
    """The full decoder's pixels averaged over each latent pixel's footprint, upsampled as a map's."""

    def __init__(self, rt):
        self.rt = rt

    def images(self, grid, width, height):
        import torch
        import torch.nn.functional as F

        from omni_trt.runtime.preview import PreviewMap

        with torch.inference_mode():
            pixels = F.avg_pool2d(self.rt.family.latent_layout.decode(self.rt.pipe, grid).float(), int(self.rt.pipe.vae_scale_factor))
        identity = PreviewMap(torch.eye(3), torch.zeros(3), unit_rms=False)
        return identity.images(pixels, width, height)


def agreement(rt, prompts, last_grids: list | None = None, size: str | None = None) -> dict:
    from omni_trt.demo.quality import read_picture
    from omni_trt.runtime.request import ImageAsk, resolve

    bg = fg = 0
    for prompt, seed in prompts:
        got: list = []
        req = resolve(rt.family, ImageAsk(prompt, size=size, steps=8, seed=seed, partial_images=3))
        final = rt.generate([req], on_preview=lambda *a: got.append(a)).images[0][0]
        last = max(got, key=lambda a: a[2])[3].convert("RGB").resize(final.size)
        seen, want = read_picture(np.asarray(last)), read_picture(np.asarray(final.convert("RGB")))
        bg += seen.bg == want.bg
        fg += seen.fg == want.fg
    if last_grids is not None and isinstance(rt.preview, Recorder):
        last_grids.extend(rt.preview.grids[2::3])  # 3 previews a prompt: the last of each
    return {"background_agrees": bg, "foreground_agrees": fg, "prompts": len(prompts)}


def held_back_rmse(rt, preview, grids) -> float:
    """Colour RMSE (0..1) of a map against the full decoder pooled to the latent grid, on `grids`."""
    import torch

    from omni_trt.runtime.preview import MARGIN, colour_rmse, pooled_pairs

    g = torch.cat(grids)
    _, y = pooled_pairs(lambda x: rt.family.latent_layout.decode(rt.pipe, x), g)
    got = preview.pixels(g)
    m = MARGIN if min(g.shape[-2:]) > 2 * MARGIN + 4 else 0  # the border pooled_pairs leaves out
    got = (got[..., m:-m, m:-m] if m else got).permute(0, 2, 3, 1).reshape(-1, 3).double()
    return round(colour_rmse(got, y), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--size", default=None, help="WxH (default: the demo model's own default size)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/preview-colours-cpu.json"))
    args = ap.parse_args()
    os.environ["OMNI_TRT_CACHE"] = tempfile.mkdtemp(prefix="omni-previews-")  # fitted here, not read from a cache
    from omni_trt.demo.quality import benchmark_prompts
    from omni_trt.models import SizeLimits
    from omni_trt.runtime import preview
    from omni_trt.runtime.loader import load_runtime, resolve_model
    from omni_trt.runtime.pipeline import LoadOptions

    model = resolve_model(None, None)
    prompts = benchmark_prompts(args.prompts)
    out: dict = {"model": "omni-trt/demo-z-image", "size": args.size, "steps": 8, "partial_images": 3,
                 "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}}
    grids: list = []
    maps = {}
    for kind in ("mlp", "linear"):
        rt = load_runtime(model, options=LoadOptions(preview_decoder=kind))
        maps[kind] = rt.preview
        out["size"] = args.size or f"{rt.family.defaults.width}x{rt.family.defaults.height}"
        out[kind] = {"fit": rt.preview.fit, **agreement(replace(rt, preview=Recorder(rt.preview)), prompts, grids if not grids else None, args.size)}
    w, h = preview.fit_size(rt.family, SizeLimits.of(rt.family))
    factor = int(rt.pipe.vae_scale_factor)
    maps["random_latents"] = preview.fit_linear(lambda g: rt.family.latent_layout.decode(rt.pipe, g), rt.preview.channels, h // factor, w // factor)
    out["random_latents"] = {"fit": maps["random_latents"].fit, **agreement(replace(rt, preview=maps["random_latents"]), prompts, size=args.size)}
    for kind, m in maps.items():
        out[kind]["last_preview_rmse"] = held_back_rmse(rt, m, grids)  # on the benchmark prompts' last-preview latents
    # the same previews decoded by the VAE itself: how far the prediction at the last preview's step agrees at all
    out["full_decoder"] = agreement(replace(rt, preview=None), prompts, size=args.size)
    out["full_decoder_pooled"] = agreement(replace(rt, preview=Pooled(rt)), prompts, size=args.size)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
