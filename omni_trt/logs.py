"""The one logging setup of the `omni` command (and of direct library calls that log progress)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("httpx", "diffusers", "transformers")


def setup(level: str = "INFO") -> None:
    """Configure the root logger once; a later call only changes the level."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=FORMAT)
    root.setLevel(level.upper())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
