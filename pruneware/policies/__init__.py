"""Pruning policies. A new policy is one file here with a `@register_policy` dataclass."""

from pruneware.policies import (  # noqa: F401  (registration)
    adaptinfer, crosslmm, dart, divprune, fastervlm, fastv, pdrop, random, resize, vision_score,
    sparsevlm, visionzip,
)
from pruneware.policies.attention import AttentionPolicy
from pruneware.policies.base import (
    MergeResult, Policy, StageInput, available, build_policy, get_policy, register_policy, split_budget,
)

__all__ = [
    "AttentionPolicy", "MergeResult", "Policy", "StageInput", "available", "build_policy", "get_policy", "register_policy",
    "split_budget",
]
