"""DART's duplication-aware selection in plain torch: the truth the fast paths must equal.

The rule of the official code (ZichenWen1/DART, `get_retained_image_token`, see
`pruneware/policies/dart.py`) for one image, G images at once:
  1. the image pivots are the `pivot_image` tokens with the largest key L1 norm (sorted);
  2. the pivots are the image pivots, then the valid text pivots, in that order; each pivot in
     turn takes the free tokens least cosine-similar to it (ties to the lowest index), each
     pivot `(k - p_img) // P` of them and the first `(k - p_img) % P` pivots one more;
  3. the image pivots and every token a pivot took are kept.
An image with no pivot at all (`pivot_image=0` and no text pivot; the official code would fail)
keeps its k tokens with the largest key norm instead, so that every image keeps k.
`prepare` (shared by every backend) computes the pivots and the similarity matrix with
`torch.nn.functional.cosine_similarity`, the official op, so that every backend selects on the
same numbers; only the greedy loop differs between them.
"""

from __future__ import annotations

import torch


def validate_inputs(
    visual: torch.Tensor, norms: torch.Tensor, text_pivots: torch.Tensor, text_valid: torch.Tensor, k: int,
    pivot_image: int,
) -> None:
    """Raise ValueError for shapes or a budget the selection cannot take, naming the bad value."""
    if visual.dim() != 3 or not visual.is_floating_point():
        raise ValueError(f"visual must be a float [G, n, D] tensor, got {visual.dtype} {tuple(visual.shape)}")
    g, n, d = visual.shape
    if tuple(norms.shape) != (g, n):
        raise ValueError(f"norms must be [G, n] = {(g, n)}, got {tuple(norms.shape)}")
    if text_pivots.dim() != 3 or text_pivots.shape[0] != g or text_pivots.shape[2] != d:
        raise ValueError(f"text_pivots must be [G, p, D] with G={g}, D={d}, got {tuple(text_pivots.shape)}")
    if text_valid.dtype != torch.bool or tuple(text_valid.shape) != tuple(text_pivots.shape[:2]):
        raise ValueError(f"text_valid must be bool [G, p] = {tuple(text_pivots.shape[:2])}, "
                         f"got {text_valid.dtype} {tuple(text_valid.shape)}")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is outside [0, n={n}]")
    if pivot_image < 0:
        raise ValueError(f"pivot_image must be >= 0, got {pivot_image}")


