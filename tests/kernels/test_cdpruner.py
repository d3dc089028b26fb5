"""conditional_dpp (CDPruner's greedy DPP MAP): reference vs the official loop, and the numpy CPU
path and the Triton kernel vs the reference, exactly, on odd sizes, k = 1, k = N, a kernel whose rank runs out, ties
and half-precision inputs.

The Triton kernel runs on CPU under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` on
machines without CUDA) and compiled on CUDA when one is present. Selections are indices, so
every comparison is exact; both backends select on the same float32 kernel matrix
(``dpp_kernel``), whatever the input dtype.
"""

from __future__ import annotations

import pytest
import torch

import pruneware.kernels.cdpruner as cdpruner
from pruneware.kernels import dispatch
from pruneware.kernels.cdpruner import cpu, reference
from pruneware.kernels.cdpruner import triton as fused
from tests.official import official_cdpruner

CUDA = torch.cuda.is_available()

# (G, N, D, k): odd sizes, k = 1, k = N, one token, several groups; D < k exhausts the rank.
SHAPES = [(1, 1, 5, 1), (1, 63, 17, 1), (2, 63, 17, 63), (3, 101, 33, 37), (1, 577, 96, 144), (4, 100, 256, 37)]


def case(g: int, n: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 1000 * n + d)
    return torch.randn(g, n, d, generator=gen).to(dtype), torch.rand(g, n, generator=gen) + 1e-3


