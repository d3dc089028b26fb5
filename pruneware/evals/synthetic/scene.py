"""Procedural scenes: coloured shapes with optional glyphs on a textured background.

A scene is sampled from a ``numpy.random.Generator`` and rendered with PIL. Both steps are
deterministic given the generator state, and cheap (a few milliseconds per 336 px scene), so
training can render examples on the fly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 336
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
GLYPHS: tuple[str, ...] = ("a", "e", "o", "t", "x")
GLYPH_SHAPES: tuple[str, ...] = ("circle", "square")
GLYPH_MIN_RADIUS = 30
RADIUS_RANGE = (20, 40)


@dataclass(frozen=True)
class Obj:
    """One object: centre ``(x, y)`` in pixels, ``r`` the half-extent in pixels."""

    shape: str
    color: str
    x: float
    y: float
    r: float
    glyph: str | None = None


@dataclass(frozen=True)
class Scene:
    """Objects plus the background parameters needed to render the scene again."""

    objects: tuple[Obj, ...]
    background: dict = field(default_factory=dict, hash=False, compare=False)
    group: tuple[str, str] | None = None  # (kind, value) forced by ``sample_scene(group=...)``


def _place(rng: np.random.Generator, placed: list[Obj], r: float, tries: int = 60) -> tuple[float, float] | None:
    """Find a centre for an object of half-extent ``r`` that overlaps no placed object."""
    lo, hi = r + 4, IMAGE_SIZE - r - 4
    for _ in range(tries):
        x, y = rng.uniform(lo, hi, size=2)
        if all(math.hypot(x - o.x, y - o.y) > (r + o.r) * 1.15 + 6 for o in placed):
            return float(x), float(y)
    return None


def sample_scene(
    rng: np.random.Generator,
    n_objects: int,
    group: tuple[str, str, int] | None = None,
    glyph_prob: float = 0.6,
) -> Scene:
    """Sample a scene with ``n_objects`` objects whose (colour, shape) pairs are all distinct.

    ``group=(kind, value, count)`` forces exactly ``count`` objects with that shape or colour
    (``kind`` is ``"shape"`` or ``"color"``); the other objects avoid that value. This gives
    counting questions a spread of answers. Objects that do not fit are dropped.
    """
    colors, shapes = list(COLORS), list(SHAPES)
    pairs: list[tuple[str, str]] = []
    if group is not None:
        kind, value, count = group
        others = rng.permutation(shapes if kind == "color" else colors)[:count]
        pairs += [(value, str(o)) if kind == "color" else (str(o), value) for o in others]
    while len(pairs) < n_objects:
        c, s = str(rng.choice(colors)), str(rng.choice(shapes))
        if group is not None and (c if group[0] == "color" else s) == group[1]:
            continue
        if (c, s) not in pairs:
            pairs.append((c, s))
    placed: list[Obj] = []
    for c, s in pairs:
        r = float(rng.uniform(*RADIUS_RANGE))
        if s in GLYPH_SHAPES and rng.random() < glyph_prob:
            r = max(r, float(rng.uniform(GLYPH_MIN_RADIUS, RADIUS_RANGE[1])))
        xy = _place(rng, placed, r)
        if xy is None:
            continue
        glyph = None
        if s in GLYPH_SHAPES and r >= GLYPH_MIN_RADIUS:
            glyph = str(rng.choice(GLYPHS))
        placed.append(Obj(s, c, xy[0], xy[1], r, glyph))
    order = rng.permutation(len(placed))
    background = {
        "base": rng.integers(150, 215),
        "tint": rng.integers(-12, 13, size=3).tolist(),
        "kind": str(rng.choice(["stripes", "checker", "noise"])),
        "amp": float(rng.uniform(8, 22)),
        "period": float(rng.uniform(10, 40)),
        "angle": float(rng.uniform(0, math.pi)),
        "noise_seed": int(rng.integers(2**31)),
    }
    return Scene(tuple(placed[i] for i in order), background, None if group is None else group[:2])


def _texture(bg: dict) -> np.ndarray:
    """Background as a uint8 array of shape [S, S, 3]."""
    s = IMAGE_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    if bg["kind"] == "stripes":
        u = xx * math.cos(bg["angle"]) + yy * math.sin(bg["angle"])
        pattern = np.sin(2 * math.pi * u / bg["period"])
    elif bg["kind"] == "checker":
        p = max(int(bg["period"]), 4)
        pattern = ((xx // p + yy // p) % 2) * 2.0 - 1.0
    else:
        coarse = np.random.default_rng(bg["noise_seed"]).uniform(-1, 1, size=(s // 12 + 1, s // 12 + 1))
        pattern = np.kron(coarse, np.ones((12, 12)))[:s, :s]
    gray = bg["base"] + bg["amp"] * pattern
    rgb = gray[..., None] + np.asarray(bg["tint"], dtype=np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.38
        return [
            (x - w, y - r), (x + w, y - r), (x + w, y - w), (x + r, y - w), (x + r, y + w),
            (x + w, y + w), (x + w, y + r), (x - w, y + r), (x - w, y + w), (x - r, y + w),
            (x - r, y - w), (x - w, y - w),
        ]  # fmt: skip
    raise ValueError(f"no polygon for shape {shape!r}; polygons exist for triangle, star, cross")


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_shape(draw: ImageDraw.ImageDraw, o: Obj, fill: tuple[int, int, int] | int) -> None:
    """Fill the silhouette of ``o`` (without its glyph)."""
    if o.shape == "circle":
        draw.ellipse([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=fill)
    elif o.shape == "square":
        h = o.r * 0.85
        draw.rectangle([o.x - h, o.y - h, o.x + h, o.y + h], fill=fill)
    else:
        draw.polygon(_polygon(o.shape, o.x, o.y, o.r), fill=fill)


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB PIL image of ``IMAGE_SIZE`` x ``IMAGE_SIZE`` pixels."""
    img = Image.fromarray(_texture(scene.background), "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = COLORS[o.color]
        draw_shape(draw, o, fill)
        if o.glyph is not None:
            ink = (0, 0, 0) if sum(fill) > 400 else (255, 255, 255)
            draw.text((o.x, o.y), o.glyph.upper(), fill=ink, font=_font(int(o.r * 0.9)), anchor="mm")
    return img
