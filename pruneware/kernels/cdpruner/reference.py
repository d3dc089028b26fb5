"""CDPruner's conditional DPP and its greedy MAP inference in plain torch: the truth the Triton
kernel must equal.

The rule of the official code (Theia-4869/CDPruner, `llava/model/llava_arch.py`,
`encode_images`): the DPP kernel is ``L = diag(r) S diag(r)`` with ``S`` the cosine similarity
of the visual tokens' features (in float32) and ``r`` each token's relevance to the instruction;
the greedy MAP inference is Fast-MAP-DPP (Chen et al., NeurIPS 2018): each step takes the token
with the largest residual ``d_j^2`` (the gain in log-determinant), appends its Cholesky row
``e = (L[j] - c_j . c) / d_j``, and lowers every residual by ``e^2``. Ties go to the lowest
index, as ``torch.argmax`` does.

One deliberate difference: the official loop has no rule for a kernel whose rank (at most the
feature width D) runs out before k picks; its residuals then reach 0 or below, ``sqrt`` gives
NaN, and NaN spreads until ``argmax`` re-picks chosen tokens, so fewer than k distinct tokens
are kept. Here, when the best remaining residual is at most ``EPS_REL`` times the group's largest
``L_ii`` (the chosen tokens span every remaining one), a new round starts: the residuals reset to
``L_ii`` over the tokens not yet chosen and the greedy goes on from there, so exactly k distinct
tokens are kept. Before that point the two select the same tokens.
"""

from __future__ import annotations

import torch

EPS_REL = 1e-5  # a residual at most this times the largest L_ii counts as spanned
RELEVANCE = ("positive", "negative", "none")  # the sign of the instruction relevance (see the policy)


def instruction_relevance(
    visual: torch.Tensor, valid: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, sign: str,
    theta: float | None = None,
) -> torch.Tensor:
    """[B, N] float32 relevance of each visual token to its sample's instruction, normalised to
    about [0, 1] per sample over its valid tokens (0 on invalid ones): the mean cosine to the
    valid text rows, with `sign`, min-max normalised as the official code does
    (``(r - min + 1e-6) / (max - min)``), then ``exp(theta / (2 (1 - theta)) r)`` if theta is set.

    visual: [B, N, D], valid: [B, N] bool; text: [B, T, D], text_valid: [B, T] bool;
    sign: one of `RELEVANCE`; theta: None or in (0, 1) (see `pruneware.policies.cdpruner`).
    """
    if sign not in RELEVANCE:
        raise ValueError(f"sign must be one of {RELEVANCE}, got {sign!r}")
    if sign == "none":
        raw = torch.ones(valid.shape, device=visual.device)
    else:
        unit_v = torch.nn.functional.normalize(visual.float(), dim=-1)
        unit_t = torch.nn.functional.normalize(text.float(), dim=-1) * text_valid[..., None]
        count = text_valid.sum(dim=1).clamp(min=1)[:, None]  # [B, 1]
        raw = (unit_v @ unit_t.transpose(1, 2)).sum(dim=2) / count  # [B, N] mean cosine over the rows
        if sign == "negative":
            raw = -raw
    low = raw.masked_fill(~valid, float("inf")).min(dim=1, keepdim=True).values
    high = raw.masked_fill(~valid, float("-inf")).max(dim=1, keepdim=True).values
    span = torch.where(high > low, high - low, 1.0)  # equal relevance everywhere: no division by 0
    rel = (raw - low + 1e-6) / span
    if theta is not None:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    return rel.masked_fill(~valid, 0.0)


def validate_select(x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, k: int, sign: str) -> None:
    """Raise ValueError for inputs `select` cannot take, naming the bad value (reads shapes only)."""
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a float [G, N, D] tensor, got {x.dtype} {tuple(x.shape)}")
    if not 0 <= k <= x.shape[1]:
        raise ValueError(f"k={k} is outside [0, N={x.shape[1]}]")
    if text.dim() != 3 or text.shape[0] != x.shape[0] or text.shape[2] != x.shape[2]:
        raise ValueError(f"text must be [G, T, D] with G={x.shape[0]}, D={x.shape[2]}, got {tuple(text.shape)}")
    if text_valid.dtype != torch.bool or tuple(text_valid.shape) != tuple(text.shape[:2]):
        raise ValueError(f"text_valid must be bool [G, T] = {tuple(text.shape[:2])}, "
                         f"got {text_valid.dtype} {tuple(text_valid.shape)}")
    if sign not in RELEVANCE:
        raise ValueError(f"sign must be one of {RELEVANCE}, got {sign!r}")


