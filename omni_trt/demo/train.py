"""Train the demo model: a tiny Z-Image pipeline (the real diffusers classes) that draws
"a {fg} {shape} on a {bg} background" (omni_trt.demo.quality's grammar), from scratch on pictures
drawn here, on a CPU in minutes.

    python -m omni_trt.demo.train OUT [--seed 0] [--vae-steps N] [--decoder-steps N] [--dit-steps N] [--resume DIR [--new-transformer]]
                                      [--dit-lr LR] [--edge-weight W] [--caption-dropout P] [--ema DECAY] [--checkpoint-every N]
    python -m omni_trt.demo.train DIR --evaluate [--size S] [--steps N] [--guidance G] [--grid PNG]     # score a trained folder

First the AutoencoderKL learns to reconstruct the drawn pictures (its own encode/decode; a small
KL term), and its latent scale and shift are set from the latents' statistics as Z-Image's
config carries them. Then the transformer learns flow matching on those latents: noise is added
by FlowMatchEulerDiscreteScheduler.scale_noise at the scheduler's own (shifted) training sigmas
(drawn logit-normal over the schedule), and the transformer is asked for what ZImagePipeline
reads from it: at model time 1 - sigma it returns x0 - noise (the pipeline negates it into the
scheduler's velocity noise - x0); an EMA of its weights is what is saved. The text
encoder (the tiny Qwen3 of demo/z_image.py, random and frozen) only has to tell prompts apart;
the transformer learns to read it. The output is a diffusers pipeline folder
(DiffusionPipeline.from_pretrained loads it) plus DEFAULTS_FILE, the request defaults it draws
well at.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..models import DEFAULTS_FILE
from . import quality
from .autoencoder import autoencoder_kl_config
from .text import QWEN3_CHAT_TEMPLATE, qwen2_tokenizer
from .z_image import SCALING, SCHEDULER_CONFIG, SHIFT, TINY_TEXT_ENCODER_CONFIG, TINY_TRANSFORMER_CONFIG, text_encoder

SIZE = 64  # the pictures both models learn, and the demo's default size (CPU training time)
DEFAULT_STEPS = 8  # what the demo draws with by default (measured: see README)

# Four stages (x8 like the real VAE), 16 latent channels as Z-Image's transformer and export specs
# expect; the full-resolution stage stays 16 wide so large images decode as fast as the random demo's.
VAE_CONFIG: dict[str, Any] = dict(autoencoder_kl_config(SCALING, SHIFT, tiny=True), block_out_channels=(16, 16, 32, 32))
# Wider and deeper than the random tiny transformer (head_dim 32 = sum(axes_dims)), still tiny (3.7M
# parameters): at 96 wide and 3 layers (1.1M) it learnt colours and place but drew blobs; at 128 wide
# and 4 layers (1.9M) squares came out rounded and uneven (shape 0.70, a plateau in longer training).
TRANSFORMER_CONFIG: dict[str, Any] = dict(TINY_TRANSFORMER_CONFIG, dim=160, n_heads=5, n_kv_heads=5, n_layers=6, n_refiner_layers=1)


# The tokenizer's merges also learn the grammar's words, so a caption is a few tokens (one pad-to-32 block).
CORPUS = [quality.caption(p) for p in quality.all_pictures()]


@dataclass(frozen=True)
class Settings:
    """One training run. The defaults train from scratch; the committed demo came in stages (README)."""

    seed: int = 0
    vae_steps: int = 600
    decoder_steps: int = 0  # then the decoder alone (the latents the transformer learns stay as they are)
    dit_steps: int = 3000
    batch: int = 16
    latent_images: int = 4000  # drawn pictures encoded once for the transformer's training
    vae_lr: float = 2e-3
    dit_lr: float = 1e-3
    size: int = SIZE  # pictures' side: what both models learn and the folder's default size
    ema: float = 0.999  # the saved transformer is this exponential moving average of its weights
    new_transformer: bool = False  # with resume: keep its VAE and text encoder, train a new transformer
    checkpoint_every: int = 0  # write the folder (EMA weights) every this many transformer steps; 0: at the end only
    edge_weight: float = 0.0  # extra loss weight on latent cells the shape's outline crosses (see outline_weights)
    caption_dropout: float = 0.0  # share of pictures trained with the empty prompt (what classifier-free guidance subtracts)


def draw(p: quality.Picture, size: int, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 uint8 picture of `p`: one filled shape, side 20-60% of the picture's, anywhere inside."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), quality.PALETTE[p.bg])
    side = int(rng.uniform(0.2, 0.6) * size)
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    d = ImageDraw.Draw(img)
    colour = quality.PALETTE[p.fg]
    if p.shape == "circle":
        d.ellipse(box, fill=colour)
    elif p.shape == "square":
        d.rectangle(box, fill=colour)
    else:  # upright isosceles: apex at the top middle
        d.polygon([(x0 + (side - 1) / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=colour)
    return np.asarray(img)


def random_batch(n: int, size: int, rng: np.random.Generator) -> tuple[list[quality.Picture], np.ndarray]:
    """n random pictures of the grammar and their drawings (n x size x size x 3 uint8)."""
    every = quality.all_pictures()
    pics = [every[int(i)] for i in rng.integers(0, len(every), n)]
    return pics, np.stack([draw(p, size, rng) for p in pics])


def to_tensor(images: np.ndarray) -> Any:
    """uint8 NHWC -> float NCHW in [-1, 1], what AutoencoderKL reads."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def new_transformer(seed: int) -> Any:
    """A ZImageTransformer2DModel of TRANSFORMER_CONFIG with diffusers' default init (pad tokens,
    left empty by the class, get small normals)."""
    import torch
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**TRANSFORMER_CONFIG)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "pad_token" in name:
                p.normal_(0.0, 0.02)
    return transformer


