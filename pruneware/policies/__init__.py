"""Pruning policies. A new policy is one file here with a `@register_policy` dataclass."""

from pruneware.policies import adaptinfer, divprune, fastv, random  # noqa: F401  (registration)
from pruneware.policies.attention import AttentionPolicy
from pruneware.policies.base import Policy, StageInput, available, get_policy, register_policy, split_budget

__all__ = ["AttentionPolicy", "Policy", "StageInput", "available", "get_policy", "register_policy", "split_budget"]
