"""max_min_diverse (DivPrune's greedy selection): reference vs the official loop, and the numpy
CPU path and the Triton kernel vs the reference, exactly, on odd sizes, ties, k = 1 and k = N.

The Triton kernel runs on CPU under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` on
machines without CUDA) and compiled on CUDA when one is present. Selections are indices, so
every comparison is exact.
"""

from __future__ import annotations

import pytest
import torch

import pruneware.kernels.divprune as divprune
from pruneware.kernels import dispatch
from pruneware.kernels.divprune import cpu, reference
from pruneware.kernels.divprune import triton as fused
from tests.official import official_divprune

CUDA = torch.cuda.is_available()

# (G, N, D, k): odd sizes, k = 1, k = N, one token, several groups.
SHAPES = [(1, 1, 5, 1), (1, 63, 17, 1), (2, 63, 17, 63), (3, 577, 33, 144), (1, 577, 64, 577), (4, 100, 256, 37)]


def features(g: int, n: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000 * n + d)
    return torch.randn(g, n, d, generator=gen).to(dtype)


def tied(g: int, n: int, directions: int) -> torch.Tensor:
    """Rows that are copies of a few orthogonal directions: distances are exactly 0 or 1, so
    almost every step is a tie and only the lowest-index rule decides."""
    gen = torch.Generator().manual_seed(n)
    which = torch.randint(0, directions, (g, n), generator=gen)
    scale = torch.rand(g, n, 1, generator=gen) + 0.5  # cosine ignores length
    return torch.nn.functional.one_hot(which, directions).float() * scale


@pytest.mark.parametrize("n, k", [(24, 6), (63, 16), (577, 144)])
def test_reference_matches_the_official_loop(n, k):
    x = features(1, n, 32)
    official = official_divprune(x[0], k / n)
    assert official.numel() == k
    assert torch.equal(reference.max_min_diverse(x, k)[0], official.sort().values)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_path_matches_reference(shape):
    g, n, d, k = shape
    x = features(g, n, d)
    assert torch.equal(cpu.max_min_diverse(x, k), reference.max_min_diverse(x, k))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_interpreted_matches_reference(shape, interpret, nan_poison):
    g, n, d, k = shape
    x = features(g, n, d)
    got = divprune.max_min_diverse(x, k)
    assert got.dtype == torch.long and got.shape == (g, k)
    assert torch.equal(got, reference.max_min_diverse(x, k))


@pytest.mark.parametrize("g, n, directions, k", [(2, 63, 4, 9), (1, 577, 7, 577), (3, 40, 1, 5), (1, 17, 3, 1)])
def test_ties_go_to_the_lowest_index(g, n, directions, k, interpret):
    x = tied(g, n, directions)
    want = reference.max_min_diverse(x, k)
    assert torch.equal(cpu.max_min_diverse(x, k), want)
    assert torch.equal(fused.max_min_diverse(x, k), want)
    if directions == 1:  # every distance is 0: the first k rows, in order
        assert torch.equal(want, torch.arange(k).expand(g, k))


def test_half_precision_inputs_select_in_float32(interpret):
    x = features(2, 63, 24, torch.bfloat16)
    want = reference.max_min_diverse(x, 20)
    assert torch.equal(cpu.max_min_diverse(x, 20), want)
    assert torch.equal(fused.max_min_diverse(x, 20), want)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [*SHAPES, (8, 2880, 4096, 720), (2, 5000, 128, 1250)], ids=str)
def test_triton_cuda_matches_reference(shape, monkeypatch, nan_poison):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    g, n, d, k = shape
    x = features(g, n, d).cuda()
    assert torch.equal(divprune.max_min_diverse(x, k), reference.max_min_diverse(x, k))


def test_k_zero_gives_empty_rows():
    x = features(2, 9, 4)
    for impl in (reference, cpu, divprune):
        out = impl.max_min_diverse(x, 0)
        assert out.shape == (2, 0) and out.dtype == torch.long


@pytest.mark.parametrize(
    "x, k, message",
    [
        (torch.randn(5, 4), 1, r"\[G, N, D\]"),
        (torch.ones(1, 5, 4, dtype=torch.long), 1, "float"),
        (torch.randn(1, 5, 4), 6, r"k=6 is outside \[0, N=5\]"),
        (torch.randn(1, 5, 4), -1, r"k=-1"),
    ],
)
def test_bad_inputs_are_named(x, k, message):
    for impl in (reference, cpu, fused):
        with pytest.raises(ValueError, match=message):
            impl.max_min_diverse(x, k)


def test_triton_names_its_size_limit(monkeypatch, interpret):
    monkeypatch.setattr(fused, "MAX_N", 8)
    with pytest.raises(ValueError, match="N=9 .* limit of 8.*PRUNEWARE_KERNELS=reference"):
        fused.max_min_diverse(torch.randn(1, 9, 4), 2)


