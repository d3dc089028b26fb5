"""The vision tower's reads reduced to one score per patch (`pruneware.adapters.vision`), against
the attention matrix written out."""

from __future__ import annotations

import pytest
import torch

from pruneware.adapters.vision import cls_attention, mean_attention_received


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # [B, H, L, L]


@pytest.mark.parametrize("length", [7, 300])  # one block of query rows, and two (256 rows each on the CPU)
def test_mean_attention_received_is_the_mean_column_of_the_attention(length):
    gen = torch.Generator().manual_seed(length)
    q, k = torch.randn(2, 3, length, 8, generator=gen), torch.randn(2, 3, length, 8, generator=gen)
    want = _probs(q, k, 0.3).mean(dim=(1, 2))  # over heads and query rows
    torch.testing.assert_close(mean_attention_received(q, k, 0.3), want, atol=1e-6, rtol=1e-5)


def test_cls_attention_is_the_first_row_without_the_cls_column():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8, generator=gen), torch.randn(2, 4, 10, 8, generator=gen)
    want = _probs(q, k, 0.25)[:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(cls_attention(q, k, 0.25), want, atol=1e-6, rtol=1e-5)
