"""Image sizes: the one 'WxH' grammar and the one size check, for requests, engine profiles
and the build command alike."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import RequestError

if TYPE_CHECKING:
    from .base import Family

# ASCII digits only (str.isdigit() also takes '²' and '٤'), and at most 5 per side: no side
# anyone can make is longer, and int() of a 5000-digit string is not free.
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def parse_size(size: object, param: str = "size") -> tuple[int, int]:
    """'WxH' -> (width, height): lower-case x, positive ASCII integers."""
    if not isinstance(size, str):
        raise RequestError(f"{param} must be a string 'WxH', got {type(size).__name__}", param, status=422)
    m = _SIZE.fullmatch(size.strip())
    if not m:
        shown = size if len(size) <= 40 else size[:40] + "..."
        raise RequestError(f"invalid {param} {shown!r}: expected 'WxH' with positive integers, e.g. '1024x1024'", param)
    width, height = int(m.group(1)), int(m.group(2))
    if width <= 0 or height <= 0:
        raise RequestError(f"invalid {param} {size!r}: width and height must be positive", param)
    return width, height


@dataclass(frozen=True)
class SizeLimits:
    """What sizes can be made: the family's rules, narrowed by a built engine profile."""

    multiple_of: int
    min_side: int
    max_side: int
    # An engine profile bounds width and height separately; None means the sides rule alone.
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    source: str = "model"

    @classmethod
    def of(cls, family: "Family") -> "SizeLimits":
        return cls(family.size.multiple_of, family.size.min_side, family.size.max_side)

    def describe(self) -> str:
        if self.min_width is not None:
            return (
                f"width {self.min_width}..{self.max_width} and height {self.min_height}..{self.max_height}, "
                f"multiples of {self.multiple_of} ({self.source})"
            )
        return f"sides within {self.min_side}..{self.max_side}, multiples of {self.multiple_of} ({self.source})"

    def bounds(self) -> dict[str, int]:
        """The same ranges as numbers (the model card's size_limits), so clients such as the
        playground can offer sizes without parsing describe()'s text."""
        sides = (self.min_side, self.max_side)
        return {
            "multiple_of": self.multiple_of,
            "min_width": self.min_width if self.min_width is not None else sides[0],
            "max_width": self.max_width if self.max_width is not None else sides[1],
            "min_height": self.min_height if self.min_height is not None else sides[0],
            "max_height": self.max_height if self.max_height is not None else sides[1],
        }

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The allowed size nearest an input image's (edits' size "auto"): scaled into range
        keeping the aspect ratio where the range allows, then each side rounded down to a multiple."""
        b = self.bounds()
        wlo, whi, hlo, hhi = b["min_width"], b["max_width"], b["min_height"], b["max_height"]
        scale = min(1.0, whi / width, hhi / height)
        scale = max(scale, wlo / width, hlo / height)
        m = self.multiple_of

        def side(v: float, lo: int, hi: int) -> int:
            return min(max(int(v) // m * m, -(-lo // m) * m), hi // m * m)

        return side(width * scale, wlo, whi), side(height * scale, hlo, hhi)

    def check(self, width: int, height: int, param: str = "size") -> None:
        """RequestError (400, naming `param`) unless this size can be made."""
        size = f"{width}x{height}"
        m = self.multiple_of
        if width % m or height % m:
            raise RequestError(f"{param} {size} is not allowed: width and height must be multiples of {m}; allowed: {self.describe()}", param)
        if self.min_width is not None:
            ok = self.min_width <= width <= self.max_width and self.min_height <= height <= self.max_height
        else:
            ok = all(self.min_side <= s <= self.max_side for s in (width, height))
        if not ok:
            raise RequestError(f"{param} {size} is outside the allowed range: {self.describe()}", param)
