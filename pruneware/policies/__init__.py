"""Pruning policies. A new policy is one file (or package) here with a `@register_policy`
dataclass that declares its `needs`; every module here is imported, so registering is enough."""

import importlib
import pkgutil

from pruneware.policies.attention import AttentionPolicy
from pruneware.policies.base import (
    MergeResult, Policy, StageInput, available, build_policy, get_policy, policy_names, register_policy, split_budget,
)
from pruneware.policies.needs import Needs

for _module in pkgutil.iter_modules(__path__):  # registration: each policy's module registers its class
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AttentionPolicy", "MergeResult", "Needs", "Policy", "StageInput", "available", "build_policy", "get_policy",
    "policy_names", "register_policy", "split_budget",
]
