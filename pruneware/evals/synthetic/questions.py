"""Question templates for the five task types, each with a one-word closed answer.

Every generator takes a scene and a ``numpy.random.Generator`` and returns ``(question,
answer)``, or ``None`` when the scene cannot support that task (the caller then samples a new
scene). Descriptions always pick out exactly one object: a scene never repeats a
(colour, shape) pair.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from .scene import COLORS, GLYPHS, PLURALS, SHAPES, Scene

TASKS: tuple[str, ...] = ("existence", "attribute", "counting", "spatial", "glyph")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven")
SPATIAL_MARGIN = 30.0
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

QA = tuple[str, str]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def existence(scene: Scene, rng: np.random.Generator) -> QA | None:
    """``is there a red circle?`` -> yes/no, balanced; negatives share a colour or shape."""
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5 and present:
        c, s = sorted(present)[rng.integers(len(present))]
        return f"is there {_article(c)} {c} {s}?", "yes"
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    hard = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    pool = hard if hard and rng.random() < 0.8 else absent
    c, s = pool[rng.integers(len(pool))]
    return f"is there {_article(c)} {c} {s}?", "no"


def attribute(scene: Scene, rng: np.random.Generator) -> QA | None:
    """``what color is the star?`` or ``what shape is the red object?``."""
    shapes = Counter(o.shape for o in scene.objects)
    colors = Counter(o.color for o in scene.objects)
    options = [("color", o) for o in scene.objects if shapes[o.shape] == 1]
    options += [("shape", o) for o in scene.objects if colors[o.color] == 1]
    if not options:
        return None
    kind, o = options[rng.integers(len(options))]
    if kind == "color":
        return f"what color is the {o.shape}?", o.color
    return f"what shape is the {o.color} object?", o.shape


def counting(scene: Scene, rng: np.random.Generator) -> QA | None:
    """``how many stars are there?`` or ``how many red objects are there?`` (count >= 1)."""
    if not scene.objects:
        return None
    if scene.group is not None:
        kind, value = scene.group
    else:
        o = scene.objects[rng.integers(len(scene.objects))]
        kind = "shape" if rng.random() < 0.5 else "color"
        value = o.shape if kind == "shape" else o.color
    n = sum((o.shape if kind == "shape" else o.color) == value for o in scene.objects)
    if kind == "shape":
        return f"how many {PLURALS[value]} are there?", NUMBERS[n]
    return f"how many {value} objects are there?", NUMBERS[n]


def spatial(scene: Scene, rng: np.random.Generator) -> QA | None:
    """``is the red circle left of the blue star?`` -> yes/no, balanced, clear margins only."""
    rel = RELATIONS[rng.integers(len(RELATIONS))]
    want = rng.random() < 0.5
    pairs = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            d = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[rel]
            if abs(d) >= SPATIAL_MARGIN and (d > 0) == want:
                pairs.append((a, b))
    if not pairs:
        return None
    a, b = pairs[rng.integers(len(pairs))]
    q = f"is the {a.color} {a.shape} {rel} the {b.color} {b.shape}?"
    return q, "yes" if want else "no"


def glyph(scene: Scene, rng: np.random.Generator) -> QA | None:
    """``what letter is on the red square?`` -> the glyph drawn inside it."""
    marked = [o for o in scene.objects if o.glyph is not None]
    if not marked:
        return None
    o = marked[rng.integers(len(marked))]
    return f"what letter is on the {o.color} {o.shape}?", str(o.glyph)


GENERATORS: dict[str, Callable[[Scene, np.random.Generator], QA | None]] = {
    "existence": existence,
    "attribute": attribute,
    "counting": counting,
    "spatial": spatial,
    "glyph": glyph,
}


def vocabulary() -> list[str]:
    """Every word a question or answer can contain, sorted (punctuation is its own word)."""
    words = {"is", "there", "a", "an", "what", "color", "shape", "the", "object", "how", "many", "are"}
    words |= {"objects", "letter", "on", "left", "right", "of", "above", "below", "yes", "no", "?"}
    words |= set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(GLYPHS) | set(NUMBERS)
    return sorted(words)