def official_relevance(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The official code's relevance for one image, with x as its own image embeddings."""
    unit = torch.nn.functional.normalize
    rel = -(unit(x, dim=-1) @ unit(text, dim=-1).T).mean(dim=-1)
    return (rel - rel.min() + 1e-6) / (rel.max() - rel.min())


@pytest.mark.parametrize("n, d, k", [(24, 32, 6), (63, 96, 16), (100, 128, 50), (577, 640, 144), (576, 96, 90)])
def test_reference_matches_the_official_loop(n, d, k):
    gen = torch.Generator().manual_seed(n)
    x, text = torch.randn(1, n, d, generator=gen), torch.randn(5, d, generator=gen)
    official = official_cdpruner(x, x, text, k)[0].nonzero().squeeze(1)
    assert official.numel() == k
    assert torch.equal(reference.conditional_dpp(x, official_relevance(x[0], text)[None], k)[0], official)


def test_rank_exhaustion_keeps_k_distinct_tokens_where_the_official_loop_keeps_fewer():
    x, _ = case(1, 200, 16)
    text = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    rel = official_relevance(x[0], text)[None]
    official = official_cdpruner(x, x, text, 40)
    assert official.sum() < 40  # NaN residuals: the official loop re-picks tokens
    got = reference.conditional_dpp(x, rel, 40)
    assert got.unique().numel() == 40
    # Before the rank (16) runs out, both keep the same tokens.
    assert torch.equal(reference.conditional_dpp(x, rel, 12)[0], official_cdpruner(x, x, text, 12)[0].nonzero()[:, 0])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_path_matches_reference(shape):
    g, n, d, k = shape
    x, rel = case(g, n, d)
    assert torch.equal(cpu.conditional_dpp(x, rel, k), reference.conditional_dpp(x, rel, k))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_interpreted_matches_reference(shape, interpret, nan_poison):
    g, n, d, k = shape
    x, rel = case(g, n, d)
    got = cdpruner.conditional_dpp(x, rel, k)
    assert got.dtype == torch.long and got.shape == (g, k)
    assert torch.equal(got, reference.conditional_dpp(x, rel, k))
    assert all(row.unique().numel() == k for row in got)


@pytest.mark.parametrize("g, n, directions, k", [(2, 63, 4, 9), (1, 40, 1, 5), (1, 17, 3, 17)])
def test_ties_go_to_the_lowest_index(g, n, directions, k, interpret):
    """Copies of a few orthogonal directions, all equally relevant: every residual ties."""
    gen = torch.Generator().manual_seed(n)
    which = torch.randint(0, directions, (g, n), generator=gen)
    x = torch.nn.functional.one_hot(which, directions).float() * (torch.rand(g, n, 1, generator=gen) + 0.5)
    rel = torch.ones(g, n)
    want = reference.conditional_dpp(x, rel, k)
    assert torch.equal(fused.conditional_dpp(x, rel, k), want)
    assert torch.equal(cpu.conditional_dpp(x, rel, k), want)
    if directions == 1:  # one direction: each round takes the lowest index left
        assert torch.equal(want, torch.arange(k).expand(g, k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_select_in_float32(dtype, interpret):
    x, rel = case(2, 63, 24, dtype)
    want = reference.conditional_dpp(x.float(), rel, 20)
    assert torch.equal(reference.conditional_dpp(x, rel, 20), want)
    assert torch.equal(fused.conditional_dpp(x, rel, 20), want)
    assert torch.equal(cpu.conditional_dpp(x, rel, 20), want)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [*SHAPES, (8, 2880, 4096, 320), (2, 5000, 128, 200)], ids=str)
def test_triton_cuda_matches_reference(shape, monkeypatch, nan_poison):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    g, n, d, k = shape
    x, rel = case(g, n, d)
    x, rel = x.cuda(), rel.cuda()
    assert torch.equal(cdpruner.conditional_dpp(x, rel, k), reference.conditional_dpp(x, rel, k))


def test_k_zero_gives_empty_rows():
    x, rel = case(2, 9, 4)
    for impl in (reference, cpu, cdpruner):
        out = impl.conditional_dpp(x, rel, 0)
        assert out.shape == (2, 0) and out.dtype == torch.long


@pytest.mark.parametrize(
    "x, rel, k, message",
    [
        (torch.randn(5, 4), torch.rand(5), 1, r"\[G, N, D\]"),
        (torch.ones(1, 5, 4, dtype=torch.long), torch.rand(1, 5), 1, "float"),
        (torch.randn(1, 5, 4), torch.rand(1, 4), 1, r"relevance must be \[G, N\] = \(1, 5\)"),
        (torch.randn(1, 5, 4), torch.rand(1, 5), 6, r"k=6 is outside \[0, N=5\]"),
        (torch.randn(1, 5, 4), torch.rand(1, 5), -1, r"k=-1"),
    ],
)
def test_bad_inputs_are_named(x, rel, k, message):
    for impl in (reference, cpu, fused):
        with pytest.raises(ValueError, match=message):
            impl.conditional_dpp(x, rel, k)


def test_triton_names_its_size_limit(monkeypatch, interpret):
    monkeypatch.setattr(fused, "MAX_N", 8)
    with pytest.raises(ValueError, match="N=9 .* limit of 8.*PRUNEWARE_KERNELS=reference"):
        fused.conditional_dpp(torch.randn(1, 9, 4), torch.rand(1, 9), 2)


@pytest.mark.parametrize("forced, used", [("", "cpu"), ("reference", "reference"), ("triton", "triton")])
def test_dispatch(forced, used, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, forced)
    calls = []
    for name, module in (("cpu", cpu), ("reference", reference), ("triton", fused)):
        monkeypatch.setattr(module, "conditional_dpp", lambda x, r, k, name=name: calls.append(name))
    cdpruner.conditional_dpp(torch.randn(1, 4, 3), torch.rand(1, 4), 2)
    assert calls == [used]


def select_case(g: int, n: int, d: int, t: int, dtype: torch.dtype = torch.float32):
    """G groups of N tokens and T instruction rows each; group 1 has 2 real rows, group 2 none."""
    gen = torch.Generator().manual_seed(n + 10 * t)
    x, text = torch.randn(g, n, d, generator=gen).to(dtype), torch.randn(g, t, d, generator=gen).to(dtype)
    text_valid = torch.ones(g, t, dtype=torch.bool)
    if g > 1:
        text_valid[1, 2:] = False
    if g > 2:
        text_valid[2] = False
    return x, text, text_valid


SELECT_SHAPES = [(1, 63, 17, 5, 20), (3, 101, 33, 9, 37), (2, 257, 48, 12, 64), (1, 10, 4, 3, 10), (2, 40, 8, 1, 1)]


@pytest.mark.parametrize("shape", SELECT_SHAPES, ids=str)
@pytest.mark.parametrize("sign, theta", [("positive", None), ("negative", None), ("none", None), ("positive", 0.5)])
def test_select_is_relevance_then_the_greedy_map_on_every_path(shape, sign, theta, interpret, nan_poison):
    g, n, d, t, k = shape
    x, text, text_valid = select_case(g, n, d, t)
    valid = torch.ones(g, n, dtype=torch.bool)
    relevance = reference.instruction_relevance(x, valid, text, text_valid, sign, theta)
    want = reference.conditional_dpp(x, relevance, k)
    assert torch.equal(reference.select(x, text, text_valid, k, sign, theta), want)
    assert torch.equal(cpu.select(x, text, text_valid, k, sign, theta), want)
    assert torch.equal(fused.select(x, text, text_valid, k, sign, theta), want)
    # The CPU path's kernel matrix is the reference's, bit for bit (the check can fail: see below).
    kernel = torch.from_numpy(cpu.conditional_kernel(x, text, text_valid, sign, theta))
    assert torch.equal(kernel, reference.dpp_kernel(x, relevance))
    if sign == "positive" and theta is None:
        other = reference.instruction_relevance(x, valid, text, text_valid, "negative")
        assert not torch.equal(kernel, reference.dpp_kernel(x, other))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_select_in_half_precision(dtype, interpret):
    x, text, text_valid = select_case(2, 63, 24, 5, dtype)
    want = reference.select(x, text, text_valid, 20)
    assert torch.equal(cpu.select(x, text, text_valid, 20), want)
    assert torch.equal(fused.select(x, text, text_valid, 20), want)


@pytest.mark.parametrize(
    "text_shape, valid_shape, k, sign, message",
    [
        ((2, 5, 4), (2, 5), 1, "positive", r"text must be \[G, T, D\] with G=1, D=4"),
        ((1, 5, 4), (1, 4), 1, "positive", r"text_valid must be bool \[G, T\] = \(1, 5\)"),
        ((1, 5, 4), (1, 5), 7, "positive", r"k=7 is outside \[0, N=6\]"),
        ((1, 5, 4), (1, 5), 1, "sideways", "sign must be one of"),
    ],
)
def test_bad_select_inputs_are_named(text_shape, valid_shape, k, sign, message):
    for impl in (reference, cpu, fused):
        with pytest.raises(ValueError, match=message):
            impl.select(torch.randn(1, 6, 4), torch.randn(text_shape), torch.ones(valid_shape, dtype=torch.bool), k,
                        sign)
