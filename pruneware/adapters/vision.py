"""Vision-tower attention, reduced to one score per patch without materialising the matrix.

Pre-LLM policies that read the vision tower (FasterVLM, VisionZip) need the attention the
tower's own [CLS] token pays each patch (CLIP), or the mean attention each patch receives
(Qwen's ViT, which has no [CLS]). Both are weighted sums of softmax rows, which is what
`pruneware.kernels.scores` computes: on CUDA in one fused pass with no H x L x L tensor; the
plain-torch reference runs over blocks of query rows so that CPU memory stays bounded too.
"""

from __future__ import annotations

import math

import torch

from pruneware.kernels.scores import attention_scores

_ROW_BLOCK = 256  # query rows per reference call (the Triton kernel tiles rows itself)


@torch.no_grad()
def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """[B, L-1] attention of token 0 ([CLS]) to every patch, averaged over heads.

    q, k: [B, H, L, d] one attention call's queries and keys, token 0 being [CLS].
    """
    weights = torch.full((q.shape[0], 1), 1.0 / q.shape[1], dtype=torch.float32, device=q.device)  # mean over heads
    scores, _ = attention_scores(q[:, :, :1], k, weights, scale=scale)  # [B, L]
    return scores[:, 1:]


@torch.no_grad()
def mean_attention_received(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """[B, L] attention each token receives, averaged over every query row and head.

    q, k: [B, H, L, d] one (unmasked, non-causal) attention call's queries and keys.
    """
    batch, heads, length, _ = q.shape
    total = torch.zeros(batch, length, dtype=torch.float32, device=q.device)
    step = length if q.is_cuda else _ROW_BLOCK
    for start in range(0, length, step):
        rows = q[:, :, start : start + step]
        weights = torch.full((batch, rows.shape[2]), 1.0 / length, dtype=torch.float32, device=q.device)
        total += attention_scores(rows, k, weights, scale=scale)[0]
    return total / heads


def resized_grid(h: int, w: int, budget: int) -> tuple[int, int]:
    """The token grid of an (h, w)-token image processed with max_pixels = budget tokens:
    Qwen's `smart_resize` (floor branch) on a grid already rounded to whole tokens."""
    if h * w <= budget:
        return h, w
    beta = math.sqrt(h * w / budget)
    ph, pw = max(1, math.floor(h / beta)), max(1, math.floor(w / beta))
    while ph * pw > budget:  # guard against rounding up in the square root
        ph, pw = (ph - 1, pw) if ph >= pw and ph > 1 else (ph, pw - 1)
    return ph, pw


def bin_firsts(h: int, w: int, ph: int, pw: int) -> torch.Tensor:
    """[ph*pw] row-major index into an (h, w) grid of each (ph, pw) bin's first token."""
    rows = torch.tensor([math.floor(i * h / ph) for i in range(ph)])
    cols = torch.tensor([math.floor(j * w / pw) for j in range(pw)])
    return (rows[:, None] * w + cols[None, :]).reshape(-1)
