"""LoRA adapters made the way users make them: PEFT on a pipeline's transformer (random factors,
so the adapter visibly changes the image), saved with the pipeline's own save_lora_weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_adapter(pipe: Any, out: str | Path, seed: int, rank: int = 4, alpha: float | None = None,
                 targets: tuple[str, ...] | None = None, strength: float = 0.5) -> Path:
    """Write a LoRA adapter of `pipe`'s transformer to folder `out` (pytorch_lora_weights.safetensors)
    and return it. targets: module names (default: the family's `lora_targets`). The transformer is
    left as it was (the adapter is removed again)."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    from ..models import FAMILIES

    if targets is None:
        targets = next(f.lora_targets for f in FAMILIES.values() if f.pipeline_class == type(pipe).__name__)

    name = f"make_{seed}"
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), init_lora_weights="gaussian")
    t = pipe.transformer
    t.add_adapter(config, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    for n, p in t.named_parameters():
        if f"lora_B.{name}." in n:  # PEFT starts B at zero (no change); a trained adapter's is not
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * strength
    state = get_peft_model_state_dict(t, adapter_name=name)
    type(pipe).save_lora_weights(str(out), transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict())
    t.unload_lora()  # PEFT's layers out again: the module is as it was (plain Linear layers, same names)
    return Path(out)
