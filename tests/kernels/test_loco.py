"""PixelPrune's LOCO-I distances for many grids at once (``pruneware.kernels.loco``): the numpy
CPU path and the Triton kernel against the plain-torch reference, bit for bit (differences,
absolute values and maxima are exact), and the reference against the prediction rule written
unit by unit; odd sizes, one-row and one-column grids, exact matches (which switch the
prediction), half precision and NaN-poisoned outputs. The kernel runs on CPU under
``TRITON_INTERPRET=1`` (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import pruneware.kernels.loco as loco
from pruneware.kernels.loco import cpu, reference
from pruneware.kernels.loco import triton as fused  # noqa: F401 (tests/kernels/conftest.py's interpret fixture reads it)

CUDA = torch.cuda.is_available()
# (n, h, w, D): odd sizes, a single unit, one row, one column, wide units.
SHAPES = [(1, 7, 9, 5), (3, 1, 5, 3), (2, 6, 1, 4), (1, 1, 1, 2), (2, 13, 11, 63), (1, 3, 4, 577)]


def grids_with_repeats(n: int, h: int, w: int, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, h, w, d] with many units equal to a neighbour (so every branch of the rule is taken)."""
    gen = torch.Generator().manual_seed(n * 1000 + h * w + d)
    palette = torch.randn(4, d, generator=gen)
    return palette[torch.randint(0, 4, (n, h, w), generator=gen)].to(dtype)


def unit_by_unit(grid: torch.Tensor) -> torch.Tensor:
    """[h, w] the rule for one [h, w, D] grid, unit by unit (the official `pred_2d` on originals)."""
    h, w, _ = grid.shape
    g = grid.float()
    dist = torch.full((h, w), float("inf"))
    for r in range(h):
        for c in range(w):
            if r == 0 and c == 0:
                continue
            if r == 0:
                pred = g[r, c - 1]
            elif c == 0:
                pred = g[r - 1, c]
            else:
                a, b, corner = g[r, c - 1], g[r - 1, c], g[r - 1, c - 1]
                vertical = reference.linf(corner, a) <= 0 and not reference.linf(corner, b) <= 0
                pred = b if vertical else a
            dist[r, c] = reference.linf(g[r, c], pred)
    return dist


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_is_the_rule_unit_by_unit(shape):
    grids = grids_with_repeats(*shape)
    dist = reference.loco_distances(grids)
    for i in range(shape[0]):
        assert torch.equal(dist[i], unit_by_unit(grids[i]))
    if shape[1] * shape[2] > 4:
        assert (dist == 0).any() and (dist > 0).any()  # matches and anchors both occur


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_path_is_the_reference_bit_for_bit(shape, dtype):
    grids = grids_with_repeats(*shape, dtype=dtype)
    assert torch.equal(cpu.loco_distances(grids), reference.loco_distances(grids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_interpreted_is_the_reference(shape, dtype, interpret, nan_poison):
    grids = grids_with_repeats(*shape, dtype=dtype)
    got = loco.loco_distances(grids)
    assert not got.isnan().any()
    assert torch.equal(got, reference.loco_distances(grids))


def test_strided_input_reads_the_same_units(interpret):
    grids = grids_with_repeats(2, 5, 6, 7).permute(0, 2, 1, 3)  # [2, 6, 5, 7], not contiguous
    assert torch.equal(loco.loco_distances(grids), reference.loco_distances(grids))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_triton_cuda_is_the_reference(nan_poison):
    grids = grids_with_repeats(3, 24, 24, 588)
    assert torch.equal(loco.loco_distances(grids.cuda()).cpu(), reference.loco_distances(grids))


@pytest.mark.parametrize("bad", [torch.zeros(3, 4, 5), torch.zeros(1, 2, 2, 3, dtype=torch.long),
                                 torch.zeros(1, 0, 2, 3)])
def test_bad_inputs_are_named(bad):
    with pytest.raises(ValueError, match="grids must"):
        loco.loco_distances(bad)
