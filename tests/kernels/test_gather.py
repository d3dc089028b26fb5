"""gather_rows: reference vs a naive loop, Triton vs reference, errors, dispatch.

The Triton kernel runs on CPU under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``
on machines without CUDA) and compiled on CUDA when one is present; with CUDA the
interpreted tests skip and the CUDA tests run instead. A gather copies bits, so every
comparison is exact.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

import pruneware.kernels.gather as gather
from pruneware.kernels import dispatch
from pruneware.kernels.gather import reference
from pruneware.kernels.gather import triton as fused

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@dataclass(frozen=True)
class Case:
    B: int
    L: int
    k: int
    D: int  # hidden width
    d: int  # rotary width
    dtype: torch.dtype = torch.float32
    broadcast: bool = False  # cos/sin are batch-1 tables [1, L, d]
    planes: int = 0  # 0: positions [B, L]; 3 or 4: M-RoPE [G, B, L]

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        flags = ("bc" if self.broadcast else "") + (f"m{self.planes}" if self.planes else "")
        return f"B{self.B}-L{self.L}-k{self.k}-D{self.D}-d{self.d}-{dt}-{flags}"


CASES = [
    Case(1, 63, 1, 65, 8),
    Case(2, 63, 63, 129, 16, torch.bfloat16, broadcast=True),  # keep everything
    Case(3, 1031, 577, 129, 65, torch.bfloat16, planes=3),
    Case(2, 700, 577, 64, 32, torch.float32, broadcast=True, planes=4),
    Case(3, 200, 63, 1, 2, torch.bfloat16),  # width-1 rows
    Case(1, 1031, 577, 256, 128, torch.float16, broadcast=True, planes=3),
    Case(2, 577, 1, 4096, 128, torch.bfloat16, planes=3),  # a real hidden width, one row
]


def make_inputs(case: Case, device: str = DEVICE) -> tuple[torch.Tensor, tuple, torch.Tensor]:
    """Sorted per-sample index, (hidden, cos, sin, 2-D mask) and positions, like a session's."""
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    B, L = case.B, case.L
    index = torch.stack([torch.randperm(L, generator=gen)[: case.k].sort().values for _ in range(B)])
    rope_b = 1 if case.broadcast else B
    hidden = torch.randn(B, L, case.D, generator=gen).to(case.dtype)
    cos = torch.randn(rope_b, L, case.d, generator=gen).to(case.dtype)
    sin = torch.randn(rope_b, L, case.d, generator=gen).to(case.dtype)
    mask = torch.randint(0, 2, (B, L), generator=gen)
    shape = (case.planes, B, L) if case.planes else (B, L)
    positions = torch.randint(0, 4 * L, shape, generator=gen)
    tensors = tuple(t.to(device) for t in (hidden, cos, sin, mask))
    return index.to(device), tensors, positions.to(device)


