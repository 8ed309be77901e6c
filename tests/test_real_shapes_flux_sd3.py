"""Real-shape builders of Flux (FLUX.1-dev) and SD3 (SD3.5 Large), without building them full size.

The published configs are checked on the meta device (no memory): every key is a constructor
argument and the parameter counts are the published ones. The builder itself runs end to end at
full width but one layer per block stack: saved, loaded with from_pretrained, one 64x64 step
through the unmodified pipeline, and the same step again with the family's export wrapper behind
its engine stand-in (the path `omni build-engine` and the runtime take on the full-size model)."""

from __future__ import annotations

import importlib
import inspect
import json
import time
from pathlib import Path

import pytest
import torch

from omni_trt.compiler.export import relative_error
from omni_trt.models import family_by_name
from omni_trt.models.base import Point

FAMILIES = ("flux", "sd3")
# MODELS.md: FLUX.1-dev ~11.9B, SD3.5 Large ~8B transformer parameters.
PUBLISHED_PARAMS = {"flux": 11.9e9, "sd3": 8.0e9}
VAE_PARAMS = 83.8e6  # the (128, 256, 512, 512) AutoencoderKL of Flux and SD3.5, no quant convs
ONE_LAYER = {"flux": {"num_layers": 1, "num_single_layers": 1}, "sd3": {"num_layers": 1}}
TRANSFORMER_CLASS = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel"}
# Widths the reduced build must keep: (transformer inner dim, text encoder attr -> hidden size).
WIDTHS = {
    "flux": (3072, {"text_encoder": 768, "text_encoder_2": 4096}),
    "sd3": (2432, {"text_encoder": 768, "text_encoder_2": 1280, "text_encoder_3": 4096}),
}
PEAK_RSS_GB = 8.0


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _safetensors_dtypes(folder) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return dtypes


def real(family: str):
    return importlib.import_module(f"omni_trt.demo.{family}")


def on_meta(cls, config: dict):
    with torch.device("meta"):
        return cls(**config)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_declares_the_builder(family):
    from omni_trt.demo import builders

    assert builders(family)[1] is real(family).build_real_shapes


@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_config_is_published_size(family):
    import diffusers

    cls = getattr(diffusers, TRANSFORMER_CLASS[family])
    config = real(family).TRANSFORMER_CONFIG
    assert set(config) <= set(inspect.signature(cls.__init__).parameters), "a key the class does not take"
    model = on_meta(cls, config)
    for key, value in config.items():  # nothing silently dropped or renamed by the class
        got = model.config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(value) if isinstance(value, (list, tuple)) else value
        ), key
    count = n_params(model)
    print(f"{family} transformer: {count / 1e9:.3f}B parameters")
    assert abs(count / PUBLISHED_PARAMS[family] - 1) < 0.03, count
    # The export spec's static feature sizes (engine profiles) are the ones this config produces.
    spec = family_by_name(family).components["transformer"]
    point = Point(batch=1, height=1024, width=1024, text_len=family_by_name(family).text_len[1])
    shapes = spec.shapes(point)
    assert shapes["encoder_hidden_states"][-1] == config["joint_attention_dim"]
    assert shapes["pooled_projections"][-1] == config["pooled_projection_dim"]


@pytest.mark.parametrize("family", FAMILIES)
def test_vae_config_builds_on_meta(family):
    from diffusers import AutoencoderKL

    config = real(family).VAE_CONFIG
    assert set(config) <= set(inspect.signature(AutoencoderKL.__init__).parameters)
    vae = on_meta(AutoencoderKL, config)
    assert abs(n_params(vae) / VAE_PARAMS - 1) < 0.01, n_params(vae)
    assert vae.quant_conv is None and vae.post_quant_conv is None
    latent = family_by_name(family).components["vae_decoder"].shapes(Point(1, 1024, 1024, 1))["latent"]
    assert latent == (1, config["latent_channels"], 128, 128)


