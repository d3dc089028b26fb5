"""What to prune: the plan grammar (`Plan`, `Stage`), named presets, the papers' exact
schedules, and the `avg_tokens` budget solver. Nothing here touches a model."""

from pruneware.errors import PlanError
from pruneware.plans.plan import Plan, Stage, writes_budgets
from pruneware.plans.presets import accepts_avg_tokens, available_presets, get_preset

__all__ = ["Plan", "PlanError", "Stage", "accepts_avg_tokens", "available_presets", "get_preset", "writes_budgets"]
