"""`--runtime torch-compile`: the PyTorch modules compiled with torch.compile (inductor).

The transformer is compiled region by region: diffusers' `compile_repeated_blocks` compiles each
of its repeated blocks (the class names in `_repeated_blocks`), which share one graph, so the
compile costs one block rather than the whole stack and runs as fast. As in vLLM-Omni the blocks
are compiled with dynamic shapes: they see token sequences whose length follows the prompt and
the image size, and static graphs would recompile on the first longer prompt. A transformer class
that declares no repeated blocks (SD3's, in diffusers 0.42) is compiled whole. The VAE's decoder
module is compiled with static shapes (they follow the image size alone).

torch.compile compiles on the first call, so load runs one warm-up call at the family's default
size (or the size asked for) with the default guidance, and the first request at that size is
not the one that waits. What it did not cover compiles on first use: a new height or width
recompiles the VAE decoder (PyTorch then makes that dim dynamic), and the first call with more
than one image recompiles both (dynamic shapes still specialise a batch of 1).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from ..models import Family
from .request import ImageAsk, edit_only_input, pipeline_kwargs, resolve

log = logging.getLogger(__name__)

KIND = "torch-compile"
# Two denoising steps: the first and a later one. Compiled graphs depend on shapes, not on how
# many steps run, so a full-length warm-up would only cost time.
WARMUP_STEPS = 2
WARMUP_PROMPT = "a photo of a red fox in the snow"


@dataclass(frozen=True)
class CompileInfo:
    """What torch-compile compiled and what its warm-up cost (for /v1/models, /health, bench)."""

    transformer: str  # how: "regional: 30 x ZImageTransformerBlock" or "whole module (...)"
    vae_decoder: str
    warmup_size: str  # WxH
    warmup_steps: int
    warmup_s: float  # compile + warm-up call, seconds

    def describe(self) -> dict[str, Any]:
        return {"transformer": self.transformer, "vae_decoder": self.vae_decoder, "warmup_size": self.warmup_size,
                "warmup_steps": self.warmup_steps, "warmup_s": round(self.warmup_s, 3)}


def compile_transformer(transformer: torch.nn.Module) -> str:
    """Regional compilation where the class names its repeated blocks, else the whole forward."""
    names = tuple(getattr(transformer, "_repeated_blocks", None) or ())
    blocks = Counter(type(m).__name__ for m in transformer.modules() if type(m).__name__ in names)
    if blocks and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(dynamic=True)
        return "regional: " + ", ".join(f"{n} x {name}" for name, n in blocks.items())
    cls = type(transformer).__name__
    log.info("%s declares no repeated blocks (_repeated_blocks): compiling the whole transformer", cls)
    # The bound forward, as an instance attribute: the stage timer wraps it later from outside,
    # so timing never lands inside a compiled graph.
    transformer.forward = torch.compile(transformer.forward, dynamic=True)
    return f"whole module ({cls} declares no repeated blocks)"


def compile_vae_decoder(vae: torch.nn.Module) -> str:
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        log.info("%s has no decoder module: its decode stays eager", type(vae).__name__)
        return "eager (no decoder module)"
    decoder.compile()
    return f"compiled ({type(decoder).__name__})"


def compile_pipeline(pipe: Any, family: Family, device: str, warmup_size: str | None = None) -> CompileInfo:
    """Compile the pipeline's transformer and VAE decoder in place, then run the warm-up call
    that compiles them (under inference_mode, as every generation runs, so the graphs' guards
    hold for requests)."""
    t0 = time.perf_counter()
    how_transformer = compile_transformer(pipe.transformer)
    how_vae = compile_vae_decoder(pipe.vae)
    req = resolve(family, ImageAsk(WARMUP_PROMPT, size=warmup_size, steps=min(WARMUP_STEPS, family.defaults.steps), seed=0),
                  image=edit_only_input(family, warmup_size))  # an edit-only family warms up with an edit
    size = f"{req.width}x{req.height}"
    log.info("torch-compile: transformer %s, VAE decoder %s; warming up at %s (%d steps)", how_transformer, how_vae, size, req.steps)
    with torch.inference_mode():
        pipe(**pipeline_kwargs([req]))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    log.info("torch-compile: compiled and warmed up in %.1f s", seconds)
    return CompileInfo(how_transformer, how_vae, size, req.steps, seconds)