def text_pivots(
    text_hidden: torch.Tensor, text_valid: torch.Tensor, text_norms: torch.Tensor, pivot_text: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's text pivots: the `pivot_text` valid text rows with the largest key L1 norm,
    in position order. text_hidden: [G, T, D]; text_valid: [G, T] bool (left-aligned rows);
    text_norms: [G, T]. Returns their states [G, p, D] and which count [G, p] bool (a group with
    fewer valid rows has fewer pivots; its invalid ones come last)."""
    p = min(pivot_text, text_valid.shape[1])
    norms = torch.where(text_valid, text_norms, float("-inf"))
    rows = norms.topk(p, dim=1).indices.sort(dim=1).values  # [G, p]
    return torch.take_along_dim(text_hidden, rows[..., None], dim=1), text_valid.gather(1, rows)


def validate_text(visual: torch.Tensor, text_hidden: torch.Tensor, text_valid: torch.Tensor,
                  text_norms: torch.Tensor, pivot_text: int) -> None:
    """Raise ValueError for text rows `select` cannot take, naming the bad value."""
    g, _, d = visual.shape
    if text_hidden.dim() != 3 or text_hidden.shape[0] != g or text_hidden.shape[2] != d:
        raise ValueError(f"text_hidden must be [G, T, D] with G={g}, D={d}, got {tuple(text_hidden.shape)}")
    if text_valid.dtype != torch.bool or tuple(text_valid.shape) != tuple(text_hidden.shape[:2]):
        raise ValueError(f"text_valid must be bool [G, T] = {tuple(text_hidden.shape[:2])}, "
                         f"got {text_valid.dtype} {tuple(text_valid.shape)}")
    if tuple(text_norms.shape) != tuple(text_hidden.shape[:2]):
        raise ValueError(f"text_norms must be [G, T] = {tuple(text_hidden.shape[:2])}, got {tuple(text_norms.shape)}")
    if pivot_text < 0:
        raise ValueError(f"pivot_text must be >= 0, got {pivot_text}")


def select(
    visual: torch.Tensor, norms: torch.Tensor, text_hidden: torch.Tensor, text_valid: torch.Tensor,
    text_norms: torch.Tensor, k: int, pivot_image: int, pivot_text: int,
) -> torch.Tensor:
    """DART from the text rows: `text_pivots`, then `duplication_aware`. [G, k] sorted int64."""
    validate_text(visual, text_hidden, text_valid, text_norms, pivot_text)
    pivots, valid = text_pivots(text_hidden, text_valid, text_norms, pivot_text)
    return duplication_aware(visual, norms, pivots, valid, k, pivot_image)


def prepare(
    visual: torch.Tensor, norms: torch.Tensor, text_pivots: torch.Tensor, text_valid: torch.Tensor, k: int,
    pivot_image: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image pivots [G, p_img] (sorted), the similarity of every pivot to every token
    [G, P, n] (image pivots first, then the text pivots) and which pivots count [G, P] bool."""
    p_img = min(pivot_image, k)
    image_pivots = norms.topk(p_img, dim=1).indices.sort(dim=1).values  # [G, p_img]
    chosen = torch.take_along_dim(visual, image_pivots[..., None], dim=1)  # [G, p_img, D]
    text = text_pivots if text_pivots.dtype == visual.dtype else text_pivots.to(visual.dtype)
    pivots = torch.cat([chosen, text], dim=1)  # [G, P, D]
    similarity = torch.nn.functional.cosine_similarity(pivots[:, :, None], visual[:, None], dim=-1)  # [G, P, n]
    valid = torch.nn.functional.pad(text_valid, (p_img, 0), value=True)  # [G, P]
    return image_pivots, similarity, valid


def shares(k: int, p_img: int, pivots: int) -> tuple[int, int]:
    """(share, extra): each of `pivots` pivots takes `share` tokens, the first `extra` one more."""
    return divmod(k - p_img, max(1, pivots))


def duplication_aware(
    visual: torch.Tensor, norms: torch.Tensor, text_pivots: torch.Tensor, text_valid: torch.Tensor, k: int,
    pivot_image: int,
) -> torch.Tensor:
    """DART's kept tokens of G images at once.

    visual: [G, n, D] normed states; norms: [G, n] key L1 norms; text_pivots: [G, p, D] the text
    pivots' normed states in position order, text_valid [G, p] bool those that count (a group
    with fewer text rows has fewer pivots); 0 <= k <= n. Returns [G, k] int64 sorted indices.
    """
    validate_inputs(visual, norms, text_pivots, text_valid, k, pivot_image)
    g, n, _ = visual.shape
    if k >= n:
        return torch.arange(n, device=visual.device).expand(g, n).clone()
    image_pivots, similarity, valid = prepare(visual, norms, text_pivots, text_valid, k, pivot_image)
    p_img = image_pivots.shape[1]
    out = []
    for b in range(g):
        free = torch.ones(n, dtype=torch.bool, device=visual.device)
        free[image_pivots[b]] = False
        pivots = valid[b].nonzero().squeeze(1).tolist()
        share, extra = shares(k, p_img, len(pivots))
        kept = [image_pivots[b]]
        if not pivots:  # no pivot at all: the largest key norms (ties to the lowest index)
            kept.append(torch.sort(-norms[b], stable=True).indices[: k - p_img])
        for turn, i in enumerate(pivots):
            take = min(share + (turn < extra), int(free.sum()))
            if take == 0:
                continue
            candidates = free.nonzero().squeeze(1)
            order = torch.sort(similarity[b, i, candidates], stable=True).indices[:take]  # least similar first
            picked = candidates[order]
            free[picked] = False
            kept.append(picked)
        out.append(torch.cat(kept).sort().values)
    return torch.stack(out)


# Key norms: DART's pivots ----------------------------------------------------------------
def validate_keys(key: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> None:
    """Raise ValueError for keys or RoPE tables `rotate_back` / `key_norms` cannot take, naming the bad value."""
    if key.dim() != 4 or not key.is_floating_point():
        raise ValueError(f"key must be a float [B, H, L, d] tensor, got {key.dtype} {tuple(key.shape)}")
    if key.shape[-1] % 2:
        raise ValueError(f"key's head size must be even (RoPE rotates pairs of channels), got {key.shape[-1]}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table is not None and tuple(table.shape) != (key.shape[0], 2, key.shape[-1]):
            raise ValueError(f"{name} must be [B, 2, d] = {(key.shape[0], 2, key.shape[-1])}, got {tuple(table.shape)}")


def rotate_back(key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each sample's post-RoPE keys rotated back by a shift of its positions (`engine/key_positions.py`).

    key: [B, H, L, d]; cos, sin: [B, 2, d] the model's RoPE tables (its attention scaling
    included) at each sample's shift (row 0) and at position 0 (row 1, whose cos is the scaling
    alone). Returns [B, H, L, d] in key's dtype: transformers' rotation by minus the shift,
    k * c - rotate_half(k) * s, with c, s the row-0 tables over the scaling, narrowed to key's dtype.
    """
    validate_keys(key, cos, sin)
    scale = cos[:, 1:]  # [B, 1, d]
    c, s = (cos[:, :1] / scale)[:, None].to(key.dtype), (sin[:, :1] / scale)[:, None].to(key.dtype)  # [B, 1, 1, d]
    half = key.shape[-1] // 2
    rotated = torch.cat([-key[..., half:], key[..., :half]], dim=-1)  # transformers' rotate_half
    return key * c - rotated * s


def key_norms(key: torch.Tensor) -> torch.Tensor:
    """[B, L] float32: each key's L1 norm over every head and channel (DART's pivot score). key: [B, H, L, d]."""
    validate_keys(key)
    return key.float().abs().sum(dim=(1, 3))
