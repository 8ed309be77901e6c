"""Which adapter files may be opened: inside --lora-dir (symlinks resolved), safetensors only,
under a size limit. Checked before a byte is read; every refusal names `lora`."""

from __future__ import annotations

import os
from pathlib import Path

from .request import refuse

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes in a folder
# torch.load of these runs code from the file; safetensors holds tensors only.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_ADAPTER_BYTES = 2 << 30  # a rank-128 adapter of a 20B transformer is well under this


def inside(path: str | Path, root: str | Path) -> Path:
    """`path` (relative paths are taken from `root`) resolved, symlinks included, refused unless it
    stays inside `root`. Nothing is opened."""
    root = Path(root).resolve()
    p = Path(path)
    real = (p if p.is_absolute() else root / p).resolve()
    if real != root and root not in real.parents:
        raise refuse("lora path is outside the adapter folder this server allows (--lora-dir)")
    return real


def adapter_file(path: str | Path, max_bytes: int = MAX_ADAPTER_BYTES) -> Path:
    """The .safetensors file a path names: the file itself, or a folder's WEIGHT_NAME (or its only
    .safetensors file). Pickles are refused by name, before anything is read."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise refuse(f"lora file {p.name!r} is a pickle ({p.suffix}); loading one runs code: convert it to .safetensors")
    if p.is_dir():
        p = _weights_in(p)
    elif not p.is_file():
        raise refuse(f"lora path {p.name!r} does not exist")
    if p.suffix.lower() != ".safetensors":
        raise refuse(f"lora file {p.name!r} is not a .safetensors file")
    size = os.stat(p).st_size
    if size > max_bytes:
        raise refuse(f"lora file {p.name!r} is {size / 2**20:.0f} MB, over this server's limit of {max_bytes / 2**20:.0f} MB")
    return p


def _weights_in(folder: Path) -> Path:
    if (folder / WEIGHT_NAME).is_file():
        return folder / WEIGHT_NAME
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if any(folder.glob(f"*{s}") for s in PICKLE_SUFFIXES) and not found:
        raise refuse(f"lora folder {folder.name!r} holds only pickles (.bin/.pt/.ckpt); loading one runs code: convert it to .safetensors")
    raise refuse(f"lora folder {folder.name!r} has no {WEIGHT_NAME}" + (" and several .safetensors files" if found else ""))
