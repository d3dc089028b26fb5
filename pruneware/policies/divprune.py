"""`divprune`: max-min diversity over the visual tokens (DivPrune, CVPR 2025).

Greedy farthest-point selection by cosine distance: the first token is the one farthest from
its nearest neighbour, and each next token maximises its distance to the nearest token
already chosen. Runs per image under the split budget, batched over images of equal size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruneware.policies.base import Policy, StageInput, register_policy, split_budget


def max_min_diverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diverse subset. x: [G, N, D]; returns sorted indices [G, k]."""
    g, n, _ = x.shape
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    dist = 1.0 - unit @ unit.transpose(1, 2)  # [G, N, N]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    first = dist.masked_fill(eye, float("inf")).min(dim=2).values.argmax(dim=1)  # [G]
    chosen = torch.empty(g, k, dtype=torch.long, device=x.device)
    chosen[:, 0] = first
    rows = torch.arange(g, device=x.device)
    nearest = dist[rows, first]  # [G, N] distance to the chosen set
    taken = torch.zeros(g, n, dtype=torch.bool, device=x.device)
    taken[rows, first] = True
    for i in range(1, k):
        pick = nearest.masked_fill(taken, float("-inf")).argmax(dim=1)
        chosen[:, i] = pick
        taken[rows, pick] = True
        nearest = torch.minimum(nearest, dist[rows, pick])
    return chosen.sort(dim=1).values


@register_policy
@dataclass(frozen=True)
class DivPrunePolicy(Policy):
    name = "divprune"
    description = "DivPrune: greedy max-min cosine diversity over the visual tokens."

    def select(self, inputs: StageInput, counts: list[int]) -> list[torch.Tensor]:
        sizes = inputs.image_sizes()
        device = inputs.hidden.device
        out: list[list[torch.Tensor]] = [[] for _ in sizes]
        # Group (sample, image) pairs by (image size, budget) so each group is one batched run.
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for b, image_sizes in enumerate(sizes):
            for image, k in enumerate(split_budget(image_sizes, counts[b]) if image_sizes else []):
                members = (inputs.image_ids[b] == image).nonzero().squeeze(1)
                groups.setdefault((len(members), k), []).append((b, members))
        for (_, k), items in groups.items():
            if k == 0:
                continue
            feats = torch.stack([inputs.hidden[b, members] for b, members in items])
            picked = max_min_diverse(feats, k)
            for (b, members), row in zip(items, picked, strict=True):
                out[b].append(members[row])
        return [
            torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.long, device=device)
            for parts in out
        ]
