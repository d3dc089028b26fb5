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
