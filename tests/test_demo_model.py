"""The embedded demo model draws what it is asked: the checker reads drawn pictures right, the
committed model meets its targets through the real loading code (torch and ONNX Runtime
engines), the training command still learns, and the model's own defaults reach the runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omni_trt.demo import DEMO_FAMILY, DEMO_NAME, TRAINED_DIR, demo_source, ensure_demo_model, quality, train


# ---- the checker, on drawn pictures (the ground truth) ----


@pytest.mark.parametrize("size", [64, 128, 256])
def test_the_checker_reads_drawn_pictures_right(size):
    rng = np.random.default_rng(size)
    pics, images = train.random_batch(150, size, rng)
    seen = [quality.read_picture(im) for im in images]
    assert seen == pics


def test_the_checker_sees_no_shape_on_a_flat_picture_and_reads_colours_by_nearness():
    flat = np.full((64, 64, 3), quality.PALETTE["blue"], np.uint8)
    assert quality.read_picture(flat) == quality.Picture(None, None, "blue")
    noisy = np.clip(flat.astype(int) + np.random.default_rng(0).integers(-30, 31, flat.shape), 0, 255).astype(np.uint8)
    assert quality.read_picture(noisy).bg == "blue"
    assert quality.nearest_colour((200, 60, 50)) == "red"
    assert [quality.nearest_shape(f) for f in (0.5, 0.78, 0.97)] == ["triangle", "circle", "square"]


def test_captions_parse_only_in_the_grammar():
    assert quality.parse_caption("a red circle on a blue background") == quality.Picture("red", "circle", "blue")
    assert quality.parse_caption(" A Red circle on a blue background ") == quality.Picture("red", "circle", "blue")
    for text in ("a red circle on a red background", "a pink circle on a blue background", "a red star on a blue background",
                 "a dragon over Vermont"):
        assert quality.parse_caption(text) is None, text
    assert len(quality.all_pictures()) == 90
    prompts = quality.benchmark_prompts(30)
    asked = [quality.parse_caption(p) for p, _ in prompts]
    assert len(set(prompts)) == 30 and None not in asked
    assert {a.shape for a in asked} == set(quality.SHAPES) and {a.fg for a in asked} | {a.bg for a in asked} == set(quality.PALETTE)


def test_score_counts_each_part():
    a = [quality.Picture("red", "circle", "blue"), quality.Picture("green", "square", "white")]
    s = quality.score(a, [quality.Picture("red", "square", "blue"), quality.Picture(None, None, "white")])
    assert (s.n, s.fg, s.bg, s.shape) == (2, 0.5, 1.0, 0.0)
    assert not s.meets()


# ---- the committed model, through the real loading code ----


def _score(rt) -> quality.Score:
    """The checker over the 30 fixed prompts and seeds at the runtime's defaults (its own size and steps)."""
    from omni_trt.runtime.request import ImageAsk, resolve

    prompts = quality.benchmark_prompts(30)
    reqs = [resolve(rt.family, ImageAsk(p, seed=seed), limits=rt.limits) for p, seed in prompts]
    images = []
    for start in range(0, len(reqs), 10):
        images += [im for per in rt.generate(reqs[start:start + 10]).images for im in per]
    return quality.score([quality.parse_caption(p) for p, _ in prompts], [quality.read_picture(np.asarray(im.convert("RGB"))) for im in images])


@pytest.fixture(scope="module")
def demo_runtime():
    from omni_trt.runtime.loader import load_runtime, resolve_model

    return load_runtime(resolve_model(None))


def test_the_demo_model_is_the_trained_one_with_its_own_defaults(demo_runtime, tiny_dir):
    from omni_trt.runtime.loader import DEFAULTS_FILE, resolve_model

    carried = json.loads((TRAINED_DIR / DEFAULTS_FILE).read_text())
    ref = resolve_model(None)
    assert ensure_demo_model() == TRAINED_DIR and ref.name == DEMO_NAME and ref.family_name == DEMO_FAMILY
    assert resolve_model(DEMO_NAME) == ref, "the demo's served name is the demo, never a hub lookup (omni serve NAME)"
    d = demo_runtime.family.defaults
    assert (d.width, d.height, d.steps) == (carried["width"], carried["height"], carried["steps"])
    # The family's own defaults (what Z-Image-Turbo serves with) are untouched: a folder without the file keeps them.
    plain = resolve_model(str(tiny_dir("z-image"))).family.defaults
    assert (plain.width, plain.height, plain.steps) == (1024, 1024, 9)
    assert demo_source(None) == demo_source(DEMO_NAME) == str(TRAINED_DIR) and demo_source("org/name") == "org/name"


@pytest.fixture(scope="module")
def demo_score(demo_runtime) -> quality.Score:
    return _score(demo_runtime)


def test_the_committed_demo_model_draws_the_colours_it_is_asked(demo_score):
    """What the committed model reaches (README: 30 fixed prompts and seeds at its defaults, 128x128,
    8 steps): background 1.0, foreground 1.0; chance is 1/6."""
    assert demo_score.bg >= 0.9 and demo_score.fg >= 0.9, demo_score


def test_the_committed_demo_model_meets_the_targets(demo_score):
    """Issue 20's targets: colours >= 0.9 and shape >= 0.8 over the 30 fixed prompts (README: 1.0,
    1.0 and 0.87; on 60 other prompts and seeds 0.92)."""
    assert demo_score.meets(colour=0.9, shape=0.8), demo_score


def test_a_bad_defaults_file_is_refused_naming_it(tmp_path, tiny_dir):
    import shutil

    from omni_trt.errors import UsageError
    from omni_trt.runtime.loader import DEFAULTS_FILE, resolve_model

    model = tmp_path / "m"
    shutil.copytree(tiny_dir("z-image"), model)
    (model / DEFAULTS_FILE).write_text(json.dumps({"steps": 3, "width": 128, "height": 96}))
    d = resolve_model(str(model)).family.defaults
    assert (d.steps, d.width, d.height, d.guidance_scale) == (3, 128, 96, 0.0)
    (model / DEFAULTS_FILE).write_text(json.dumps({"stepz": 3}))
    with pytest.raises(UsageError, match=DEFAULTS_FILE):
        resolve_model(str(model))


# ---- the training command still learns (a short run; not timed) ----


def _one_thread(run):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def test_a_short_vae_run_from_scratch_lowers_its_loss():
    losses = _one_thread(lambda: train.train_vae(train.untrained(0).vae, train.Settings(vae_steps=40, batch=8, vae_lr=3e-3),
                                                 np.random.default_rng(0)))
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses


def test_a_short_transformer_run_from_scratch_lowers_the_loss_and_learns_colours(tmp_path):
    """A new transformer (--new-transformer) on the committed VAE's latents: 300 steps."""
    short = train.Settings(vae_steps=0, dit_steps=300, batch=8, latent_images=128, dit_lr=2e-3, new_transformer=True)
    report = _one_thread(lambda: train.train(tmp_path / "demo", short, log=lambda _: None, resume=TRAINED_DIR))
    first, last = report["transformer_loss"]
    assert last < 0.5 * first, report
    # Chance is 1/6; this run measured 0.97 for the background (the first thing it learns) and 0.4
    # for the foreground. The shape needs the full run.
    assert report["score"]["bg"] > 0.5 and report["score"]["fg"] > 1.5 / 6, report
    assert (tmp_path / "demo" / "model_index.json").is_file()
