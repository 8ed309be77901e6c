"""Z-Image-Turbo's published architectures with random weights, for GPU benchmarks offline.

The transformer (~6.15B parameters) and the VAE are the real Tongyi-MAI/Z-Image-Turbo configs;
the text encoder is ONE Qwen3-4B layer (hidden 2560 = the transformer's cap_feat_dim) over the
tiny tokenizer, since the benchmarks time the transformer and the VAE, not the prompt encoder.
Speed does not depend on weight values, so the weights are small random normals.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..tiny_text import QWEN3_CHAT_TEMPLATE, qwen2_tokenizer
from ..tiny_weights import init_small

if TYPE_CHECKING:
    import torch

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# Tongyi-MAI/Z-Image-Turbo transformer/config.json. Differs from the diffusers class defaults
# only in axes_lens (published [1536, 512, 512], class default [1024, 512, 512]); MODELS.md and
# the checkpoint win. axes_lens sizes the RoPE tables (no parameters).
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)

# Z-Image-Turbo vae/config.json: the FLUX.1 AutoencoderKL (16 latent channels, no quant convs).
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

# Z-Image-Turbo scheduler/config.json: static shift 3 (9 steps = 8 transformer passes).
SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

# Qwen3-4B's per-layer shapes (the real text encoder has 36 such layers); one layer is kept.
# The pipeline reads hidden_states[-2], which with one layer is the embedding output: the
# width (what the transformer sees) is right, the encoder's cost is not the real one.
TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=1,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=True,
)


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {name!r}")
    return getattr(torch, DTYPES[name])


@contextlib.contextmanager
def default_dtype(dtype: "torch.dtype") -> Iterator[None]:
    """Modules built inside get their parameters in `dtype` directly (no float32 copy, and no
    ModelMixin.to, which warns about keep-in-fp32 modules on every cast)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def parameters_on_meta(dtype: "torch.dtype") -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device in `dtype` (floating ones).

    Only parameters: tensors a constructor computes as plain attributes (QwenEmbedRope's
    pos_freqs) or buffers stay real, so the model works once its parameters are given storage;
    under torch.device("meta") those would be meta too and nothing would recompute them. Each
    parameter is created on the CPU uninitialised and moved right away (its init runs on meta),
    so at most one layer's worth is ever allocated here.
    """
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            dt = dtype if param.is_floating_point() else param.dtype
            param = torch.nn.Parameter(param.to(device="meta", dtype=dt), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def init_random(model: "torch.nn.Module", std: float = 0.02, seed: int = 0) -> None:
    """Weight matrices and pad tokens normal(0, std) as in init_small; other 1-D weights (norm
    scales) one; biases zero: every parameter is set, none is left as uninitialised memory.

    CPU normal_ runs on one core (~0.2 G values/s: 100 s for 20B), so parameters are spread over
    threads (torch releases the GIL), each with its own generator: deterministic for a seed
    on a given number of cores.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch

    workers = max(1, min(16, os.cpu_count() or 1))
    shares: list[list[tuple[str, torch.nn.Parameter]]] = [[] for _ in range(workers)]
    for i, item in enumerate(model.named_parameters()):
        shares[i % workers].append(item)

    def fill(k: int) -> None:
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        with torch.no_grad():
            for name, p in shares[k]:
                if p.ndim >= 2 or "pad_token" in name:
                    p.normal_(0.0, std, generator=gen)
                elif name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, range(workers)))


def random_model(cls: Any, config: Mapping[str, Any], dtype: "torch.dtype", std: float = 0.02) -> Any:
    """cls(**config) with random weights, allocated once in `dtype`.

    The parameters are built on the meta device (no memory, no default init pass), then given
    uninitialised CPU storage: a 20B model never exists in float32 or twice. Every parameter is
    then set by init_random.
    """
    import torch

    with parameters_on_meta(dtype):
        model = cls(**config)
    with torch.no_grad():
        storage: dict[int, torch.nn.Parameter] = {}  # keeps tied parameters tied
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None and p.device.type == "meta":
                    if id(p) not in storage:
                        storage[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
                    module._parameters[key] = storage[id(p)]
    init_random(model, std)
    return model.eval()


def text_encoder(vocab_size: int, dtype: "torch.dtype") -> Any:
    """Qwen3Model with one real-width layer (~100M parameters: built normally, then cast)."""
    from transformers import Qwen3Config, Qwen3Model

    model = Qwen3Model(Qwen3Config(vocab_size=vocab_size, **TEXT_ENCODER_CONFIG))
    init_small(model)
    return model.to(dtype).eval()


def build_real_shapes(out_dir: Path, dtype: str = "bf16", *, overrides: Mapping[str, Any] | None = None) -> None:
    """Write a ZImagePipeline with the published transformer and VAE, random weights, in `dtype`.

    overrides: merged into TRANSFORMER_CONFIG (tests build full width at one layer with
    {"n_layers": 1, "n_refiner_layers": 1}). Peak RAM is about the transformer in `dtype`
    (12.3 GB in bf16) plus one 5 GB shard while saving; the folder takes about 12.7 GB in bf16.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    dt = torch_dtype(dtype)
    torch.manual_seed(0)
    tokenizer = qwen2_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE)
    # The VAE (84M) keeps diffusers' default init: init_small would shrink every conv and decode
    # flat grey, and the default init is known to stay finite (the tiny pipelines keep it too).
    with default_dtype(dt):
        vae = AutoencoderKL(**VAE_CONFIG).eval()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder(len(tokenizer), dt),
        tokenizer=tokenizer,
        transformer=random_model(ZImageTransformer2DModel, {**TRANSFORMER_CONFIG, **(overrides or {})}, dt),
    )
    pipe.save_pretrained(Path(out_dir), max_shard_size="5GB")
