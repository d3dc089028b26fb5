"""duplication_aware (DART's selection): the reference vs the policy's per-pivot rule, and the
numpy CPU path and the Triton kernel vs the reference, exactly, on odd sizes, ties, missing text
pivots, k = 1 and k = n.

The Triton kernel runs on CPU under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` on
machines without CUDA) and compiled on CUDA when one is present. Selections are indices, so
every comparison is exact; half-precision inputs select on the same similarity matrix.
"""

from __future__ import annotations

import pytest
import torch

import pruneware.kernels.dart as dart
from pruneware.kernels import dispatch
from pruneware.kernels.dart import cpu, reference
from pruneware.kernels.dart import triton as fused

CUDA = torch.cuda.is_available()

# (G, n, D, p, k): odd sizes, k = 1, k = n - 1, no text pivots, one token.
SHAPES = [(1, 1, 5, 4, 1), (1, 63, 17, 4, 1), (2, 63, 17, 4, 62), (3, 577, 33, 4, 144), (2, 100, 16, 0, 37),
          (1, 40, 8, 7, 39)]


def case(g: int, n: int, d: int, p: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 1000 * n + d)
    visual = torch.randn(g, n, d, generator=gen).to(dtype)
    norms = torch.rand(g, n, generator=gen)
    pivots = torch.randn(g, p, d, generator=gen).to(dtype)
    valid = torch.rand(g, p, generator=gen) > 0.3
    return visual, norms, pivots, valid


def one_by_one(visual, norms, pivots, valid, k, pivot_image):
    """The policy's earlier rule, image by image: each pivot's share by `topk` over the free tokens."""
    out = []
    for b in range(visual.shape[0]):
        x, n = visual[b], visual.shape[1]
        if k >= n:
            out.append(torch.arange(n))
            continue
        p_img = min(pivot_image, k)
        image = norms[b].topk(p_img).indices.sort().values
        free = torch.ones(n, dtype=torch.bool)
        free[image] = False
        turns = torch.cat([x[image], pivots[b][valid[b]]])
        share, extra = divmod(k - p_img, max(1, turns.shape[0]))
        kept = [image]
        for i, pivot in enumerate(turns):
            take = min(share + (i < extra), int(free.sum()))
            if take:
                candidates = free.nonzero().squeeze(1)
                sim = torch.nn.functional.cosine_similarity(pivot[None], x[candidates], dim=-1)
                picked = candidates[(-sim).topk(take).indices]
                free[picked] = False
                kept.append(picked)
        out.append(torch.cat(kept).sort().values)
    return torch.stack(out)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_the_per_pivot_rule(shape):
    g, n, d, p, k = shape
    x = case(g, n, d, p)
    assert torch.equal(reference.duplication_aware(*x, k, 4), one_by_one(*x, k, 4))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_path_matches_reference(shape):
    g, n, d, p, k = shape
    x = case(g, n, d, p)
    assert torch.equal(cpu.duplication_aware(*x, k, 4), reference.duplication_aware(*x, k, 4))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_interpreted_matches_reference(shape, interpret, nan_poison):
    g, n, d, p, k = shape
    x = case(g, n, d, p)
    got = dart.duplication_aware(*x, k, 4)
    assert got.dtype == torch.long and got.shape == (g, k)
    assert torch.equal(got, reference.duplication_aware(*x, k, 4))


@pytest.mark.parametrize("pivot_image", [0, 1, 4, 9])
def test_pivot_counts_and_no_text_pivots(pivot_image, interpret):
    x = case(2, 31, 6, 3)
    x[3][1] = False  # the second image has no text pivot
    want = reference.duplication_aware(*x, 12, pivot_image)
    if pivot_image:  # without any pivot, the earlier rule kept nothing; now the largest key norms
        assert torch.equal(want, one_by_one(*x, 12, pivot_image))
    else:
        assert torch.equal(want[1], x[1][1].topk(12).indices.sort().values)
    assert torch.equal(cpu.duplication_aware(*x, 12, pivot_image), want)
    assert torch.equal(fused.duplication_aware(*x, 12, pivot_image), want)


def test_ties_go_to_the_lowest_index(interpret):
    """Copies of one token tie exactly in similarity: the lowest indices are taken first."""
    visual = torch.randn(1, 5, 4).repeat(1, 6, 1)  # 30 tokens, each of 5 states six times
    norms = torch.arange(30, dtype=torch.float32)[None]
    pivots, valid = torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool)
    want = reference.duplication_aware(visual, norms, pivots, valid, 11, 1)
    assert torch.equal(cpu.duplication_aware(visual, norms, pivots, valid, 11, 1), want)
    assert torch.equal(fused.duplication_aware(visual, norms, pivots, valid, 11, 1), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_select_on_the_same_similarities(dtype, interpret):
    x = case(2, 63, 24, 4, dtype)
    want = reference.duplication_aware(*x, 20, 4)
    assert torch.equal(cpu.duplication_aware(*x, 20, 4), want)
    assert torch.equal(fused.duplication_aware(*x, 20, 4), want)


def test_a_full_budget_keeps_everything():
    x = case(2, 9, 4, 2)
    for impl in (reference, cpu, dart):
        assert torch.equal(impl.duplication_aware(*x, 9, 4), torch.arange(9).expand(2, 9))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [*SHAPES, (8, 2880, 4096, 4, 720)], ids=str)
