"""What the trained demo model draws, and a checker that reads a picture back (numpy only).

The demo model knows one grammar, "a {fg} {shape} on a {bg} background", over PALETTE and SHAPES
(fg != bg). `read_picture` answers which colours and shape a picture shows, the same way for a
drawn training picture and for a generated one; `score` gives the accuracy over prompts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# How much of its bounding box a filled shape covers: pi/4, 1, 1/2 (upright isosceles triangle).
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
CORNER = 1 / 16  # the corner patches read as background: a side's sixteenth
FAR = 90.0  # RGB distance from the background beyond which a pixel is foreground (palette gaps are >= 150)

_CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class Picture:
    """What a picture shows (or what a prompt asks): colour names from PALETTE, a shape from SHAPES
    (None: nothing stands out from the background)."""

    fg: str | None
    shape: str | None
    bg: str


def caption(p: Picture) -> str:
    return f"a {p.fg} {p.shape} on a {p.bg} background"


def parse_caption(text: str) -> Picture | None:
    """The picture a prompt of the grammar asks for; None for any other text."""
    m = _CAPTION.match(text.strip().lower())
    if not m or m[1] not in PALETTE or m[3] not in PALETTE or m[2] not in SHAPES or m[1] == m[3]:
        return None
    return Picture(m[1], m[2], m[3])


def all_pictures() -> list[Picture]:
    """Every picture the grammar describes (6 x 5 colour pairs x 3 shapes = 90)."""
    return [Picture(fg, s, bg) for fg in PALETTE for bg in PALETTE if fg != bg for s in SHAPES]


def nearest_colour(rgb: Sequence[float]) -> str:
    names = list(PALETTE)
    table = np.array([PALETTE[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)))]


def nearest_shape(fill: float) -> str:
    return min(SHAPES, key=lambda s: abs(FILL[s] - fill))


def read_picture(image: np.ndarray) -> Picture:
    """Read an HxWx3 uint8 picture: background = the median colour of the four corner patches,
    foreground = the pixels far from it (their median colour), shape = how much of the
    foreground's bounding box it fills. The box is trimmed of stray pixels (rows and columns
    with under 1/20 of the fullest one's count), so a few noisy pixels do not widen it."""
    img = np.asarray(image, dtype=np.float64)[..., :3]
    h, w = img.shape[:2]
    k = max(1, round(min(h, w) * CORNER))
    corners = np.concatenate([img[:k, :k], img[:k, -k:], img[-k:, :k], img[-k:, -k:]]).reshape(-1, 3)
    bg_rgb = np.median(corners, axis=0)
    fg_mask = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > FAR
    bg = nearest_colour(bg_rgb)
    if fg_mask.sum() < max(4, h * w // 400):
        return Picture(None, None, bg)
    fg = nearest_colour(np.median(img[fg_mask], axis=0))
    rows, cols = fg_mask.sum(1), fg_mask.sum(0)
    r = np.flatnonzero(rows >= rows.max() / 20)
    c = np.flatnonzero(cols >= cols.max() / 20)
    box = fg_mask[r[0]:r[-1] + 1, c[0]:c[-1] + 1]
    return Picture(fg, nearest_shape(float(box.mean())), bg)


@dataclass(frozen=True)
class Score:
    """Fractions right over `n` pictures."""

    n: int
    fg: float
    bg: float
    shape: float

    def meets(self, colour: float = 0.9, shape: float = 0.8) -> bool:
        return min(self.fg, self.bg) >= colour and self.shape >= shape


def score(asked: Iterable[Picture], seen: Iterable[Picture]) -> Score:
    pairs = list(zip(asked, seen, strict=True))
    n = len(pairs)
    if n == 0:
        raise ValueError("score: no pictures")
    return Score(
        n,
        sum(a.fg == s.fg for a, s in pairs) / n,
        sum(a.bg == s.bg for a, s in pairs) / n,
        sum(a.shape == s.shape for a, s in pairs) / n,
    )


def benchmark_prompts(count: int = 30, seed: int = 0) -> list[tuple[str, int]]:
    """`count` fixed (prompt, seed) pairs spread over the grammar: every shape and colour appears."""
    rng = np.random.default_rng(seed)
    pictures = all_pictures()
    order = rng.permutation(len(pictures))
    return [(caption(pictures[int(i)]), 1000 + j) for j, i in enumerate(np.resize(order, count))]
