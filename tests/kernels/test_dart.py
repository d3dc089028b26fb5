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


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route duplication_aware to the Triton kernel, interpreted on CPU."""
    if not fused._INTERPRETED:
        if CUDA:
            pytest.skip("Triton compiles for CUDA in this process; the CUDA tests cover it")
        pytest.fail("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")


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