class TorchEngine:
    """An engine that runs a module in PyTorch: the stand-in path without ONNX or TensorRT."""

    def __init__(self, module, input_names, output_names) -> None:
        self.module, self.input_names, self.output_names = module, tuple(input_names), tuple(output_names)
        self.calls = 0

    def __call__(self, feeds):
        self.calls += 1
        with torch.no_grad():
            out = self.module(*(feeds[n] for n in self.input_names))
        return dict(zip(self.output_names, out if isinstance(out, tuple) else (out,)))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_one_layer_full_width_builds_loads_and_generates(family, tmp_path):
    from omni_trt.runtime.pipeline import EngineSwap, LoadOptions, load_pipeline

    fam, out = family_by_name(family), tmp_path / family
    t0 = time.perf_counter()
    # The build's own peak memory: a write of 5 to clear_refs resets this process's high-water
    # mark (VmHWM) to what it holds now (the rest of the session's), which is then taken off.
    Path("/proc/self/clear_refs").write_text("5")
    held = _status_kib("VmRSS")
    real(family).build_real_shapes(out, "bf16", overrides=ONE_LAYER[family])
    peak = (_status_kib("VmHWM") - held) / 2**20  # KiB -> GiB
    built = time.perf_counter() - t0

    assert list((out / "transformer").glob("*.safetensors"))
    saved = json.loads((out / "transformer" / "config.json").read_text())
    assert {k: saved[k] for k in ONE_LAYER[family]} == ONE_LAYER[family]

    t0 = time.perf_counter()
    # As `omni serve` loads it: the family detected from model_index.json.
    # fp32 compute over the bf16 files (see test_real_shapes.py: CPU bf16 convs are minutes each).
    pipe = load_pipeline(str(out), LoadOptions(device="cpu", dtype="fp32")).pipe
    loaded = time.perf_counter() - t0
    assert type(pipe).__name__ == fam.pipeline_class
    inner, encoders = WIDTHS[family]
    cfg = pipe.transformer.config
    assert cfg.num_attention_heads * cfg.attention_head_dim == inner
    for attr, hidden in encoders.items():
        enc = getattr(pipe, attr)
        assert getattr(enc.config, "hidden_size", getattr(enc.config, "d_model", None)) == hidden, attr
        assert enc.dtype == torch.float32
    assert pipe.transformer.dtype == pipe.vae.dtype == torch.float32
    assert _safetensors_dtypes(out / "transformer") == {"BF16"}

    # A short T5 window: the widths are what is under test, and 512 padded T5 tokens at full width
    # were most of this test's time on a 2-core CPU.
    kwargs = dict(prompt="a cat on a red chair", height=64, width=64, num_inference_steps=1, output_type="pt", max_sequence_length=32)

    def generate(p):
        p.set_progress_bar_config(disable=True)
        return p(generator=torch.Generator().manual_seed(0), **kwargs).images.float()

    t0 = time.perf_counter()
    want = generate(pipe)
    generated = time.perf_counter() - t0
    assert want.shape == (1, 3, 64, 64) and torch.isfinite(want).all()
    assert want.std() > 1e-3  # not a constant image: the random weights reach the output

    # The same step through the family's export wrapper behind its stand-in, loaded as the
    # runtime loads engines (stand-ins replace the modules; their weights are not read).
    engines = {}
    for name, spec in fam.components.items():
        module = getattr(pipe, spec.pipeline_attr)
        engines[name] = TorchEngine(spec.wrapper(module).eval(), spec.input_names, spec.output_names)
    configs = {attr: dict(getattr(pipe, attr).config) for attr in ("transformer", "vae")}
    standins = {attr: s.with_dtype(torch.float32) for attr, s in fam.standins(configs, engines).items()}
    got = generate(load_pipeline(str(out), LoadOptions(device="cpu", dtype="fp32"), fam, EngineSwap("torch-wrapper", standins)).pipe)
    assert {name: e.calls for name, e in engines.items()} == {"transformer": 1, "vae_decoder": 1, "vae_encoder": 0}
    # The VAE encoder (edits) at full width, through the stand-in, against the original encode.
    case = fam.components["vae_encoder"].reference_case(pipe.vae, Point(1, 64, 64, 1), torch.float32, torch.Generator().manual_seed(1))
    encoded = standins["vae"].encode(case.inputs["image"]).latent_dist
    assert relative_error(encoded.mean, case.expected["mean"]) < 1e-4 and relative_error(encoded.logvar, case.expected["logvar"]) < 1e-4
    err = relative_error(got, want)
    print(f"{family} 1-layer full width: build {built:.1f}s, load {loaded:.1f}s, 1 step {generated:.1f}s, "
          f"stand-in rel err {err:.1e}, build peak RSS {peak:.2f} GiB")
    assert err < 1e-4  # fp32 against fp32: the export gate's tolerance
    assert peak < PEAK_RSS_GB