def select(
    x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, k: int, sign: str = "positive",
    theta: float | None = None,
) -> torch.Tensor:
    """CDPruner on G full groups: `instruction_relevance` (every token valid), then `conditional_dpp`.
    x: [G, N, D]; text: [G, T, D]; text_valid: [G, T] bool. Returns sorted int64 [G, k]."""
    validate_select(x, text, text_valid, k, sign)
    valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return conditional_dpp(x, instruction_relevance(x, valid, text, text_valid, sign, theta), k)


def validate_inputs(x: torch.Tensor, relevance: torch.Tensor, k: int) -> None:
    """Raise ValueError for shapes or a budget the selection cannot take, naming the bad value."""
    if x.dim() != 3:
        raise ValueError(f"x must be [G, N, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    if relevance.shape != x.shape[:2]:
        raise ValueError(f"relevance must be [G, N] = {tuple(x.shape[:2])}, got {tuple(relevance.shape)}")
    n = x.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is outside [0, N={n}]")


def dpp_kernel(x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """The conditional DPP kernel ``r_i cos(x_i, x_j) r_j`` in float32. x: [G, N, D], relevance:
    [G, N] -> [G, N, N]. Every backend selects on this same matrix."""
    x = x.float()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)  # official: features / their norm
    similarity = unit @ unit.transpose(1, 2)
    r = relevance.float()
    return r[:, :, None] * similarity * r[:, None, :]


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of the DPP with kernel [G, N, N] float32; sorted int64 indices [G, k]."""
    g, n, _ = kernel.shape
    device = kernel.device
    rows = torch.arange(g, device=device)
    diag = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [G, N]
    eps = EPS_REL * diag.max(dim=1).values  # [G]
    cis = torch.zeros(k, g, n, device=device)  # [k, G, N] Cholesky rows
    di2s = diag.clone()
    taken = torch.zeros(g, n, dtype=torch.bool, device=device)
    start = torch.zeros(g, dtype=torch.long, device=device)  # first step of each group's round
    chosen = torch.empty(k, g, dtype=torch.long, device=device)
    steps = torch.arange(k, device=device)
    for i in range(k):
        j = torch.argmax(di2s, dim=-1)
        spanned = (di2s[rows, j] <= eps) & (start < i)
        if spanned.any():  # these groups start a new round over the tokens not chosen yet
            start = torch.where(spanned, i, start)
            di2s = torch.where(spanned[:, None], diag.masked_fill(taken, float("-inf")), di2s)
            j = torch.argmax(di2s, dim=-1)
        chosen[i] = j
        in_round = (steps[:i, None] >= start[None]).float()  # [i, G]
        coef = cis[:i, rows, j] * in_round  # [i, G]
        residual = di2s[rows, j]
        ok = residual > eps
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", coef, cis[:i])) \
            / torch.sqrt(torch.where(ok, residual, 1.0)).unsqueeze(-1)
        eis = torch.where(ok[:, None], eis, 0.0)
        cis[i] = eis
        di2s = di2s - torch.square(eis)
        taken[rows, j] = True
        di2s[rows, j] = float("-inf")
    return chosen.t().sort(dim=1).values


def conditional_dpp(x: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """CDPruner's selection per group. x: [G, N, D] float features; relevance: [G, N] (>= 0);
    k in [0, N]. Returns sorted int64 indices [G, k]."""
    validate_inputs(x, relevance, k)
    g = x.shape[0]
    if k == 0 or g == 0:
        return torch.zeros(g, 0, dtype=torch.long, device=x.device)
    if x.requires_grad:
        x = x.detach()
    return greedy_map(dpp_kernel(x, relevance.detach()), k)