def untrained(seed: int) -> Any:
    """The ZImagePipeline before training."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline

    transformer = new_transformer(seed)
    text = text_encoder(512, TINY_TEXT_ENCODER_CONFIG)
    from .weights import init_small

    init_small(text)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=AutoencoderKL(**VAE_CONFIG),
                          text_encoder=text.eval(), tokenizer=qwen2_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE, corpus=CORPUS),
                          transformer=transformer)


def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


def _schedule(opt: Any, total: int) -> Any:
    """Linear warm-up over 5% of the steps, then cosine decay to a tenth."""
    import math

    import torch

    warm = max(1, total // 20)

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (i - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_vae(vae: Any, s: Settings, rng: np.random.Generator, decoder_only: bool = False) -> list[float]:
    """Reconstruction (MSE in [-1, 1]) plus a small KL term, through AutoencoderKL's own
    encode/decode. decoder_only: the encoder stays frozen (sharper decodes of the same latents)."""
    import torch

    steps = s.decoder_steps if decoder_only else s.vae_steps
    params = [p for n, p in vae.named_parameters() if not decoder_only or n.startswith("decoder.")]
    opt = torch.optim.AdamW(params, lr=s.vae_lr, weight_decay=0.0)
    sched = _schedule(opt, steps)
    vae.train()
    losses: list[float] = []
    with _bar(steps, "decoder" if decoder_only else "vae") as bar:
        for _ in range(steps):
            x = to_tensor(random_batch(s.batch, s.size, rng)[1])
            posterior = vae.encode(x).latent_dist
            # The mean is decoded, as the transformer will produce it (sampling would bury the early,
            # small means under unit noise); the small KL term keeps the means near the unit scale.
            recon = vae.decode(posterior.mode()).sample
            loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
            _step(loss, opt, sched, losses, bar, window=20)
    vae.eval()
    return losses


def _step(loss: Any, opt: Any, schedule: Any, losses: list[float], bar: Any, window: int, clip: Any = None) -> None:
    """One optimizer step on `loss` (gradients clipped to norm 1 over `clip` when given), with the
    running mean of the last `window` losses on the progress bar."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    schedule.step()
    losses.append(loss.item())
    bar.update()
    bar.set_postfix(loss=f"{np.mean(losses[-window:]):.4f}")


