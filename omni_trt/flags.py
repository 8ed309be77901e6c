"""Command-line flags more than one command takes (serve, generate, bench, calibrate-cache)."""

from __future__ import annotations

import argparse


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """The step cache's flags (serve, generate, bench, calibrate-cache)."""
    from .runtime.stepcache import BACKENDS, DEFAULT_MAX_SKIP, DEFAULT_RETENTION, DEFAULT_THRESHOLD

    g = p.add_argument_group("step cache", "MagCache around the whole transformer (torch, torch-compile, onnxruntime, tensorrt): "
                             "a step whose output is predicted to change little reuses the last one, scaled, instead of calling "
                             "the transformer (README: Step cache)")
    g.add_argument("--cache-backend", choices=BACKENDS, default="none", help=(
        "none (every step calls the transformer) or mag_cache (ratios from `omni calibrate-cache`, else calibrated at load "
        "at the default size and steps, a few uncached generations, and kept under $OMNI_TRT_CACHE/step-cache) (default: none)"))
    g.add_argument("--cache-config", default=None, metavar="JSON", help=(
        f"vLLM-Omni's mag_cache keys: mag_threshold (accumulated error allowed, 0..2; 0 reuses nothing; default "
        f"{DEFAULT_THRESHOLD}), mag_max_skip_steps (most steps reused in a row, default {DEFAULT_MAX_SKIP}), "
        f"mag_retention_ratio (the share of the steps run always computed first, default {DEFAULT_RETENTION}), and "
        "optionally mag_ratios (one per step: used instead of a calibration)"))