def test_triton_cuda_matches_reference(shape, monkeypatch, nan_poison):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    g, n, d, p, k = shape
    x = [t.cuda() for t in case(g, n, d, p)]
    assert torch.equal(dart.duplication_aware(*x, k, 4), reference.duplication_aware(*x, k, 4))


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(5, 4), torch.rand(5), torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), 1), r"\[G, n, D\]"),
        ((torch.randn(1, 5, 4), torch.rand(1, 4), torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), 1),
         r"norms must be \[G, n\]"),
        ((torch.randn(1, 5, 4), torch.rand(1, 5), torch.randn(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), 1),
         r"text_pivots must be \[G, p, D\]"),
        ((torch.randn(1, 5, 4), torch.rand(1, 5), torch.randn(1, 2, 4), torch.ones(1, 2), 1), "text_valid must be bool"),
        ((torch.randn(1, 5, 4), torch.rand(1, 5), torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), 6),
         r"k=6 is outside \[0, n=5\]"),
    ],
)
def test_bad_inputs_are_named(args, message):
    for impl in (reference, cpu, fused):
        with pytest.raises(ValueError, match=message):
            impl.duplication_aware(*args, 4)


def test_triton_names_its_size_limit(monkeypatch, interpret):
    monkeypatch.setattr(fused, "MAX_N", 8)
    with pytest.raises(ValueError, match="n=9 .* limit of 8.*PRUNEWARE_KERNELS=reference"):
        fused.duplication_aware(*case(1, 9, 4, 1), 2, 4)


@pytest.mark.parametrize("forced, used", [("", "cpu"), ("reference", "reference"), ("triton", "triton")])
def test_dispatch(forced, used, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, forced)
    calls = []
    for name, module in (("cpu", cpu), ("reference", reference), ("triton", fused)):
        monkeypatch.setattr(module, "duplication_aware", lambda *a, name=name: calls.append(name))
    dart.duplication_aware(*case(1, 4, 3, 1), 2, 4)
    assert calls == [used]


def text_case(g: int, t: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Left-aligned text rows [G, T, D], their validity (group 1 has 2 rows, group 2 none) and key norms."""
    gen = torch.Generator().manual_seed(seed + 7 * t + d)
    hidden = torch.randn(g, t, d, generator=gen).to(dtype)
    valid = torch.ones(g, t, dtype=torch.bool)
    if g > 1:
        valid[1, 2:] = False
    if g > 2:
        valid[2] = False
    return hidden, valid, torch.rand(g, t, generator=gen)


def hand_text_pivots(hidden, valid, norms, pivot_text):
    """The policy's earlier rule: the top `pivot_text` valid rows by norm, in position order."""
    p = min(pivot_text, valid.shape[1])
    rows = torch.where(valid, norms, float("-inf")).topk(p, dim=1).indices.sort(dim=1).values
    return torch.take_along_dim(hidden, rows[..., None], dim=1), valid.gather(1, rows)


@pytest.mark.parametrize("shape", [(1, 63, 17, 9, 20), (3, 101, 33, 5, 37), (2, 40, 8, 2, 39), (3, 577, 64, 12, 144)],
                         ids=str)
@pytest.mark.parametrize("pivot_text", [0, 1, 4, 7])
def test_select_from_text_rows_matches_the_two_steps(shape, pivot_text, interpret, nan_poison):
    """`select` = the text pivots by key norm, then `duplication_aware`: on every path, exactly."""
    g, n, d, t, k = shape
    visual, norms, _, _ = case(g, n, d, 0)
    hidden, valid, text_norms = text_case(g, t, d)
    pivots, ok = hand_text_pivots(hidden, valid, text_norms, pivot_text)
    want = reference.duplication_aware(visual, norms, pivots, ok, k, 4)
    assert torch.equal(reference.select(visual, norms, hidden, valid, text_norms, k, 4, pivot_text), want)
    assert torch.equal(cpu.select(visual, norms, hidden, valid, text_norms, k, 4, pivot_text), want)
    assert torch.equal(fused.select(visual, norms, hidden, valid, text_norms, k, 4, pivot_text), want)
    if 0 < pivot_text < t:  # the check can fail: other text rows give other tokens
        shuffled = reference.select(visual, norms, hidden, valid, text_norms.flip(1), k, 4, pivot_text)
        assert not torch.equal(shuffled, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_select_in_half_precision(dtype, interpret):
    visual, norms, _, _ = case(2, 63, 24, 0, dtype)
    hidden, valid, text_norms = text_case(2, 9, 24, dtype=dtype)
    want = reference.select(visual, norms, hidden, valid, text_norms, 20, 4, 4)
    assert torch.equal(cpu.select(visual, norms, hidden, valid, text_norms, 20, 4, 4), want)
    assert torch.equal(fused.select(visual, norms, hidden, valid, text_norms, 20, 4, 4), want)


@pytest.mark.parametrize(
    "text_shape, valid_shape, norms_shape, pivot_text, message",
    [
        ((2, 5, 8), (2, 5), (2, 5), 4, r"text_hidden must be \[G, T, D\] with G=1, D=8"),
        ((1, 5, 8), (1, 4), (1, 5), 4, r"text_valid must be bool \[G, T\] = \(1, 5\)"),
        ((1, 5, 8), (1, 5), (1, 3), 4, r"text_norms must be \[G, T\] = \(1, 5\)"),
        ((1, 5, 8), (1, 5), (1, 5), -1, "pivot_text must be >= 0, got -1"),
    ],
)
def test_bad_text_rows_are_named(text_shape, valid_shape, norms_shape, pivot_text, message):
    visual, norms, _, _ = case(1, 9, 8, 0)
    for impl in (reference, cpu, fused):
        with pytest.raises(ValueError, match=message):
            impl.select(visual, norms, torch.randn(text_shape), torch.ones(valid_shape, dtype=torch.bool),
                        torch.rand(norms_shape), 3, 4, pivot_text)
