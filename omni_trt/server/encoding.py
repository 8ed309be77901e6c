"""Image encoding for responses. Runs in a thread pool, off the event loop."""

from __future__ import annotations

import base64
import io
from typing import Any

# zlib level 1: on a 1024x1024 image, several times faster than Pillow's default (6) for a
# slightly larger file; the response is base64 anyway. Measured: benchmarks/serve_overhead.py.
PNG_COMPRESS_LEVEL = 1
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: Any, fmt: str = "png", compression: int | None = None) -> bytes:
    """PIL image -> bytes. compression is OpenAI's output_compression (0..100): for png the zlib
    effort (0 = fastest), for jpeg/webp 100 - quality."""
    buf = io.BytesIO()
    if fmt == "png":
        level = PNG_COMPRESS_LEVEL if compression is None else round(compression * 9 / 100)
        image.save(buf, format="PNG", compress_level=level)
    elif fmt in ("jpeg", "webp"):
        quality = 90 if compression is None else max(1, 100 - compression)
        image.convert("RGB").save(buf, format=fmt.upper(), quality=quality)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buf.getvalue()


def encode_b64(image: Any, fmt: str = "png", compression: int | None = None) -> str:
    return base64.b64encode(encode_image(image, fmt, compression)).decode("ascii")


def data_url(b64: str, fmt: str = "png") -> str:
    return f"data:{MIME[fmt]};base64,{b64}"
