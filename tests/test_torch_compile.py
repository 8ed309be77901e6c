"""--runtime torch-compile: the transformer's repeated blocks and the VAE decoder compiled with
inductor and warmed up at load; its images are the eager runtime's, through the HTTP API.

Sizes stay tiny (64x64, 2 steps) so inductor's compile stays short on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from omni_trt.cli import main
from omni_trt.errors import UsageError
from omni_trt.models import FAMILIES
from omni_trt.runtime.compiled import compile_transformer
from omni_trt.runtime.loader import load_runtime
from omni_trt.runtime.pipeline import LoadOptions, load_pipeline
from omni_trt.runtime.request import ImageAsk, resolve
from serving import images, live_server


def test_torch_compile_serves_the_eager_images_over_http(tiny_dir):
    model = str(tiny_dir("z-image"))
    eager = load_pipeline(model)
    load = lambda: load_runtime(model, None, "torch-compile", LoadOptions(warmup_size="64x64"))  # noqa: E731
    with live_server(load, served_model_name="zi") as live, live.client() as c:
        health = c.get("/health").json()
        card = c.get("/v1/models").json()["data"][0]
        assert health["runtime"] == card["runtime"] == "torch-compile"
        compiled = card["compile"]
        assert compiled["transformer"].startswith("regional: ") and "ZImageTransformerBlock" in compiled["transformer"], compiled
        assert compiled["vae_decoder"].startswith("compiled") and compiled["warmup_size"] == "64x64" and compiled["warmup_s"] > 0
        graphs = counters["stats"]["unique_graphs"]
        # Prompts of other lengths than the warm-up's: the blocks' dynamic shapes cover them.
        for seed, prompt in ((3, "a small red house by a lake"), (4, "x")):
            body = {"prompt": prompt, "size": "64x64", "num_inference_steps": 2, "seed": seed}
            got = images(c.post("/v1/images/generations", json=body))
            want = eager.generate([resolve(eager.family, ImageAsk(prompt, size="64x64", steps=2, seed=seed))]).images[0]
            assert len(got) == len(want) == 1
            gap = np.abs(got[0] - np.asarray(want[0], dtype=float)).mean()
            assert gap < 1.0, f"mean pixel gap {gap:.3f} of 255 between torch-compile and eager"
        assert counters["stats"]["unique_graphs"] == graphs, "a request at the warm-up size compiled again: the warm-up missed it"
    torch._dynamo.reset()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_transformer_is_compiled_by_its_repeated_blocks_or_whole(family, tiny_pipeline):
    # torch.compile is lazy: nothing compiles until a call, so this only checks what gets wrapped.
    transformer = tiny_pipeline(family).transformer
    blocks = [m for m in transformer.modules() if type(m).__name__ in (getattr(transformer, "_repeated_blocks", None) or ())]
    how = compile_transformer(transformer)
    if blocks:
        assert how.startswith("regional: ") and sum(int(part.split(" x ")[0]) for part in how[len("regional: "):].split(", ")) == len(blocks)
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    else:
        assert how.startswith("whole module") and "forward" in vars(transformer), how
    torch._dynamo.reset()


def test_torch_compile_refuses_an_engine_dir(tmp_path, capsys):
    with pytest.raises(UsageError, match="runs no engines: drop --engine-dir"):
        load_runtime(None, tmp_path, "torch-compile")
    # The CLI refuses before it listens, with the usage exit code.
    assert main(["serve", "--engine-dir", str(tmp_path), "--runtime", "torch-compile", "--port", "0"]) == 2
    assert "drop --engine-dir" in capsys.readouterr().err
