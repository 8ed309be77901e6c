"""Whether linear previews show the final image's colours, on the trained demo model: the last of
3 previews and the final image read back by the demo's checker (omni_trt/demo/quality.py) over
its benchmark prompts, for the map the server fits at load (the model's own latents) and, side by
side, a map fitted on random latents alone, and the full VAE decoder (`--preview-decoder full`): the
ceiling any preview decoder of the same predicted image can reach.

    python benchmarks/preview_colours.py [--prompts 30] [--out benchmarks/results/preview-colours-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def agreement(rt, prompts) -> dict:
    from omni_trt.demo.quality import read_picture
    from omni_trt.runtime.request import ImageAsk, resolve

    bg = fg = 0
    for prompt, seed in prompts:
        got: list = []
        req = resolve(rt.family, ImageAsk(prompt, size="64x64", steps=8, seed=seed, partial_images=3))
        final = rt.generate([req], on_preview=lambda *a: got.append(a)).images[0][0]
        last = max(got, key=lambda a: a[2])[3].convert("RGB").resize(final.size)
        seen, want = read_picture(np.asarray(last)), read_picture(np.asarray(final.convert("RGB")))
        bg += seen.bg == want.bg
        fg += seen.fg == want.fg
    return {"background_agrees": bg, "foreground_agrees": fg, "prompts": len(prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/preview-colours-cpu.json"))
    args = ap.parse_args()
    os.environ["OMNI_TRT_CACHE"] = tempfile.mkdtemp(prefix="omni-previews-")  # fitted here, not read from a cache
    from omni_trt.demo.quality import benchmark_prompts
    from omni_trt.models import SizeLimits
    from omni_trt.runtime import preview
    from omni_trt.runtime.loader import load_runtime, resolve_model
    from omni_trt.runtime.pipeline import LoadOptions

    rt = load_runtime(resolve_model(None, None), options=LoadOptions(preview_decoder="linear"))
    prompts = benchmark_prompts(args.prompts)
    w, h = preview.fit_size(rt.family, SizeLimits.of(rt.family))
    factor = int(rt.pipe.vae_scale_factor)
    random_only = preview.fit_linear(lambda g: rt.family.latent_layout.decode(rt.pipe, g), rt.preview.channels, h // factor, w // factor)
    out = {"model": "omni-trt/demo-z-image", "size": "64x64", "steps": 8, "partial_images": 3,
           "own_latents": {"fit": rt.preview.fit, **agreement(rt, prompts)},
           "random_latents": {"fit": random_only.fit, **agreement(replace(rt, preview=random_only), prompts)},
           # the same previews decoded by the VAE itself: how far the prediction at the last preview's step agrees at all
           "full_decoder": agreement(replace(rt, preview=None), prompts)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
