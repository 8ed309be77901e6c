"""A tiny random-weight pipeline of this family (to be written)."""

from pathlib import Path


def build_tiny(out_dir: Path) -> None:
    raise NotImplementedError("tiny pipeline not written yet")
