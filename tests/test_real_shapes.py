"""Real-shape builders of Z-Image-Turbo and Qwen-Image (random weights, published architectures).

The full-size configs are checked on the meta device (parameter counts and block structure, no
memory); the builder itself runs end to end at FULL width with one transformer layer: saved in
bf16 safetensors, loaded with DiffusionPipeline.from_pretrained, a 64x64 generation, and the
family's export wrappers and stand-ins on it give the same images as the original modules.

The comparison runs in fp32 (the bf16 weights upcast on load): CPU bf16 convolutions are a
reference kernel on CPUs without native bf16 (minutes per VAE decode), and two fp32 paths are
compared against fp32's own bound, which no CPU's kernel choice can break.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping

import diffusers
import numpy as np
import pytest
import torch

from omni_trt.compiler.export import relative_error
from omni_trt.demo import builders
from omni_trt.demo import qwen_image as qwen_real
from omni_trt.demo import z_image as z_real
from omni_trt.demo.weights import random_model
from omni_trt.models import family_by_name
from omni_trt.models.base import COMPONENTS, ComponentSpec, Point

# name -> (real module, transformer class, parameters MODELS.md states, one-layer overrides, steps)
FAMILIES: dict[str, tuple[Any, str, float, dict[str, int], int]] = {
    "z-image": (z_real, "ZImageTransformer2DModel", 6.0e9, {"n_layers": 1, "n_refiner_layers": 1}, 1),
    # Two steps: at one step the shift_terminal stretch of Qwen-Image's scheduler divides by zero.
    "qwen-image": (qwen_real, "QwenImageTransformer2DModel", 20.4e9, {"num_layers": 1}, 2),
}
# Two fp32 paths through the same weights, pixels on 0..1: the export gate's fp32 tolerance.
FP32_BOUND = 1e-4
# Config keys where the published checkpoint differs from the diffusers class defaults.
DIFFERS_FROM_CLASS = {"z-image": {"axes_lens"}, "qwen-image": set()}


def _plain(v: Any) -> Any:
    """Tuples and lists compare equal (config.json stores both as lists)."""
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _on_meta(cls: Any, config: Mapping[str, Any]) -> Any:
    with torch.device("meta"):
        return cls(**config)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_config(cls: Any, config: Mapping[str, Any], differs: set[str] | None) -> Any:
    """Every key is a constructor argument (none silently ignored), the built model's config
    holds them, and only `differs` departs from the class defaults (None: not compared)."""
    params = inspect.signature(cls.__init__).parameters
    assert set(config) <= set(params), set(config) - set(params)
    if differs is not None:
        changed = {k for k, v in config.items() if _plain(params[k].default) != _plain(v)}
        assert changed == differs
    model = _on_meta(cls, config)
    assert {k: _plain(model.config[k]) for k in config} == {k: _plain(v) for k, v in config.items()}
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_transformer_config_is_the_published_model(name):
    real, cls_name, published, _, _ = FAMILIES[name]
    model = _check_config(getattr(diffusers, cls_name), real.TRANSFORMER_CONFIG, DIFFERS_FROM_CLASS[name])
    count = _count(model)
    assert abs(count / published - 1) < 0.03, f"{count / 1e9:.3f}B vs about {published / 1e9}B"
    # the family's builder is this one (what `omni demo-model --real-shapes` calls)
    assert builders(name)[1] is real.build_real_shapes


def test_z_image_vae_is_the_flux_autoencoder():
    # AutoencoderKL's class defaults are SD 1.x's one-block VAE: nothing to compare with.
    vae = _check_config(diffusers.AutoencoderKL, z_real.VAE_CONFIG, None)
    assert abs(_count(vae) / 83.8e6 - 1) < 0.01  # FLUX.1 / Z-Image vae: 83.8M
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert [b.resnets[0].out_channels for b in vae.encoder.down_blocks] == [128, 256, 512, 512]
    assert [len(b.resnets) for b in vae.encoder.down_blocks] == [2, 2, 2, 2]
    assert [b.downsamplers is not None for b in vae.encoder.down_blocks] == [True, True, True, False]  # x8
    assert [len(b.resnets) for b in vae.decoder.up_blocks] == [3, 3, 3, 3]
    assert vae.encoder.conv_out.out_channels == 32  # mean and logvar of 16 latent channels
    assert vae.encoder.mid_block.attentions[0] is not None
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)


def test_qwen_image_vae_is_the_class_default():
    vae = _check_config(diffusers.AutoencoderKLQwenImage, qwen_real.VAE_CONFIG, set())
    assert abs(_count(vae) / 126.9e6 - 1) < 0.01  # the Wan 2.1 VAE: 126.9M
    blocks = [type(b).__name__ for b in vae.encoder.down_blocks]
    assert blocks.count("QwenImageResidualBlock") == 8  # 4 stages x 2 res blocks
    modes = [b.mode for b in vae.encoder.down_blocks if type(b).__name__ == "QwenImageResample"]
    assert modes == ["downsample2d", "downsample3d", "downsample3d"]  # x8 in space
    assert [len(b.resnets) for b in vae.decoder.up_blocks] == [3, 3, 3, 3]
    assert vae.encoder.conv_out.in_channels == 96 * 4 and vae.encoder.conv_out.out_channels == 32


def test_text_encoders_have_the_transformers_text_width():
    from transformers import Qwen2_5_VLConfig, Qwen3Config

    z = Qwen3Config(vocab_size=512, **z_real.TEXT_ENCODER_CONFIG)
    assert z.hidden_size == z_real.TRANSFORMER_CONFIG["cap_feat_dim"] == 2560
    assert (z.num_attention_heads, z.num_key_value_heads, z.head_dim) == (32, 8, 128)  # Qwen3-4B
    q = Qwen2_5_VLConfig(text_config=dict(qwen_real.TEXT_CONFIG, vocab_size=512)).text_config
    assert q.hidden_size == qwen_real.TRANSFORMER_CONFIG["joint_attention_dim"] == 3584
    assert q.hidden_size // q.num_attention_heads == 128  # Qwen2.5-VL-7B: 28 x 128
    assert z.num_hidden_layers == q.num_hidden_layers == 1


def test_random_model_sets_every_parameter_in_the_target_dtype():
    """Meta-built parameters get storage and values; tensors the constructor computes (Qwen's
    RoPE tables) stay real, so the model runs without a save/load round trip."""
    model = random_model(
        diffusers.QwenImageTransformer2DModel,
        # one narrow layer; head_dim stays 128 for the RoPE axes (16, 56, 56)
        dict(qwen_real.TRANSFORMER_CONFIG, num_layers=1, num_attention_heads=2, joint_attention_dim=32),
        torch.bfloat16,
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" and p.isfinite().all() for p in model.parameters())
    assert model.pos_embed.pos_freqs.device.type == "cpu"
    w = model.transformer_blocks[0].attn.to_q.weight.float()
    assert abs(w.std().item() - 0.02) < 1e-3
    assert model.transformer_blocks[0].attn.norm_q.weight.eq(1).all()
    assert model.transformer_blocks[0].attn.to_q.bias.eq(0).all()
    with torch.no_grad():
        out = model(
            hidden_states=torch.randn(1, 16, 64, dtype=torch.bfloat16),
            encoder_hidden_states=torch.randn(1, 5, 32, dtype=torch.bfloat16),
            encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.bool),
            timestep=torch.tensor([0.5]),
            img_shapes=[[(1, 4, 4)]],
            return_dict=False,
        )[0]
    assert out.shape == (1, 16, 64) and out.isfinite().all()


class TorchEngine:
    """A component's export wrapper behind the Engine interface (the stand-in without ONNX)."""

    def __init__(self, module: torch.nn.Module, spec: ComponentSpec) -> None:
        self.module, self.input_names, self.output_names = module, spec.input_names, spec.output_names

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = self.module(*(feeds[n] for n in self.input_names))
        return dict(zip(self.output_names, out if isinstance(out, tuple) else (out,)))


