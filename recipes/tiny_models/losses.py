"""Stage 2's auxiliary losses: attention pointing and object whereabouts."""

from __future__ import annotations

import math
import sys

import torch


def point_loss(attn, args, kwargs, head: int, items, n_kv_groups: int, spread: bool = False, area: bool = False, rivals: dict | None = None) -> torch.Tensor:
    """-log of ``head``'s attention mass on the target columns, averaged over ``items``
    (``(sample, row, columns)``); recomputes that head's post-RoPE q and k only.

    With ``spread`` the loss is instead the KL divergence from the uniform distribution over the
    target columns to the attention: each column must get an equal share, so with ``k`` targets
    plus one fixed sink column the sink's share is exactly ``1 / (k + 1)`` (how counting reads a
    count from one head).

    Items with a fourth entry, ``groups`` (one id per target column), are grouped instead: the
    attention is summed within each group, and the loss is the KL divergence from the uniform
    distribution over the groups to those sums (0 when every group gets an equal total, however
    it is split inside a group). With ``area`` as well, the target is per column instead: each
    column of group ``g`` gets ``1 / (G * size of g)``, so a group is shared evenly by its columns
    (the KL divergence from that distribution to the attention). With ``rivals`` (grouped items
    only) the loss is :func:`contrast_loss` instead, ``rivals`` giving each ``(sample, row)`` its
    referent groups."""
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, L, D]
    cos, sin = kwargs["position_embeddings"]
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    mask = kwargs["attention_mask"]  # [B, 1, L, L] bool
    b, n, _ = h.shape
    d = attn.head_dim
    q = attn.q_proj(h).view(b, n, -1, d)[:, :, head : head + 1].transpose(1, 2)
    kv = head // n_kv_groups
    k = attn.k_proj(h).view(b, n, -1, d)[:, :, kv : kv + 1].transpose(1, 2)
    q, k = rope(q, k, cos, sin)
    items = [item for item in items if len(item[2])]
    if not items:
        return h.sum() * 0
    bi = torch.tensor([item[0] for item in items])
    ri = torch.tensor([item[1] for item in items])
    logits = (q[bi, 0, ri, :, None] * k[bi, 0].transpose(1, 2)).sum(1) * attn.scaling  # [R, L]
    logits = logits.masked_fill(~mask[bi, 0, ri], float("-inf"))
    logp = logits.log_softmax(-1)
    if rivals is not None:
        return contrast_loss(logp, items, rivals)
    if len(items[0]) == 4:
        return area_spread(logp, items) if area else grouped_spread(logp, items)
    look = torch.zeros_like(logp, dtype=torch.bool)
    for j, (_, _, c) in enumerate(items):
        look[j, c] = True
    if spread:
        n = look.sum(-1)  # [R]
        cross = -(logp.masked_fill(~look, 0.0)).sum(-1) / n  # cross-entropy from uniform over the targets
        return (cross - n.float().log()).mean()  # minus its entropy: 0 when the shares are equal
    return -torch.logsumexp(logp.masked_fill(~look, float("-inf")), -1).mean()


def grouped_spread(logp: torch.Tensor, items) -> torch.Tensor:
    """KL(uniform over groups || attention summed per group), averaged over rows: ``logp`` [R, L]
    log-attention, ``items[j] = (sample, row, columns [k], groups [k])``."""
    terms = []
    for j, (_, _, cols, groups) in enumerate(items):
        row = logp[j, cols]  # [k]
        per_group = torch.stack([torch.logsumexp(row[groups == g], 0) for g in groups.unique()])  # [G] log mass
        terms.append(-per_group.mean() - math.log(len(per_group)))
    return torch.stack(terms).mean()


def area_spread(logp: torch.Tensor, items) -> torch.Tensor:
    """KL(w || attention) averaged over rows, where ``w`` gives each of ``G`` groups ``1 / G``
    spread evenly over its columns: ``logp`` [R, L], ``items[j] = (sample, row, columns [k], groups [k])``."""
    terms = []
    for j, (_, _, cols, groups) in enumerate(items):
        _, slot, size = torch.unique(groups, return_inverse=True, return_counts=True)
        w = 1.0 / (len(size) * size[slot].float())  # [k], sums to 1
        terms.append((w * (w.log() - logp[j, cols])).sum())
    return torch.stack(terms).mean()


CONTRAST_MARGIN = 4.0  # nats by which a referent's mean logit should beat every other object's


