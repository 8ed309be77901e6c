"""Input images of edit requests, as pure functions: bytes -> a checked PIL image, every problem a
400 naming the field. Decoding is bounded: the pixel count is read from the header and checked
before any pixel is decoded (a decompression bomb never expands), truncated files fail, odd modes
(CMYK, palette, 16-bit, with alpha) are converted."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from typing import Any, Iterable
from urllib.parse import urlsplit

from ..errors import RequestError

MAX_INPUT_IMAGES = 16  # OpenAI's image[] limit
# The formats the docs list; Pillow's other plugins (EPS reaches Ghostscript, where installed) are never tried.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+)?(;[a-z0-9=.+-]+)*;base64,(.*)", re.I | re.S)


def open_image(data: bytes, param: str, max_pixels: int) -> Any:
    """A decoded image from encoded bytes (INPUT_FORMATS only). Pillow refuses a header past
    twice its own pixel limit before we see the size: that too is the limit message."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(f"{param} is empty: send an image file ({', '.join(INPUT_FORMATS)})", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
            _check_pixels(im.size, param, max_pixels)
            im.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(f"{param} is more than this server decodes ({max_pixels / 1e6:.1f} megapixels; --max-input-megapixels)",
                           param) from None
    except UnidentifiedImageError:
        raise RequestError(f"{param} is not an image this server reads ({', '.join(INPUT_FORMATS)})", param) from None
    except (OSError, SyntaxError, ValueError):  # truncated or corrupt data
        raise RequestError(f"{param} could not be decoded: the file is truncated or corrupt", param) from None
    return im


def _check_pixels(size: tuple[int, int], param: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise RequestError(f"{param} has no pixels", param)
    if w * h > max_pixels:
        raise RequestError(f"{param} is {w}x{h} = {w * h / 1e6:.1f} megapixels, more than this server decodes "
                           f"({max_pixels / 1e6:.1f}; --max-input-megapixels)", param)


def as_rgb(im: Any) -> Any:
    """Any mode to RGB; transparency is composited over white (the models see no alpha)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bits first
        return im.point(lambda v: v / 256).convert("L").convert("RGB")
    return im.convert("RGB")


def edit_mask(data: bytes, size: tuple[int, int], max_pixels: int, param: str = "mask") -> Any:
    """OpenAI's mask: a PNG whose fully transparent pixels mark where to edit, the size of the
    (first) image. Returned as diffusers wants it: an L image, white where the model repaints."""
    im = open_image(data, param, max_pixels)
    if im.size != tuple(size):
        raise RequestError(f"{param} is {im.size[0]}x{im.size[1]}; it must be the size of the image, {size[0]}x{size[1]}", param)
    if im.mode not in ("RGBA", "LA", "PA") and not (im.mode == "P" and "transparency" in im.info):
        raise RequestError(f"{param} has no alpha channel: send a PNG whose fully transparent pixels mark where to edit", param)
    alpha = im.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def decode_data_url(url: str, param: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL."""
    m = _DATA_URL.fullmatch(url.strip())
    if not m:
        raise RequestError(f"{param} must be a data:image/...;base64,... URL", param)
    try:
        return base64.b64decode(m.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{param} holds invalid base64", param) from None


def check_remote_url(url: str, allowed_hosts: Iterable[str], param: str) -> None:
    """Remote images are fetched only from hosts the operator allowed (--allow-image-host): a
    server that fetches any URL a client names can be made to reach anything it can reach."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RequestError(f"{param}: only data: URLs (and http(s) URLs of allowed hosts) are accepted", param)
    if (parts.hostname or "").lower() not in {h.lower() for h in allowed_hosts}:
        raise RequestError(f"{param}: this server does not fetch remote images (host {parts.hostname!r} is not allowed); "
                           "send the image inline as a data: URL", param)


def fetch_image(url: str, max_bytes: int, timeout: float, param: str) -> bytes:
    """An allowed host's image (check_remote_url first): no redirects (they could lead anywhere),
    bounded in size and time."""
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "omni-trt"}), timeout=timeout) as r:
            if r.status != 200:
                raise RequestError(f"{param}: fetching the image answered HTTP {r.status}", param)
            data = r.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise RequestError(f"{param}: fetching the image answered HTTP {e.code}", param) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RequestError(f"{param}: the image could not be fetched ({type(e).__name__})", param) from None
    if len(data) > max_bytes:
        raise RequestError(f"{param}: the image is over this server's size limit", param)
    return data


def undecodable_field(body: bytes, content_type: str) -> str | None:
    """The first text field of a multipart body whose bytes are not UTF-8, else None. Starlette
    decodes such a field as Latin-1 and the damage cannot be seen afterwards, so the raw parts
    are read here (files are skipped: their bytes are never text)."""
    from python_multipart import FormParser
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        return None
    bad: list[str] = []

    def on_field(field: Any) -> None:
        try:
            (field.value or b"").decode("utf-8")
        except UnicodeDecodeError:
            bad.append(field.field_name.decode("utf-8", "replace"))

    parser = FormParser("multipart/form-data", on_field, lambda f: f.close(), boundary=params[b"boundary"],
                        config={"MAX_MEMORY_FILE_SIZE": 1 << 62})
    try:
        parser.write(body)
        parser.finalize()
    except Exception:  # a malformed body is Starlette's to refuse, with its own message
        return None
    return bad[0] if bad else None
