"""DART's key norms and the rotation that brings a padded sample's keys to the positions it has
alone (`kernels.dart.rotate_back`, `key_norms`): the reference is transformers' rotation by minus
the shift and a float32 L1 sum; the numpy CPU path equals it bit for bit (same operations, order
and memory layout), the Triton kernels within per-dtype tolerances, on odd sizes, strided keys
and NaN-poisoned outputs, under ``TRITON_INTERPRET=1`` on the CPU."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import pruneware.kernels.dart as dart
from pruneware.kernels import dispatch
from pruneware.kernels.dart import cpu, reference
from pruneware.kernels.dart import triton as fused

# (B, H, L, d): one token, odd lengths and head counts, a head size that is not a power of two.
SHAPES = [(1, 1, 1, 2), (2, 3, 63, 18), (3, 2, 577, 64), (1, 4, 40, 96)]
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def keys(b: int, h: int, length: int, d: int, dtype=torch.float32, strided: bool = True, seed: int = 0):
    """Keys [B, H, L, d], laid out [B, L, H, d] as transformers' projections leave them (strided)."""
    gen = torch.Generator().manual_seed(seed + length + d)
    k = torch.randn(b, length, h, d, generator=gen) * 3
    return (k.transpose(1, 2) if strided else k.transpose(1, 2).contiguous()).to(dtype)


def tables(b: int, d: int, shifts: list[int], scaling: float = 1.0):
    """[B, 2, d] RoPE cos and sin (Llama's default frequencies) at each shift and at position 0."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    positions = torch.tensor([[s, 0] for s in shifts], dtype=torch.float32)  # [B, 2]
    angles = positions[..., None] * inv_freq  # [B, 2, d/2]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rotating_back_undoes_transformers_rotation(shape):
    """Keys rotated by RoPE at position p + shift, rotated back by the shift: RoPE at p."""
    b, h, length, d = shape
    raw = keys(b, h, length, d, strided=False)
    shifts = [5 * i + 3 for i in range(b)]
    positions = torch.arange(length)[None] + torch.tensor(shifts)[:, None]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = positions[..., None].double() * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    _, moved = apply_rotary_pos_emb(raw.double(), raw.double(), emb.cos(), emb.sin())
    angles0 = torch.arange(length)[None, :, None].double() * inv_freq
    emb0 = torch.cat([angles0, angles0], dim=-1).expand(b, -1, -1)
    _, alone = apply_rotary_pos_emb(raw.double(), raw.double(), emb0.cos(), emb0.sin())
    cos, sin = tables(b, d, shifts, scaling=1.5)
    back = reference.rotate_back(moved.float(), cos, sin)
    torch.testing.assert_close(back, alone.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("strided", [True, False])
def test_cpu_path_is_the_reference_bit_for_bit(shape, strided):
    b, h, length, d = shape
    key = keys(b, h, length, d, strided=strided)
    cos, sin = tables(b, d, list(range(0, 7 * b, 7)), scaling=1.25)
    rotated = cpu.rotate_back(key, cos, sin)
    want = reference.rotate_back(key, cos, sin)
    assert torch.equal(rotated, want) and rotated.stride() == want.stride()
    assert torch.equal(cpu.key_norms(rotated), reference.key_norms(want))
    assert torch.equal(cpu.key_norms(key), reference.key_norms(key))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_triton_interpreted_matches_reference(shape, dtype, interpret, nan_poison):
    b, h, length, d = shape
    key = keys(b, h, length, d, dtype)
    cos, sin = tables(b, d, list(range(3, 3 + 11 * b, 11)))
    atol, rtol = TOLERANCE[dtype]
    rotated = fused.rotate_back(key, cos, sin)
    torch.testing.assert_close(rotated, reference.rotate_back(key, cos, sin), atol=atol * 4, rtol=rtol)
    torch.testing.assert_close(fused.key_norms(key), reference.key_norms(key), atol=atol * h * d, rtol=rtol)


def test_half_precision_takes_the_reference_on_the_cpu_path():
    key = keys(2, 2, 9, 8, torch.bfloat16)
    cos, sin = tables(2, 8, [1, 4])
    assert torch.equal(cpu.rotate_back(key, cos, sin), reference.rotate_back(key, cos, sin))
    assert torch.equal(cpu.key_norms(key), reference.key_norms(key))


@pytest.mark.parametrize(
    "key_shape, table_shape, message",
    [
        ((2, 3, 4), (2, 2, 4), r"key must be a float \[B, H, L, d\]"),
        ((2, 1, 3, 5), (2, 2, 5), "head size must be even"),
        ((2, 1, 3, 4), (2, 1, 4), r"cos must be \[B, 2, d\] = \(2, 2, 4\)"),
    ],
)
def test_bad_inputs_are_named(key_shape, table_shape, message):
    for impl in (reference, cpu, fused):
        with pytest.raises(ValueError, match=message):
            impl.rotate_back(torch.randn(key_shape), torch.randn(table_shape), torch.randn(table_shape))


@pytest.mark.parametrize("forced, used", [("", "cpu"), ("reference", "reference"), ("triton", "triton")])
def test_dispatch(forced, used, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, forced)
    calls = []
    for name, module in (("cpu", cpu), ("reference", reference), ("triton", fused)):
        monkeypatch.setattr(module, "rotate_back", lambda *a, name=name: calls.append(name))
        monkeypatch.setattr(module, "key_norms", lambda *a, name=name: calls.append(name))
    dart.rotate_back(*[torch.zeros(1, 1, 1, 2)], *tables(1, 2, [0]))
    dart.key_norms(torch.zeros(1, 1, 1, 2))
    assert calls == [used, used]
