"""Eight hand-made questions with unambiguous answers: a quick sanity check of a trained model.

Two scenes on a plain noise background, each task type asked at least once. The shipped tiny
models' tests (`tests/models/test_models.py`) and their cards count how many of these a model misses.
"""

from __future__ import annotations

from .scene import Obj, Scene, render
from .split import Example


def fixed_examples() -> list[Example]:
    """Hand-made scenes with unambiguous answers, one per task type (twice); ids ``fixed-0..7``."""
    bg = {"base": 180, "tint": [0, 0, 0], "kind": "noise", "amp": 10.0, "period": 20.0, "angle": 0.0, "noise_seed": 1}
    s1 = Scene((Obj("circle", "red", 80, 90, 36, "x"), Obj("triangle", "blue", 250, 240, 34)), bg)
    s2 = Scene((Obj("star", "yellow", 260, 80, 36), Obj("square", "green", 90, 250, 36, "o"),
                Obj("square", "purple", 240, 250, 30)), bg)  # fmt: skip
    qa = [
        (s1, "is there a red circle?", "yes", "existence"),
        (s1, "what color is the triangle?", "blue", "attribute"),
        (s1, "is the red circle left of the blue triangle?", "yes", "spatial"),
        (s1, "what letter is on the red circle?", "x", "glyph"),
        (s2, "is there a blue star?", "no", "existence"),
        (s2, "what shape is the yellow object?", "star", "attribute"),
        (s2, "how many squares are there?", "two", "counting"),
        (s2, "what letter is on the green square?", "o", "glyph"),
    ]
    return [Example(render(s), q, a, t, f"fixed-{i}", s) for i, (s, q, a, t) in enumerate(qa)]
