"""Per-cell scene labels for the auxiliary grounding loss used in training.

The tiny models' training recipe (``recipes/tiny_models`` in the repository, not in the
package) imports them from here. Training adds a small linear head on the visual tokens that
enter the LLM and asks it to predict, for every grid cell, the colour, shape and glyph of the
object under the cell centre and whether the object's centre lies in the cell. The head is
dropped after training; it only makes the vision tower and projector learn useful features in
hundreds rather than tens of thousands of steps.

``referents`` names the objects a question is about; training uses it to supervise one
attention head (the recipe's pointing losses) to look at those objects from the token that
answers.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from pruneware.evals.synthetic.scene import COLORS, GLYPHS, IMAGE_SIZE, PLURALS, SHAPES, Scene, draw_shape

HEADS: dict[str, int] = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "glyph": len(GLYPHS) + 1, "center": 2}
_COLOR = {c: i + 1 for i, c in enumerate(COLORS)}
_SHAPE = {s: i + 1 for i, s in enumerate(SHAPES)}
_GLYPH = {g: i + 1 for i, g in enumerate(GLYPHS)}


def cell_objects(scene: Scene, grid: int) -> np.ndarray:
    """Index + 1 of the object under each cell centre (0: background), shape [grid * grid]."""
    label = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(label)
    for k, o in enumerate(scene.objects):
        draw_shape(draw, o, k + 1)
    centers = ((np.arange(grid) + 0.5) * IMAGE_SIZE / grid).astype(int)
    return np.asarray(label)[np.ix_(centers, centers)].reshape(-1)


def referents(scene: Scene, question: str) -> list[int]:
    """Indices of the objects a question is about (empty for an absent object)."""
    words = question.rstrip("?").split()
    singular = {p: s for s, p in PLURALS.items()}
    colors = [w for w in words if w in COLORS]
    shapes = [singular.get(w, w) for w in words if w in SHAPES or w in singular]
    objs = scene.objects
    if len(colors) == len(shapes) and colors:
        want = set(zip(colors, shapes, strict=True))
        return [k for k, o in enumerate(objs) if (o.color, o.shape) in want]
    if colors and not shapes:
        return [k for k, o in enumerate(objs) if o.color in colors]
    if shapes and not colors:
        return [k for k, o in enumerate(objs) if o.shape in shapes]
    return []


def phrases(scene: Scene, question: str) -> list[tuple[int, list[int]]]:
    """``(word index, objects)`` for each noun phrase of a question, at its last word.

    A noun phrase ends with a shape word or ``object(s)``, optionally after a colour word; its
    objects are those of the scene it describes (possibly none). Words are split as the
    tokenizers split them (``?`` is a word).
    """
    words = question.replace("?", " ?").split()
    singular = {p: s for s, p in PLURALS.items()}
    out = []
    for i, w in enumerate(words):
        if w in SHAPES or w in singular or w in ("object", "objects"):
            shape = singular.get(w, w) if w not in ("object", "objects") else None
            color = words[i - 1] if i > 0 and words[i - 1] in COLORS else None
            objs = [
                k for k, o in enumerate(scene.objects)
                if (color is None or o.color == color) and (shape is None or o.shape == shape)
            ]  # fmt: skip
            out.append((i, objs))
    return out


def cell_targets(scene: Scene, grid: int) -> torch.Tensor:
    """Class targets of shape [grid * grid, 5] (colour, shape, glyph, centre, object index + 1)."""
    centers = ((np.arange(grid) + 0.5) * IMAGE_SIZE / grid).astype(int)
    idx = cell_objects(scene, grid)  # [grid*grid], 0 = background
    objs = scene.objects
    color = np.array([0] + [_COLOR[o.color] for o in objs])[idx]
    shape = np.array([0] + [_SHAPE[o.shape] for o in objs])[idx]
    glyph = np.zeros(grid * grid, dtype=np.int64)
    center = np.zeros(grid * grid, dtype=np.int64)
    cy, cx = np.meshgrid(centers, centers, indexing="ij")
    cy, cx = cy.reshape(-1), cx.reshape(-1)
    for o in objs:
        if o.glyph is not None:
            near = (np.abs(cx - o.x) < 0.4 * o.r) & (np.abs(cy - o.y) < 0.4 * o.r)
            glyph[near] = _GLYPH[o.glyph]
        row = min(int(o.y * grid / IMAGE_SIZE), grid - 1)
        col = min(int(o.x * grid / IMAGE_SIZE), grid - 1)
        center[row * grid + col] = 1
    return torch.from_numpy(np.stack([color, shape, glyph, center, idx.astype(np.int64)], axis=1)).long()