@pytest.mark.parametrize("forced, used", [("", "cpu"), ("reference", "reference"), ("triton", "triton")])
def test_dispatch(forced, used, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, forced)
    calls = []
    for name, module in (("cpu", cpu), ("reference", reference), ("triton", fused)):
        monkeypatch.setattr(module, "max_min_diverse", lambda x, k, name=name: calls.append(name))
    divprune.max_min_diverse(torch.randn(1, 4, 3), 2)
    assert calls == [used]


# The optional grid term (`spatial=w`: select on 1 - cos + w * grid distance / diagonal).
SPATIAL_CASES = [((1, 5), 1, 2, 0.5), ((3, 7), 2, 5, 0.25), ((24, 24), 2, 64, 1.0), ((5, 1), 1, 5, 3.0)]


def loop_spatial(x: torch.Tensor, k: int, w: float, grid: tuple[int, int]) -> list[int]:
    """The rule written out for one group: distances by hand, the official loop's steps."""
    h, wd = grid
    n = x.shape[0]
    unit = x / x.norm(dim=1, keepdim=True)
    diagonal = ((h - 1) ** 2 + (wd - 1) ** 2) ** 0.5
    dist = [[1.0 - float(unit[i] @ unit[j]) + w * ((i // wd - j // wd) ** 2 + (i % wd - j % wd) ** 2) ** 0.5 / diagonal
             for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda i: (min(dist[i][j] for j in range(n) if j != i), -i))
    chosen = [first]
    for _ in range(k - 1):
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(dist[i][j] for i in chosen), -j)))
    return sorted(chosen)


@pytest.mark.parametrize("grid, g, k, w", SPATIAL_CASES, ids=str)
def test_spatial_paths_agree_exactly(grid, g, k, w, interpret, nan_poison):
    x = features(g, grid[0] * grid[1], 19)
    want = reference.max_min_diverse(x, k, w, grid)
    assert torch.equal(cpu.max_min_diverse(x, k, w, grid), want)
    assert torch.equal(fused.max_min_diverse(x, k, w, grid), want)
    assert torch.equal(divprune.max_min_diverse(x, k, w, grid), want)


@pytest.mark.parametrize("grid, g, k, w", SPATIAL_CASES[:2], ids=str)
def test_spatial_reference_matches_the_rule_written_out(grid, g, k, w):
    x = features(g, grid[0] * grid[1], 7, seed=3)
    for row in range(g):
        assert reference.max_min_diverse(x[row:row + 1], k, w, grid)[0].tolist() == loop_spatial(x[row], k, w, grid)


def test_spatial_zero_is_the_official_rule():
    x = features(2, 63, 17)
    official = [official_divprune(x[i], 16 / 63).sort().values for i in range(2)]
    for impl in (reference, cpu, divprune):
        assert torch.equal(impl.max_min_diverse(x, 16, 0.0, (7, 9)), torch.stack(official))
        assert torch.equal(impl.max_min_diverse(x, 16, 0.0, None), torch.stack(official))


def test_spatial_keeps_far_apart_look_alikes_in_a_hand_checked_case(interpret):
    # A 1 x 4 grid of features e1, e2, e2, e1. Official (w = 0): every token has a twin at distance 0,
    # so it starts at token 0 and adds the lowest-index e2, token 1: {0, 1}. With w = 1 the distances are
    # 1 - cos + |i - j| / 3: token 0's row minimum is 1 (its twin, 3 cells away), tokens 1 and 2's is 1/3,
    # so it starts at 0 again; then token 2 is farthest from it (1 + 2/3 against 1 + 1/3 and 1): {0, 2}.
    e1, e2 = torch.eye(2)
    x = torch.stack([e1, e2, e2, e1])[None]
    for impl in (reference, cpu, fused):
        assert impl.max_min_diverse(x, 2).tolist() == [[0, 1]]
        assert impl.max_min_diverse(x, 2, 1.0, (1, 4)).tolist() == [[0, 2]]


@pytest.mark.parametrize(
    "spatial, grid, message",
    [(-0.5, (2, 3), r"spatial=-0.5: a finite number >= 0"), (float("nan"), (2, 3), "spatial=nan"),
     ("x", (2, 3), "spatial='x'"), (True, (2, 3), "spatial=True"),
     (0.5, None, r"needs the tokens' \(h, w\) grid with h \* w == N=6"), (0.5, (4, 4), "got grid=")],
)
def test_bad_spatial_values_are_named(spatial, grid, message, interpret):
    x = torch.randn(1, 6, 4)
    for impl in (reference, cpu, fused, divprune):
        with pytest.raises(ValueError, match=message):
            impl.max_min_diverse(x, 2, spatial, grid)