def outline_weights(pics: list[quality.Picture], images: np.ndarray, factor: int) -> Any:
    """Per latent cell (N x 1 x H/factor x W/factor): 4 c (1 - c), c the share of its pixels the
    shape covers: 1 where the outline halves a cell, 0 inside and outside. The shape's outline
    (what tells a square from a circle) is a few cells; the plain loss is ruled by the rest."""
    import torch

    bg = np.array([quality.PALETTE[p.bg] for p in pics], np.uint8)[:, None, None, :]
    mask = (images != bg).any(-1).astype(np.float32)
    n, h, w = mask.shape
    cover = mask.reshape(n, h // factor, factor, w // factor, factor).mean((2, 4))
    return torch.from_numpy(4 * cover * (1 - cover)).unsqueeze(1)


def encode_dataset(pipe: Any, s: Settings, rng: np.random.Generator, rescale: bool = True) -> tuple[list[quality.Picture], Any, Any]:
    """(pictures, latent means, outline_weights) of `latent_images` drawn pictures of side s.size;
    rescale: set the VAE's scaling and shift factors so the scaled latents have unit variance and zero mean."""
    import torch

    pics, means, outlines = [], [], []
    with torch.no_grad():
        for start in range(0, s.latent_images, 64):
            p, images = random_batch(min(64, s.latent_images - start), s.size, rng)
            dist = pipe.vae.encode(to_tensor(images)).latent_dist
            pics += p
            means.append(dist.mean)
            outlines.append(outline_weights(p, images, s.size // dist.mean.shape[-1]))
    mean, outline = torch.cat(means), torch.cat(outlines)
    if rescale:
        shift = float(mean.mean())
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=float(1.0 / (mean - shift).std()))
    return pics, mean, outline


def caption_features(pipe: Any) -> dict[quality.Picture | None, Any]:
    """The frozen text encoder's features of every caption, as ZImagePipeline encodes them; under
    None the empty prompt's (the pipeline's negative prompt when guidance is on)."""
    import torch

    every = quality.all_pictures()
    with torch.no_grad():
        feats = pipe._encode_prompt([quality.caption(p) for p in every] + [""], device=torch.device("cpu"))
    return dict(zip([*every, None], feats))


def training_timesteps(sched: Any, n: int, gen: Any) -> Any:
    """n of the scheduler's own (shifted) training timesteps, their places in the schedule drawn
    logit-normal (SD3's choice for rectified flow, over the shifted sigmas as the pipeline samples
    them) instead of uniform: most weight mid-way, where the shape is decided."""
    import torch

    place = torch.sigmoid(torch.randn(n, generator=gen))  # 1 = pure noise, 0 = the picture
    return sched.timesteps[((1 - place) * (len(sched.timesteps) - 1)).round().long()]


def ema_of(model: Any, decay: float) -> Any:
    """torch's AveragedModel as an exponential moving average, its decay warming up as
    min(decay, (1 + n) / (10 + n)) so short runs are not held at the initial weights."""
    import torch

    def avg(averaged: Any, current: Any, n: Any) -> Any:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return averaged * d + current * (1.0 - d)

    return torch.optim.swa_utils.AveragedModel(model, avg_fn=avg)


def train_transformer(pipe: Any, data: tuple[list[quality.Picture], Any, Any], s: Settings, rng: np.random.Generator,
                      checkpoint: Callable[[], None] | None = None) -> list[float]:
    """Flow matching on the VAE's scaled latents with the scheduler's training timesteps (the
    squared error weighted 1 + s.edge_weight on the shape's outline; a share s.caption_dropout of
    pictures with the empty prompt); the transformer ends with its EMA weights. checkpoint: called
    every s.checkpoint_every steps with the EMA weights in place."""
    import torch

    pics, latents, outline = data
    caps = caption_features(pipe)
    cfg = pipe.vae.config
    sched = pipe.scheduler
    model = pipe.transformer
    opt = torch.optim.AdamW(model.parameters(), lr=s.dit_lr, weight_decay=0.01)
    lr = _schedule(opt, s.dit_steps)
    gen = torch.Generator().manual_seed(s.seed)
    ema = ema_of(model, s.ema)
    model.train()
    losses: list[float] = []
    with _bar(s.dit_steps, "transformer") as bar:
        for i in range(s.dit_steps):
            idx = torch.from_numpy(rng.integers(0, len(pics), s.batch))
            x0 = (latents[idx] - cfg.shift_factor) * cfg.scaling_factor
            noise = torch.randn(x0.shape, generator=gen)
            timesteps = training_timesteps(sched, s.batch, gen)
            xt = sched.scale_noise(x0, timesteps, noise)
            asked = [pics[int(i)] for i in idx]
            if s.caption_dropout > 0:  # drawn only then, so runs without it keep their random streams
                asked = [None if drop else p for p, drop in zip(asked, torch.rand(s.batch, generator=gen) < s.caption_dropout)]
            out = model(list(xt.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, [caps[p] for p in asked], return_dict=False)[0]
            weight = 1 + s.edge_weight * outline[idx]
            loss = (weight * (torch.stack(out).squeeze(2) - (x0 - noise)) ** 2).mean()
            _step(loss, opt, lr, losses, bar, window=50, clip=model.parameters())
            ema.update_parameters(model)
            if checkpoint is not None and s.checkpoint_every and (i + 1) % s.checkpoint_every == 0 and i + 1 < s.dit_steps:
                _with_weights(model, ema.module.state_dict(), checkpoint)
    model.load_state_dict(ema.module.state_dict())
    model.eval()
    return losses


def _with_weights(model: Any, weights: dict[str, Any], call: Callable[[], None]) -> None:
    """call() with `weights` loaded into model, then the model's own weights back."""
    import copy

    own = copy.deepcopy(model.state_dict())
    model.load_state_dict(weights)
    model.eval()
    try:
        call()
    finally:
        model.load_state_dict(own)
        model.train()


def generate(pipe: Any, prompts: list[tuple[str, int]], size: int = SIZE, steps: int = DEFAULT_STEPS, batch: int = 10,
             guidance: float = 0.0) -> list[np.ndarray]:
    """Images (HxWx3 uint8) of (prompt, seed) pairs, through ZImagePipeline's own call (guidance > 0:
    classifier-free guidance against the empty prompt, twice the transformer's work)."""
    import torch

    images: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            gens = [torch.Generator().manual_seed(seed) for _, seed in chunk]
            out = pipe([p for p, _ in chunk], height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens, output_type="np").images
            images += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]
    return images


def measure(pipe: Any, count: int = 30, size: int = SIZE, steps: int = DEFAULT_STEPS) -> quality.Score:
    """The checker's accuracy over `count` fixed prompts and seeds (quality.benchmark_prompts)."""
    prompts = quality.benchmark_prompts(count)
    images = generate(pipe, prompts, size, steps)
    return quality.score([quality.parse_caption(p) for p, _ in prompts], [quality.read_picture(im) for im in images])


def save_grid(images: list[np.ndarray], path: Path, columns: int = 10) -> None:
    """The pictures side by side in rows of `columns` (a PNG)."""
    from PIL import Image

    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 128, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = im
    Image.fromarray(grid).save(path)


def evaluate(model: Path, grid: Path | None = None, steps: int | None = None, size: int | None = None,
             guidance: float | None = None) -> quality.Score:
    """Load a trained folder with DiffusionPipeline.from_pretrained, score it over the fixed
    prompts and seeds at the request defaults it carries (DEFAULTS_FILE; SIZE and DEFAULT_STEPS
    without one) where steps, size or guidance is None; grid: also write their pictures there."""
    from diffusers import DiffusionPipeline

    path = Path(model) / DEFAULTS_FILE
    carried = json.loads(path.read_text()) if path.is_file() else {}
    pipe = DiffusionPipeline.from_pretrained(model)
    prompts = quality.benchmark_prompts()
    images = generate(pipe, prompts, size or carried.get("width", SIZE), steps or carried.get("steps", DEFAULT_STEPS),
                      guidance=carried.get("guidance_scale", 0.0) if guidance is None else guidance)
    if grid is not None:
        save_grid(images, grid)
    return quality.score([quality.parse_caption(p) for p, _ in prompts], [quality.read_picture(im) for im in images])


def write_defaults(out: Path, size: int = SIZE, steps: int = DEFAULT_STEPS, guidance: float = 0.0) -> None:
    """The request defaults the pipeline folder carries: the size it learnt, the steps (and guidance) it draws well with."""
    (out / DEFAULTS_FILE).write_text(json.dumps({"steps": steps, "width": size, "height": size, "guidance_scale": guidance}, indent=2) + "\n")


def train(out: Path, s: Settings = Settings(), log: Callable[[str], None] = print, resume: Path | None = None) -> dict[str, Any]:
    """Train and write the pipeline folder; returns what was measured (losses, times, score).
    resume: go on from that trained folder's weights instead of from scratch."""
    import torch

    rng = np.random.default_rng(s.seed)
    t0 = time.monotonic()
    if resume is None:
        pipe = untrained(s.seed)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(resume)
        if s.new_transformer:
            pipe.register_modules(transformer=new_transformer(s.seed))
    vae_losses = train_vae(pipe.vae, s, rng) or [float("nan")]
    data = encode_dataset(pipe, s, rng, rescale=resume is None or s.vae_steps > 0)
    vae_losses += train_vae(pipe.vae, s, rng, decoder_only=True)
    t1 = time.monotonic()
    out = Path(out)

    def save() -> None:
        pipe.save_pretrained(out)
        write_defaults(out, s.size)

    dit_losses = train_transformer(pipe, data, s, rng, checkpoint=save) or [float("nan")]
    t2 = time.monotonic()
    save()
    with torch.no_grad():
        score = measure(pipe, size=s.size)
    report = {
        "settings": s.__dict__, "threads": torch.get_num_threads(), "vae_seconds": round(t1 - t0, 1),
        "transformer_seconds": round(t2 - t1, 1), "vae_loss": [vae_losses[0], float(np.mean(vae_losses[-50:]))],
        "transformer_loss": [dit_losses[0], float(np.mean(dit_losses[-100:]))], "score": score.__dict__,
    }
    log(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> int:
    import torch

    d = Settings()
    p = argparse.ArgumentParser(prog="python -m omni_trt.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (a diffusers pipeline folder)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vae-steps", type=int, default=d.vae_steps, help=f"VAE optimizer steps (default: {d.vae_steps})")
    p.add_argument("--decoder-steps", type=int, default=d.decoder_steps, help=f"then VAE decoder-only steps (default: {d.decoder_steps})")
    p.add_argument("--resume", type=Path, default=None, help="start from this trained pipeline folder instead of from scratch")
    p.add_argument("--dit-steps", type=int, default=d.dit_steps, help=f"transformer optimizer steps (default: {d.dit_steps})")
    p.add_argument("--dit-lr", type=float, default=d.dit_lr, help=f"transformer peak learning rate (default: {d.dit_lr})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"pictures per step (default: {d.batch})")
    p.add_argument("--latent-images", type=int, default=d.latent_images, help=f"pictures encoded for the transformer (default: {d.latent_images})")
    p.add_argument("--new-transformer", action="store_true", help="with --resume: keep its VAE and text encoder, train a new transformer")
    p.add_argument("--edge-weight", type=float, default=d.edge_weight, help="extra loss weight on latent cells the shape's outline crosses (default: 0)")
    p.add_argument("--ema", type=float, default=d.ema, help=f"EMA decay of the saved transformer weights (default: {d.ema})")
    p.add_argument("--caption-dropout", type=float, default=d.caption_dropout,
                   help="share of pictures trained with the empty prompt, so guidance (--guidance) has one to subtract (default: 0)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="also write OUT every N transformer steps (EMA weights), to score a long run as it goes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1: small kernels gain little from more on a shared machine)")
    p.add_argument("--evaluate", action="store_true", help="train nothing: score the pipeline in OUT over the fixed prompts and seeds")
    p.add_argument("--steps", type=int, default=None, help="--evaluate: inference steps (default: the folder's own default)")
    p.add_argument("--size", type=int, default=None, help=f"the pictures' side: trained on and the folder's default size (default: {d.size}), "
                   "or with --evaluate scored at (default: the folder's own default)")
    p.add_argument("--guidance", type=float, default=None, help="--evaluate: guidance scale (default: the folder's own default)")
    p.add_argument("--grid", type=Path, default=None, help="--evaluate: also write the pictures as one PNG here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        print(json.dumps(evaluate(Path(args.out), args.grid, args.steps, args.size, args.guidance).__dict__))
        return 0
    train(Path(args.out), Settings(args.seed, args.vae_steps, args.decoder_steps, args.dit_steps, args.batch, args.latent_images,
                                   dit_lr=args.dit_lr, size=args.size or d.size, ema=args.ema, edge_weight=args.edge_weight, new_transformer=args.new_transformer,
                                   checkpoint_every=args.checkpoint_every, caption_dropout=args.caption_dropout), resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