def contrast_loss(logp: torch.Tensor, items, referents: dict) -> torch.Tensor:
    """Mean over (referent, other object) pairs of ``softplus(margin - gap)``, ``gap`` being the
    difference of the two objects' mean log-attention over their cells: ``logp`` [R, L],
    ``items[j] = (sample, row, columns [k], groups [k])`` over every object cell of the scene,
    ``referents[(sample, row)]`` the set of referent groups. Unlike :func:`area_spread`, whose
    pull on a leak of mass ``m`` onto other objects is only ``-log(1 - m)``, this keeps pulling
    until each referent stands ``CONTRAST_MARGIN`` nats above each other object."""
    terms = []
    for j, (sample, row, cols, groups) in enumerate(items):
        ids, slot = torch.unique(groups, return_inverse=True)  # [G], [k]
        mean = torch.zeros(len(ids), dtype=logp.dtype).index_add(0, slot, logp[j, cols]) / torch.bincount(slot).to(logp.dtype)  # [G]
        is_ref = torch.tensor([int(g) in referents.get((sample, row), ()) for g in ids])
        if is_ref.any() and (~is_ref).any():
            gap = mean[is_ref][:, None] - mean[~is_ref][None, :]  # [referents, others]
            terms.append(torch.nn.functional.softplus(CONTRAST_MARGIN - gap).mean())
    return torch.stack(terms).mean() if terms else logp.sum() * 0


def probe_loss(hidden: torch.Tensor, items, head: torch.nn.Module) -> torch.Tensor:
    """Mean squared error of a linear probe ``head`` (D -> k) predicting targets [k] from given
    rows of one layer's output ``hidden`` [B, L, D]; ``items`` are ``(sample, row, target)``."""
    if not items:
        return hidden.sum() * 0
    rows = hidden[torch.tensor([i for i, _, _ in items]), torch.tensor([r for _, r, _ in items])]  # [R, D]
    return ((head(rows) - torch.stack([t for _, _, t in items]).float()) ** 2).mean()


class Probes(torch.nn.Module):
    """Linear probes on the answering row, one per target kind (``kind -> (layer, width)``),
    trained with the model and dropped afterwards. :meth:`install` keeps each probed layer's
    output; :meth:`losses` gives ``{kind: loss}`` for a batch's targets."""

    def __init__(self, spec: dict[str, tuple[int, int]], dim: int):
        super().__init__()
        self.spec = spec
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, w) for k, (_, w) in spec.items()})
        self.outputs: dict[int, torch.Tensor] = {}

    def install(self, layers) -> list:
        def keep(layer: int):
            def fn(_module, _args, output):
                self.outputs[layer] = output[0] if isinstance(output, tuple) else output

            return fn

        return [layers[n].register_forward_hook(keep(n)) for n in sorted({n for n, _ in self.spec.values()})]

    def losses(self, targets: dict) -> dict[str, torch.Tensor]:
        out = {k: probe_loss(self.outputs[n], targets.get(k, []), self.heads[k]) for k, (n, _) in self.spec.items()}
        self.outputs.clear()
        return out


SPREAD_KINDS = ("tally", "phrase_tally")  # pointing kinds whose targets share the attention equally
AREA_KINDS = ("phrase_area",)  # grouped kinds whose groups are shared evenly by their columns
CONTRAST_KINDS = {"phrase_contrast": "phrase_area"}  # margin kinds -> the kind whose groups are the referents
POINT_WEIGHTS: dict[str, float] = {}  # kind -> weight of its term (1 when absent); see set_point_weights


def set_point_weights(text: str, kinds) -> None:
    """Per-kind pointing weights from ``"object=10,answer=2"`` (the stages' ``--point-weights``)."""
    for item in filter(None, text.split(",")):
        kind, _, weight = item.partition("=")
        if kind not in kinds:
            raise SystemExit(f"--point-weights: unknown kind {kind!r}; valid kinds: {list(kinds)}")
        POINT_WEIGHTS[kind] = float(weight)


def install_pointing(layers, points: dict[str, tuple[int, int]], targets: dict, terms: list, n_kv_groups: int) -> list:
    """Forward pre-hooks that append a :func:`point_loss` term to ``terms`` for every pointing
    kind in ``points`` (``kind -> (layer, head)``) whose items are in ``targets`` (which also
    holds the batch's boolean ``mask`` [B, 1, L, L]); kinds in ``SPREAD_KINDS`` use the equal-share
    loss, kinds in ``CONTRAST_KINDS`` the margin loss against their partner kind's referents, and each term is scaled by its kind's ``POINT_WEIGHTS``. Returns the hook handles."""

    def hook(kind: str, head: int):
        def fn(attn, args, kwargs):
            if targets.get(kind):
                kw = {**kwargs, "attention_mask": targets["mask"]}
                rivals = None
                if kind in CONTRAST_KINDS:  # (sample, row) -> its referent groups (the sink's 0 left out)
                    rivals = {(i, r): set(g.tolist()) - {0} for i, r, _, g in targets.get(CONTRAST_KINDS[kind], [])}
                term = point_loss(attn, args, kw, head, targets[kind], n_kv_groups, kind in SPREAD_KINDS, kind in AREA_KINDS, rivals)
                terms.append(POINT_WEIGHTS.get(kind, 1.0) * term)

        return fn

    return [layers[layer].self_attn.register_forward_pre_hook(hook(k, h), with_kwargs=True) for k, (layer, h) in points.items()]
