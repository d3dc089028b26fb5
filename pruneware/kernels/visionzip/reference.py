"""VisionZip's dominant and contextual tokens for B images at once, in plain torch: the truth the
other paths must equal.

The rule of the official code (dvlab-research/VisionZip, `visionzip/clip_encoder.py`; see
`pruneware.policies.visionzip`), per image of n tokens and a budget of k: the dominant tokens are
the top `round(k * share)` by score; the others, in their original order, are split into evenly
strided targets (`arange(0, m, max(1, m // c))[:c]`) and the rest; each of the rest joins the
target whose key is most cosine-similar (the first on ties), and each contextual token is its
target's state plus the mean of the states merged into it (float32, cast back).
"""

from __future__ import annotations

from functools import lru_cache

import torch


def split(budget: int, share: float) -> int:
    """Dominant tokens of a budget: round(budget * share), at least 1 and at most the budget."""
    return max(1, min(budget, round(budget * share)))


@lru_cache(maxsize=64)
def rest_order(m: int, count: int, device: torch.device) -> torch.Tensor:
    """[m]: the contextual targets among m non-dominant tokens, then the others, in order."""
    targets = list(range(0, m, max(1, m // count)))[:count]
    chosen = set(targets)
    return torch.tensor(targets + [i for i in range(m) if i not in chosen], device=device)


def validate_inputs(hidden: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, budget: int, share: float) -> None:
    """Raise ValueError for inputs `batched_merge` cannot take, naming the bad value."""
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a float [B, n, D] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    batch, n, _ = hidden.shape
    if tuple(scores.shape) != (batch, n):
        raise ValueError(f"scores must be [B, n] = {(batch, n)}, got {tuple(scores.shape)}")
    if keys.dim() != 3 or tuple(keys.shape[:2]) != (batch, n):
        raise ValueError(f"keys must be [B, n, d] with B, n = {(batch, n)}, got {tuple(keys.shape)}")
    if not 0 < budget < n:
        raise ValueError(f"budget={budget} is outside (0, n={n})")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share={share} is outside (0, 1]")


def batched_merge(
    hidden: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, budget: int, share: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on B images of n tokens each. hidden: [B, n, D]; scores: [B, n]; keys: [B, n, d];
    0 < budget < n. Returns the kept slots [B, budget] (sorted) and their states [B, budget, D]."""
    validate_inputs(hidden, scores, keys, budget, share)
    batch, n, _ = hidden.shape
    n_dominant = split(budget, share)
    count, m = budget - n_dominant, n - n_dominant
    dominant = torch.zeros(batch, n, dtype=torch.int8, device=hidden.device)
    dominant.scatter_(1, scores.topk(n_dominant, dim=1).indices, 1)
    order = torch.sort(dominant, dim=1, stable=True).indices  # [B, n]: the others in order, then the dominant
    if count == 0:
        slots = order[:, m:]
        return slots, torch.take_along_dim(hidden, slots.unsqueeze(-1), dim=1)
    rest = order[:, rest_order(m, count, hidden.device)]  # [B, m]: targets first, then the tokens to merge
    unit = torch.take_along_dim(keys, rest.unsqueeze(-1), dim=1)
    unit = unit / unit.norm(dim=-1, keepdim=True)
    assign = torch.matmul(unit[:, count:], unit[:, :count].transpose(1, 2)).argmax(dim=2)  # [B, m - count]
    one_hot = torch.nn.functional.one_hot(assign, count).to(torch.float32)  # [B, m - count, count]
    rows = torch.take_along_dim(hidden, rest.unsqueeze(-1), dim=1).float()  # [B, m, D]
    merged = torch.matmul(one_hot.transpose(1, 2), rows[:, count:]) / one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    contextual = (rows[:, :count] + merged).to(hidden.dtype)
    slots, by_slot = torch.cat([order[:, m:], rest[:, :count]], dim=1).sort(dim=1)
    states = torch.cat([torch.take_along_dim(hidden, order[:, m:].unsqueeze(-1), dim=1), contextual], dim=1)
    return slots, torch.take_along_dim(states, by_slot.unsqueeze(-1), dim=1)
