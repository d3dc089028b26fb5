"""Vision-tower attention, reduced to one score per patch without materialising the matrix.

Pre-LLM policies that read the vision tower (FasterVLM, VisionZip) need the attention the
tower's own [CLS] token pays each patch (CLIP), or the mean attention each patch receives
(Qwen's ViT, which has no [CLS]). Both are weighted sums of softmax rows, which is what
`pruneware.kernels.scores` computes: on CUDA in one fused pass with no H x L x L tensor; the
plain-torch reference runs over blocks of query rows so that CPU memory stays bounded too.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from pruneware.kernels.scores import attention_scores

_ROW_BLOCK = 256  # query rows per reference call (the Triton kernel tiles rows itself)


@torch.no_grad()
def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """[B, L-1] attention of token 0 ([CLS]) to every patch, averaged over heads.

    q, k: [B, H, L, d] one attention call's queries and keys, token 0 being [CLS].
    """
    weights = _head_mean(q.shape[0], q.shape[1], q.device, torch.is_inference_mode_enabled())  # mean over heads
    scores, _ = attention_scores(q[:, :, :1], k, weights, scale=scale)  # [B, L]
    return scores[:, 1:]


@lru_cache(maxsize=16)
def _row_weights(batch: int, rows: int, value: float, device: torch.device, inference: bool) -> torch.Tensor:
    """[B, rows] float32 filled with `value`: made once per shape, device and inference mode (no op
    per call), shared and never written."""
    return torch.full((batch, rows), value, dtype=torch.float32, device=device)


@lru_cache(maxsize=16)
def _head_mean(batch: int, heads: int, device: torch.device, inference: bool) -> torch.Tensor:
    """[B, 1] float32 1/H: the weight of the one query row that averages H heads. Made once per
    shape, device and inference mode (no op per call), shared and never written."""
    return torch.full((batch, 1), 1.0 / heads, dtype=torch.float32, device=device)


@torch.no_grad()
def mean_attention_received(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """[B, L] attention each token receives, averaged over every query row and head.

    q, k: [B, H, L, d] one (unmasked, non-causal) attention call's queries and keys.
    """
    batch, heads, length, _ = q.shape
    step = length if q.is_cuda else _ROW_BLOCK
    total = None
    for start in range(0, length, step):
        rows = q if step >= length else q[:, :, start : start + step]
        weights = _row_weights(batch, rows.shape[2], 1.0 / length, q.device, torch.is_inference_mode_enabled())
        scores = attention_scores(rows, k, weights, scale=scale)[0]
        total = scores if total is None else total + scores  # the first block alone: no zeros to add it to
    if total is None:
        total = torch.zeros(batch, length, dtype=torch.float32, device=q.device)
    return total / heads


def resized_grid(h: int, w: int, budget: int, factor: int = 28) -> tuple[int, int]:
    """The (rows, cols) token grid Qwen's tooling gives an (h, w)-token image at `budget` tokens:
    qwen-vl-utils' `smart_resize` on its processed size (h * factor, w * factor pixels, factor =
    patch x merge) with `max_pixels` = budget x factor^2, i.e. what `process_vision_info` does
    with that `max_pixels`. `min_pixels` is one token, so any budget >= 1 is accepted; a side
    the floor rounds to 0 (an image far wider than the budget) is kept at 1 token and the other
    side trimmed to fit."""
    smart_resize = _smart_resize()
    rows, cols = smart_resize(h * factor, w * factor, factor=factor, min_pixels=factor * factor,
                              max_pixels=budget * factor * factor)
    ph, pw = max(1, rows // factor), max(1, cols // factor)
    while ph * pw > budget:  # only after a side was raised to 1
        ph, pw = (ph - 1, pw) if ph >= pw and ph > 1 else (ph, pw - 1)
    return ph, pw


def _smart_resize():
    try:
        from qwen_vl_utils import smart_resize
    except ImportError as err:  # it imports torchvision, which Qwen's video processor needs too
        raise ImportError(
            f"resize on Qwen sizes its grids with qwen-vl-utils' smart_resize, which failed to import ({err}): "
            "pip install qwen-vl-utils torchvision"
        ) from err
    return smart_resize


def bin_firsts(h: int, w: int, ph: int, pw: int) -> torch.Tensor:
    """[ph*pw] row-major index into an (h, w) grid of each (ph, pw) bin's first token."""
    rows = torch.tensor([math.floor(i * h / ph) for i in range(ph)])
    cols = torch.tensor([math.floor(j * w / pw) for j in range(pw)])
    return (rows[:, None] * w + cols[None, :]).reshape(-1)
