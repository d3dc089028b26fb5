"""`fastv`: keep the visual tokens the last token attends to most at layer K-1 (FastV).

The attention comes from pruneware's capture (heads summed, the last query row only), never
from switching the model to eager attention. FastV needs K >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pruneware.policies.attention import AttentionPolicy
from pruneware.policies.base import register_policy
from pruneware.policies.needs import Needs


@register_policy
@dataclass(frozen=True)
class FastVPolicy(AttentionPolicy):
    name = "fastv"
    needs: ClassVar[Needs] = Needs(attention="previous", query="last")
    description = "FastV: last-token attention at layer K-1, top-k at K."
