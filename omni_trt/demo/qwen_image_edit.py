"""Qwen-Image-Edit-2511 pipelines with random weights: the tiny test pipeline, and the published
architectures for GPU benchmarks offline.

The transformer and VAE are Qwen-Image's (demo/qwen_image.py) with the edit checkpoint's switch:
Qwen/Qwen-Image-Edit-2511's transformer config sets zero_cond_t (the reference-image tokens are
modulated at timestep 0). The text encoder is the same Qwen2.5-VL stand-in, here reading the input
images through its (one-block) vision tower; the processor is Qwen2VLProcessor over the tiny
tokenizer with the vision tokens added, saved in the published layout.
"""

from __future__ import annotations

import functools

from pathlib import Path
from typing import Any, Mapping

from ..dtypes import torch_dtype
from ..models.qwen_image_edit.processor import processor_class
from . import qwen_image as qi
from .text import qwen2_tokenizer
from .weights import MAX_SHARD, dtype_scope, init_small, random_model

# Qwen/Qwen-Image-Edit-2511 transformer/config.json: Qwen-Image's plus zero_cond_t.
TRANSFORMER_CONFIG: dict[str, Any] = dict(qi.TRANSFORMER_CONFIG, zero_cond_t=True)
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(qi.TINY_TRANSFORMER_CONFIG, zero_cond_t=True)
# The Qwen2.5-VL tokens the pipeline's prompt template names, and the config fields holding their ids.
VISION_TOKENS = {"vision_start_token_id": "<|vision_start|>", "image_token_id": "<|image_pad|>",
                 "vision_end_token_id": "<|vision_end|>"}


def _tokenizer() -> Any:
    from tokenizers import AddedToken

    tok = qwen2_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS.values()], special_tokens=True)
    return tok


def _text_encoder(tokenizer: Any, text_config: Mapping[str, Any]) -> Any:
    """Qwen-Image's stand-in encoder with its vision-token ids pointed into the tiny vocabulary."""
    text = qi.text_encoder(tokenizer, text_config)
    for key, token in VISION_TOKENS.items():
        setattr(text.config, key, tokenizer.convert_tokens_to_ids(token))
    return text


def _pipeline(transformer: Any, vae: Any, text: Any, tokenizer: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen2VLImageProcessor's defaults are the published preprocessor_config.json's.
    processor = processor_class()(Qwen2VLImageProcessorPil(), tokenizer)
    return QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**qi.SCHEDULER_CONFIG), vae=vae,
                                     text_encoder=text, tokenizer=tokenizer, processor=processor, transformer=transformer)


def build_tiny(out_dir: Path) -> None:
    """A tiny random-weight QwenImageEditPlusPipeline with the real classes and a factor-8 VAE."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    tokenizer = _tokenizer()
    text = _text_encoder(tokenizer, qi.TINY_TEXT_CONFIG)
    vae = AutoencoderKLQwenImage(**qi.TINY_VAE_CONFIG)
    init_small(transformer, std=0.2)  # as Qwen-Image's tiny one: the prompt visibly steers the latents
    init_small(text)
    _pipeline(transformer, vae, text, tokenizer).save_pretrained(out_dir)


def build_real_shapes(out_dir: Path, dtype: str = "bf16", *, overrides: Mapping[str, Any] | None = None) -> None:
    """Write a QwenImageEditPlusPipeline with the published transformer and VAE, random weights, in
    `dtype` (sizes as demo/qwen_image.build_real_shapes; overrides merge into TRANSFORMER_CONFIG)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    dt = torch_dtype(dtype)
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    with dtype_scope(dt):
        vae = AutoencoderKLQwenImage(**qi.VAE_CONFIG).eval()
    text = random_model(functools.partial(_text_encoder, tokenizer), {"text_config": qi.TEXT_CONFIG}, dt)  # as qi's
    transformer = random_model(QwenImageTransformer2DModel, {**TRANSFORMER_CONFIG, **(overrides or {})}, dt)
    _pipeline(transformer, vae, text, tokenizer).save_pretrained(Path(out_dir), max_shard_size=MAX_SHARD)
