"""Per-cell scene labels for the auxiliary grounding loss used in training.

Training adds a small linear head on the visual tokens that enter the LLM and asks it to
predict, for every grid cell, the colour, shape and glyph of the object under the cell centre
and whether the object's centre lies in the cell. The head is dropped after training; it only
makes the vision tower and projector learn useful features in hundreds rather than tens of
thousands of steps.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from pruneware.evals.synthetic.scene import COLORS, GLYPHS, IMAGE_SIZE, SHAPES, Scene, draw_shape

HEADS: dict[str, int] = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "glyph": len(GLYPHS) + 1, "center": 2}
_COLOR = {c: i + 1 for i, c in enumerate(COLORS)}
_SHAPE = {s: i + 1 for i, s in enumerate(SHAPES)}
_GLYPH = {g: i + 1 for i, g in enumerate(GLYPHS)}


def cell_targets(scene: Scene, grid: int) -> torch.Tensor:
    """Class targets of shape [grid * grid, 4] (colour, shape, glyph, centre), row-major cells."""
    label = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(label)
    for k, o in enumerate(scene.objects):
        draw_shape(draw, o, k + 1)
    centers = ((np.arange(grid) + 0.5) * IMAGE_SIZE / grid).astype(int)
    idx = np.asarray(label)[np.ix_(centers, centers)].reshape(-1)  # [grid*grid], 0 = background
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
    return torch.from_numpy(np.stack([color, shape, glyph, center], axis=1)).long()
