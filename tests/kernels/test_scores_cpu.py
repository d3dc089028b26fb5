"""The CPU path of the score kernel (`kernels/scores/cpu.py`) computes the reference's numbers:
odd sizes, GQA, causal positions, padding masks, rows with no allowed key, per-head weights,
the query block, weights made from that block, and 16-bit inputs (per-dtype tolerances)."""

from __future__ import annotations

import pytest
import torch

from pruneware.kernels import scores
from pruneware.kernels.scores import cpu, reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}  # both compute in float32


def make(B, H, Hkv, T, L, d, dtype=torch.float32, seed=0, positions=True, mask=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, d, generator=g).to(dtype)
    pos = torch.randint(0, L, (B, T), generator=g) if positions else None
    km = torch.rand(B, L, generator=g) > 0.3 if mask else None
    return q, k, pos, km


CASES = [  # B, H, Hkv, T, L, d
    (1, 1, 1, 1, 1, 8), (1, 8, 8, 1, 63, 16), (2, 8, 2, 5, 63, 16), (3, 4, 4, 7, 577, 8), (2, 6, 3, 13, 64, 32),
]


@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("positions", [False, True], ids=["no-pos", "causal"])
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "padded"])
@pytest.mark.parametrize("per_head_weights", [False, True], ids=["row-w", "head-w"])
def test_cpu_path_equals_reference(shape, positions, mask, per_head_weights):
    B, H, Hkv, T, L, d = shape
    q, k, pos, km = make(*shape, positions=positions, mask=mask)
    w = torch.rand(B, H, T) if per_head_weights else torch.rand(B, T)
    block = positions
    given = None if km is None else km.clone()
    got_s, got_qq = cpu.attention_scores(q, k, w, query_positions=pos, key_mask=km, return_query_block=block)
    assert km is None or torch.equal(km, given)  # the caller's mask is read, never written
    ref_s, ref_qq = reference.attention_scores(q, k, w, query_positions=pos, key_mask=km, return_query_block=block)
    torch.testing.assert_close(got_s, ref_s, atol=1e-5, rtol=1e-5)
    if block:
        torch.testing.assert_close(got_qq, ref_qq, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got_s).all()


def test_rows_with_no_allowed_key_contribute_zero():
    q, k, _, _ = make(2, 4, 2, 3, 9, 8)
    km = torch.zeros(2, 9, dtype=torch.bool)
    km[1, 4:] = True  # sample 0 has no real key at all; sample 1's row at position 2 sees none
    pos = torch.tensor([[1, 5, 8], [2, 5, 8]])
    got, _ = cpu.attention_scores(q, k, torch.ones(2, 3), query_positions=pos, key_mask=km)
    ref, _ = reference.attention_scores(q, k, torch.ones(2, 3), query_positions=pos, key_mask=km)
    torch.testing.assert_close(got, ref)
    assert (got[0] == 0).all() and torch.isfinite(got).all()


def test_live_rows_skips_zeroing_only_rows_of_weight_zero():
    """live_rows=True (the engine's promise: a weighed row sees a key): the same scores when the
    rows that see no key weigh 0, and finite; without the promise kept, those rows would count."""
    q, k, _, _ = make(2, 4, 2, 3, 9, 8)
    km = torch.zeros(2, 9, dtype=torch.bool)
    km[1, 4:] = True  # sample 0 has no real key at all; sample 1's row at position 2 sees none
    pos = torch.tensor([[1, 5, 8], [2, 5, 8]])
    w = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 2.0]])  # the rows that see no key weigh 0
    got, _ = scores.attention_scores(q, k, w, query_positions=pos, key_mask=km, live_rows=True)
    ref, _ = reference.attention_scores(q, k, w, query_positions=pos, key_mask=km)
    torch.testing.assert_close(got, ref)
    assert (got[0] == 0).all() and (got[1, :4] == 0).all() and torch.isfinite(got).all()
    broken, _ = scores.attention_scores(q, k, torch.ones(2, 3), query_positions=pos, key_mask=km, live_rows=True)
    assert (broken[0] != 0).any()  # a weighed row that sees no key is not zeroed: the promise matters


@pytest.mark.parametrize("per_head", [False, True], ids=["summed", "per-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_from_the_block_equal_two_reference_calls(per_head, dtype):
    """A callable `weights` gives what the reference gives for the block and then its weights."""
    q, k, pos, km = make(2, 6, 3, 5, 31, 16, dtype=dtype)

    def prior(block):  # any function of the block: here AdaptInfer's column sums
        return block.sum(dim=-2) + block.sum(dim=-1)

    got_s, got_qq = scores.attention_scores(q, k, prior, query_positions=pos, key_mask=km, return_query_block=True,
                                            per_head_block=per_head)
    _, ref_qq = reference.attention_scores(q, k, torch.ones(2, 5), query_positions=pos, key_mask=km,
                                           return_query_block=True, per_head_block=per_head)
    ref_s, _ = reference.attention_scores(q, k, prior(ref_qq), query_positions=pos, key_mask=km)
    torch.testing.assert_close(got_qq, ref_qq, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(got_s, ref_s, atol=TOL[dtype], rtol=TOL[dtype])


def test_reference_backend_runs_block_weights_too(monkeypatch):
    """The dispatcher composes a callable `weights` for the reference (and Triton) backends."""
    monkeypatch.setenv("PRUNEWARE_KERNELS", "reference")
    q, k, pos, km = make(1, 4, 4, 3, 12, 8)
    got, _ = scores.attention_scores(q, k, lambda b: b.sum(dim=-1), query_positions=pos, key_mask=km)
    monkeypatch.delenv("PRUNEWARE_KERNELS")
    fast, _ = scores.attention_scores(q, k, lambda b: b.sum(dim=-1), query_positions=pos, key_mask=km)
    torch.testing.assert_close(got, fast)


def test_position_values_are_checked_unless_told_not_to():
    q, k, _, _ = make(1, 2, 2, 2, 5, 8)
    bad = torch.tensor([[0, 5]])
    with pytest.raises(ValueError, match="query_positions must index the L=5 keys"):
        cpu.attention_scores(q, k, torch.ones(1, 2), query_positions=bad)
    with pytest.raises(ValueError, match="weights must be a float tensor"):
        cpu.attention_scores(q, k, lambda b: b.sum(-1).long(), query_positions=torch.tensor([[0, 4]]))
