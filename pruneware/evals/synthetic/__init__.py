"""Synthetic VQA benchmark: seeded scenes of shapes, colours and glyphs, five task types.

Tasks: ``existence`` (yes/no, balanced, like POPE), ``attribute`` (colour or shape of an
object), ``counting``, ``spatial`` (left of / right of / above / below, yes/no) and ``glyph``
(read a small letter inside a shape: fine detail, like TextVQA). Answers are one word.

Train scene seeds are in ``[0, 10**9)``, eval scene seeds in ``[10**9, 2 * 10**9)``; any
``seed`` of :func:`make_split` gives a fresh split.
"""

from .questions import TASKS, vocabulary
from .fixed import fixed_examples
from .scene import COLORS, GLYPHS, IMAGE_SIZE, SHAPES, Obj, Scene, render, sample_scene
from .split import Example, make_example, make_multi, make_split, scene_seed, split_of

__all__ = [
    "COLORS", "GLYPHS", "IMAGE_SIZE", "SHAPES", "TASKS", "Example", "Obj", "Scene",
    "evaluate", "fixed_examples", "make_example", "make_multi", "make_split", "render", "sample_scene",
    "scene_seed", "split_of", "vocabulary",
]  # fmt: skip


def __getattr__(name: str):
    if name == "evaluate":  # lazy: keeps torch out of a plain benchmark import
        from .accuracy import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
