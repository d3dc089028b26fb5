"""VisionZip's merge for every image at once (``pruneware.kernels.visionzip.batched_merge``): the
numpy CPU path (bit for bit) and the Triton kernel (slots exactly, states within per-dtype
tolerances) against the plain-torch reference, and the reference against the policy's image loop
(`contextual_merge`, the official rule), on odd sizes, budgets all dominant, half precision and
NaN-poisoned outputs. The kernel runs on CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import pruneware.kernels.visionzip as visionzip
from pruneware.kernels import dispatch
from pruneware.kernels.visionzip import cpu, reference
from pruneware.kernels.visionzip import triton as fused  # noqa: F401 (tests/kernels/conftest.py's interpret fixture reads it)
from pruneware.policies.visionzip import contextual_merge

CUDA = torch.cuda.is_available()
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# (B, n, D, d, budget, share): odd sizes, the official 54/64 split, every kept token dominant.
SHAPES = [(1, 63, 17, 9, 20, 0.8), (2, 101, 33, 17, 37, 54 / 64), (2, 50, 8, 8, 3, 1.0), (1, 200, 40, 24, 64, 54 / 64),
          (3, 7, 5, 3, 6, 0.5)]


def case(b: int, n: int, d_model: int, d_key: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(n + d_model)
    hidden = torch.randn(b, n, d_model, generator=gen).to(dtype)
    return hidden, torch.rand(b, n, generator=gen), torch.randn(b, n, d_key, generator=gen)


def image_by_image(hidden, scores, keys, budget, share):
    """The policy's loop for one image per row: top-k dominant, then `contextual_merge`."""
    slots, states = [], []
    for b in range(hidden.shape[0]):
        n_dominant = reference.split(budget, share)
        dominant = scores[b].topk(n_dominant).indices.sort().values
        rest = torch.ones(hidden.shape[1], dtype=torch.bool)
        rest[dominant] = False
        rest = rest.nonzero().squeeze(1)
        kept, kept_states = dominant, hidden[b, dominant]
        if budget > n_dominant:
            targets, merged = contextual_merge(hidden[b, rest], keys[b, rest], budget - n_dominant)
            kept, order = torch.cat([dominant, rest[targets]]).sort()
            kept_states = torch.cat([kept_states, merged])[order]
        slots.append(kept)
        states.append(kept_states)
    return torch.stack(slots), torch.stack(states)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_the_image_loop(shape):
    hidden, scores, keys = case(*shape[:4])
    slots, states = reference.batched_merge(hidden, scores, keys, *shape[4:])
    want_slots, want_states = image_by_image(hidden, scores, keys, *shape[4:])
    assert torch.equal(slots, want_slots)
    torch.testing.assert_close(states, want_states, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_path_is_the_reference_bit_for_bit(shape, dtype):
    hidden, scores, keys = case(*shape[:4], dtype)
    want = reference.batched_merge(hidden, scores, keys, *shape[4:])
    got = cpu.batched_merge(hidden, scores, keys, *shape[4:])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_interpreted_matches_reference(shape, dtype, interpret, nan_poison):
    hidden, scores, keys = case(*shape[:4], dtype)
    want = reference.batched_merge(hidden, scores, keys, *shape[4:])
    slots, states = visionzip.batched_merge(hidden, scores, keys, *shape[4:])
    assert torch.equal(slots, want[0])
    assert not states.float().isnan().any()  # every output row written
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(states.float(), want[1].float(), atol=atol, rtol=rtol)


def test_merging_changes_the_contextual_states():
    """The check can fail: a contextual token is not its target's own state."""
    hidden, scores, keys = case(1, 63, 17, 9)
    slots, states = cpu.batched_merge(hidden, scores, keys, 20, 0.8)
    assert not torch.equal(states, hidden[0, slots[0]][None])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_triton_cuda_matches_reference(monkeypatch, nan_poison):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    hidden, scores, keys = case(8, 576, 4096, 1024, torch.float16)
    want = reference.batched_merge(hidden, scores, keys, 144, 54 / 64)
    slots, states = visionzip.batched_merge(hidden.cuda(), scores.cuda(), keys.cuda(), 144, 54 / 64)
    assert torch.equal(slots.cpu(), want[0])
    torch.testing.assert_close(states.cpu().float(), want[1].float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "shapes, budget, share, message",
    [
        (((5, 4), (1, 5), (1, 5, 3)), 2, 0.5, r"hidden must be a float \[B, n, D\]"),
        (((1, 5, 4), (1, 4), (1, 5, 3)), 2, 0.5, r"scores must be \[B, n\] = \(1, 5\)"),
        (((1, 5, 4), (1, 5), (1, 4, 3)), 2, 0.5, r"keys must be \[B, n, d\] with B, n = \(1, 5\)"),
        (((1, 5, 4), (1, 5), (1, 5, 3)), 5, 0.5, r"budget=5 is outside \(0, n=5\)"),
        (((1, 5, 4), (1, 5), (1, 5, 3)), 2, 1.5, r"share=1.5 is outside \(0, 1\]"),
    ],
)
def test_bad_inputs_are_named(shapes, budget, share, message):
    tensors = [torch.randn(s) for s in shapes]
    for impl in (reference, cpu, fused):
        with pytest.raises(ValueError, match=message):
            impl.batched_merge(*tensors, budget, share)