def naive(index: torch.Tensor, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """One sample at a time with index_select."""
    rows = []
    for b in range(index.shape[0]):
        plane = x.select(seq_dim - 1, b if x.shape[seq_dim - 1] > 1 else 0)
        rows.append(plane.index_select(seq_dim - 1, index[b]))
    return torch.stack(rows, dim=seq_dim - 1)


def check_against_reference(case: Case, device: str) -> None:
    index, tensors, positions = make_inputs(case, device)
    out = gather.gather_rows(index, *tensors, positions=positions)
    want = reference.gather_rows(index, *tensors, positions=positions)
    assert len(out) == len(want) == 5
    for got, ref in zip(out, want, strict=True):
        assert got.dtype == ref.dtype and got.device == ref.device and got.is_contiguous()
        assert got.shape == ref.shape
        assert torch.equal(got, ref), "gathered rows differ from the reference (or were never written)"


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=str)
def test_reference_matches_naive_loop(case: Case) -> None:
    index, (hidden, cos, sin, mask), positions = make_inputs(case, "cpu")
    out = reference.gather_rows(index, hidden, cos, sin, mask, positions=positions)
    seq = positions.dim() - 1
    for got, x, dim in zip(out, (hidden, cos, sin, mask, positions), (1, 1, 1, 1, seq), strict=True):
        assert torch.equal(got, naive(index, x, dim))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_interpreted_matches_reference(case: Case, interpret, nan_poison) -> None:
    check_against_reference(case, "cpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_cuda_matches_reference(case: Case, monkeypatch, nan_poison) -> None:
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    assert dispatch.choose_backend(torch.ones(1, device="cuda")) == "triton"
    check_against_reference(case, "cuda")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_triton_cuda_large_batch(monkeypatch, nan_poison) -> None:
    """Many programs per tensor, as in the benchmark shapes (scaled down)."""
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    check_against_reference(Case(16, 2944, 736, 4096, 128, torch.bfloat16, broadcast=True, planes=3), "cuda")


def _run_both(index, *tensors, positions=None):
    return gather.gather_rows(index, *tensors, positions=positions), reference.gather_rows(
        index, *tensors, positions=positions
    )


@pytest.fixture(params=["interpreted", "cuda"])
def triton_device(request, monkeypatch) -> str:
    """The device on which the Triton backend runs in this process, or skip."""
    if request.param == "cuda":
        if not CUDA:
            pytest.skip("needs a CUDA device")
        monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
        return "cuda"
    if not fused._INTERPRETED:
        pytest.skip("Triton compiles for CUDA in this process")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    return "cpu"


def test_strided_views_int32_index_and_bits(triton_device, nan_poison) -> None:
    """Non-contiguous inputs (HF-style views, expanded positions), int32 index, NaN/inf payloads."""
    dev = triton_device
    hidden = torch.randn(40, 3, 72, device=dev).transpose(0, 1)  # [3, 40, 72], batch stride < seq stride
    hidden[1, 5, 7] = float("nan")
    hidden[2, 9, 0] = float("-inf")
    cos = torch.randn(1, 40, 256, device=dev)[..., ::2]  # rows with stride 2: copied contiguous first
    positions = torch.arange(40, device=dev).expand(3, 3, 40)  # stride 0 in planes and batch
    index = torch.tensor([[5, 9, 39], [0, 1, 2], [5, 9, 20]], dtype=torch.int32, device=dev)
    got, want = _run_both(index, hidden, cos, positions=positions)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.is_contiguous()
        assert torch.equal(g.view(torch.int32) if g.is_floating_point() else g,
                           w.view(torch.int32) if w.is_floating_point() else w)


def test_bool_and_integer_tensors_and_many_slots(triton_device) -> None:
    """More tensors than one launch holds, of every element width."""
    dev = triton_device
    g = torch.Generator().manual_seed(0)
    B, L = 2, 77
    tensors = (
        torch.randint(0, 2, (B, L), generator=g).bool(),
        torch.randint(-100, 100, (B, L, 3), generator=g).to(torch.int8),
        torch.randn(B, L, 33, generator=g).half(),
        torch.randn(1, L, 5, generator=g).double(),
        torch.randint(0, 9, (B, L), generator=g).int(),
        torch.randn(B, L, 1, generator=g),
    )
    tensors = tuple(t.to(dev) for t in tensors)
    assert len(tensors) + 1 > fused.MAX_SLOTS
    index = torch.stack([torch.randperm(L, generator=g)[:30] for _ in range(B)]).to(dev)  # unsorted is fine
    positions = torch.randint(0, L, (4, 1, L), generator=g).to(dev)
    got, want = _run_both(index, *tensors, positions=positions)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_empty_keep_and_out_of_range(triton_device) -> None:
    dev = triton_device
    hidden = torch.randn(2, 9, 16, device=dev)
    none = torch.zeros(2, 0, dtype=torch.long, device=dev)
    (out,) = gather.gather_rows(none, hidden)
    assert out.shape == (2, 0, 16)
    # Triton does not check index values (that would sync); a bad one reads zeros, never faults.
    bad = torch.tensor([[0, 9], [-1, 3]], device=dev)
    (out,) = gather.gather_rows(bad, hidden)
    assert (out[0, 1] == 0).all() and (out[1, 0] == 0).all()
    assert torch.equal(out[0, 0], hidden[0, 0]) and torch.equal(out[1, 1], hidden[1, 3])


def test_reference_rejects_out_of_range_index() -> None:
    with pytest.raises(RuntimeError, match="bounds|index"):
        reference.gather_rows(torch.tensor([[9]]), torch.randn(1, 9, 4))


BAD_INPUTS = [
    (dict(index=torch.ones(2, 3)), r"index must be an integer tensor \(int64 or int32\) \[B, k\]"),
    (dict(index=torch.ones(6, dtype=torch.long)), r"index must be .* got torch.int64 of shape \[6\]"),
    (dict(tensors=()), r"nothing to gather"),
    (dict(tensors=(torch.ones(2, 9, 4, 4),)), r"tensors\[0\] must be \[B, L, W\], .* B=2 .* \[2, 9, 4, 4\]"),
    (dict(tensors=(torch.ones(3, 9, 4),)), r"tensors\[0\] must be .* with B=2 .* got shape \[3, 9, 4\]"),
    (dict(tensors=(torch.ones(2, 9, 4), torch.ones(1, 8, 2))), r"share the sequence length L=9, but tensors\[1\] has L=8"),
    (dict(positions=torch.ones(5, 2, 9, dtype=torch.long)), r"positions must be \[B, L\] or M-RoPE \[3, B, L\]"),
    (dict(positions=torch.ones(2, 10, dtype=torch.long)), r"positions has L=10"),
    (dict(tensors=(torch.ones(2, 9, 2, dtype=torch.complex64),)), r"complex dtype"),
    (dict(index=torch.ones(2, 3, dtype=torch.long), tensors=(torch.ones(2, 0, 4),)), r"empty sequence \(L=0\)"),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bad,message", BAD_INPUTS, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_inputs_raise_clear_errors(bad, message, backend, monkeypatch) -> None:
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
    args = dict(index=torch.zeros(2, 3, dtype=torch.long), tensors=(torch.ones(2, 9, 4),), positions=None)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        gather.gather_rows(args["index"], *args["tensors"], positions=args["positions"])


def test_device_mismatch_and_cpu_without_interpreter(monkeypatch) -> None:
    if CUDA:
        with pytest.raises(ValueError, match=r"tensors\[0\] is on cpu but index is on cuda"):
            gather.gather_rows(torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.ones(1, 2, 3))
    monkeypatch.setattr(fused, "_INTERPRETED", False)
    with pytest.raises(ValueError, match=r"needs CUDA tensors, got cpu; .*TRITON_INTERPRET=1"):
        fused.gather_rows(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 2, 3))


def test_dispatch_picks_reference_on_cpu_unless_forced(monkeypatch) -> None:
    index, hidden = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 2, 3)
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    assert dispatch.choose_backend(index, hidden, None) == "reference"
    if CUDA:
        assert dispatch.choose_backend(index.cuda(), hidden.cuda()) == "triton"
        monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
        assert dispatch.choose_backend(index.cuda(), hidden.cuda()) == "reference"