def _safetensors_dtypes(folder: Path) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return dtypes


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_builder_end_to_end_at_full_width_one_layer(name, tmp_path):
    real, _, _, overrides, steps = FAMILIES[name]
    family = family_by_name(name)
    real.build_real_shapes(tmp_path, "bf16", overrides=overrides)
    assert _safetensors_dtypes(tmp_path / "transformer") == {"BF16"}
    assert _safetensors_dtypes(tmp_path / "vae") == {"BF16"}

    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == family.pipeline_class
    config = {**real.TRANSFORMER_CONFIG, **overrides}
    assert {k: _plain(pipe.transformer.config[k]) for k in config} == {k: _plain(v) for k, v in config.items()}
    assert pipe.transformer.dtype == torch.float32
    # every parameter was set (meta-built storage starts uninitialised; Z-Image's pad tokens too)
    assert all(p.isfinite().all() for p in pipe.transformer.parameters())

    def generate(prompt: str = "a photo of a cat sitting on a red chair") -> np.ndarray:
        return pipe(
            prompt,
            height=64,
            width=64,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    want = generate()
    assert want.shape == (1, 64, 64, 3) and np.isfinite(want).all() and want.std() > 1e-3

    # The family's specs (the real feature dims) describe this model, and its export wrappers
    # behind the stand-ins reproduce the original modules inside the unmodified pipeline.
    point = Point(batch=1, height=64, width=64, text_len=32)
    engines, cases = {}, {}
    for component in COMPONENTS:
        spec = family.components[component]
        module = getattr(pipe, spec.pipeline_attr)
        cases[component] = spec.reference_case(module, point, torch.float32, torch.Generator().manual_seed(1))
        assert {k: tuple(v.shape) for k, v in cases[component].inputs.items()} == spec.shapes(point)
        engines[component] = TorchEngine(spec.wrapper(module).eval(), spec)
    configs = {attr: dict(getattr(pipe, attr).config) for attr in ("transformer", "vae")}
    for attr, standin in family.standins(configs, engines).items():
        setattr(pipe, attr, standin.with_dtype(torch.float32))
    # The VAE encoder (edits) at full width: the single-frame rewrite equals the original encode.
    encoded = pipe.vae.encode(cases["vae_encoder"].inputs["image"]).latent_dist
    for name, got in (("mean", encoded.mean), ("logvar", encoded.logvar)):
        assert relative_error(got, cases["vae_encoder"].expected[name]) < FP32_BOUND, name
    got = generate()
    assert np.abs(got - want).max() < FP32_BOUND
    # Only meaningful if the prompt reaches the pixels through the text encoder and transformer.
    assert np.abs(generate("a bowl of fruit") - got).max() > 1e-3
