"""What a tuned plan may spend, and the cost model that says what a plan spends.

A budget is one of: `avg_tokens` (visual tokens per decoder layer, averaged over layers),
`flops_ratio` (language-model prefill FLOPs relative to the unpruned model) or `latency_ms`
(prefill time of one example at batch 1 on this machine). All three are *separable over
layers*: a plan's cost is a constant plus a sum over decoder layers of a per-layer cost that
depends only on how many visual tokens that layer sees. The search relies on that.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pruneware.errors import PlanError
from pruneware.plans.plan import Plan
from pruneware.report import layer_flops

KINDS = ("avg_tokens", "flops_ratio", "latency_ms")


class BudgetError(PlanError):
    """A budget that is malformed or out of reach: names the value and the valid range."""


@dataclass(frozen=True)
class Budget:
    """Exactly one of `avg_tokens`, `flops_ratio` or `latency_ms`."""

    avg_tokens: float | None = None
    flops_ratio: float | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        given = {k: getattr(self, k) for k in KINDS if getattr(self, k) is not None}
        if len(given) != 1:
            raise BudgetError(
                f"give exactly one budget of {', '.join(KINDS)}, got {', '.join(given) or 'none'}"
            )
        (kind, value), = given.items()
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise BudgetError(f"{kind} must be a number, got {value!r}")
        if kind == "flops_ratio" and not 0.0 < value <= 1.0:
            raise BudgetError(f"flops_ratio must be in (0, 1] (LM FLOPs relative to unpruned), got {value:g}")
        if kind != "flops_ratio" and value <= 0:
            raise BudgetError(f"{kind} must be > 0, got {value:g}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"

    @classmethod
    def of(cls, budget: Budget | Mapping[str, float] | str) -> Budget:
        """A Budget from a Budget, a mapping ({"avg_tokens": 64}) or a string ("flops_ratio=0.3")."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, str):
            key, sep, value = budget.partition("=")
            try:
                return cls.of({key.strip(): float(value)}) if sep else cls.of({})
            except ValueError:
                raise BudgetError(f"malformed budget {budget!r}: write e.g. 'avg_tokens=64'") from None
        if isinstance(budget, Mapping):
            unknown = set(budget) - set(KINDS)
            if unknown:
                raise BudgetError(f"unknown budget {sorted(unknown)[0]!r}; valid budgets: {', '.join(KINDS)}")
            return cls(**dict(budget))
        raise BudgetError(f"budget must be a Budget, a mapping or a string like 'avg_tokens=64', got {budget!r}")


@dataclass
class CostModel:
    """cost(plan) = constant + mean over samples of sum over layers of `per_layer(visual, text)`.

    `samples` holds each calibration sample's (visual tokens, text tokens); `fit` describes how
    the model was obtained (the latency fit's coefficients).
    """

    budget: Budget
    n_layers: int
    samples: list[tuple[int, int]]
    per_layer: Callable[[float, float], float]
    constant: float = 0.0
    fit: dict = field(default_factory=dict)
    vision_budget: float | None = None  # vision FLOPs relative to the unpruned tower; None: unconstrained
    vision: Any = None  # a `tuning.vision.VisionCost` when `vision_budget` is set

    def vision_fits(self, place, policy: str, ratio: float) -> bool:
        """Whether a plan whose first stage is `policy@place` at `ratio` keeps within the vision budget."""
        return self.vision_budget is None or self.vision.ratio(place, policy, ratio) <= self.vision_budget + 1e-12

    def fits(self, plan: Plan, n_visual: int | None) -> bool:
        """The plan keeps within the budget and, when there is one, the vision budget (its first
        stage's vision cost; a count needs `n_visual` to become a ratio)."""
        if self.plan_cost(plan) > self.budget.value:
            return False
        if self.vision_budget is None:
            return True
        first = plan.all_stages[0]
        if isinstance(first.budget, int) and not n_visual:
            return False
        ratio = first.budget / n_visual if isinstance(first.budget, int) else first.budget
        return self.vision_fits(first.where, first.policy, ratio)

    def layer_cost(self, ratio: float) -> float:
        """Mean per-layer cost when every sample keeps `ratio` of its visual tokens."""
        return sum(self.per_layer(_count(ratio, n), t) for n, t in self.samples) / len(self.samples)

    def plan_cost(self, plan: Plan) -> float:
        """Predicted cost of `plan` (exact for avg_tokens and flops_ratio, modelled for latency)."""
        total = 0.0
        for n, t in self.samples:
            current, start = n, 0
            for stage in plan.all_stages:  # a vision-side stage cuts what layer 0 on sees, as `pre` does
                count = min(current, stage.keep_count(n, current))
                total += (stage.layer - start) * self.per_layer(current, t)
                current, start = count, stage.layer
            total += (self.n_layers - start) * self.per_layer(current, t)
        return self.constant + total / len(self.samples)

    def unpruned_cost(self) -> float:
        return self.constant + self.n_layers * self.layer_cost(1.0)

    def floor(self) -> float:
        """The least any plan can cost: one visual token from before the first layer on."""
        return self.constant + self.n_layers * sum(self.per_layer(1, t) for _, t in self.samples) / len(self.samples)

    def check_reachable(self) -> None:
        if self.budget.value >= self.unpruned_cost():
            raise BudgetError(
                f"{self.budget} needs no pruning: the unpruned model costs {self.unpruned_cost():.4g}; "
                f"choose {self.budget.kind} below that"
            )
        low = self.floor()
        if self.budget.value < low:
            unit = {"avg_tokens": "", "flops_ratio": "", "latency_ms": " ms"}[self.budget.kind]
            raise BudgetError(
                f"{self.budget} is out of reach: even one visual token per image costs {low:.4g}{unit}; "
                f"choose {self.budget.kind} in [{low:.4g}, {self.unpruned_cost():.4g}]"
            )


def _count(ratio: float, n: int) -> int:
    return n if ratio >= 1.0 else max(1, min(n, round(ratio * n)))


def cost_model(budget: Budget, text_config, samples: Sequence[tuple[int, int]], n_layers: int,
               timer: Callable[[int], float] | None = None, n_visual: int | None = None) -> CostModel:
    """The cost model for `budget`; a latency budget calls `timer(k)` (ms of a batch-1 prefill
    that keeps k visual tokens from the start) at a few k to fit it."""
    samples = list(samples)
    if budget.kind == "avg_tokens":
        return CostModel(budget, n_layers, samples, lambda v, t: v / n_layers)
    if budget.kind == "flops_ratio":
        heads = text_config.num_attention_heads
        dims = (text_config.hidden_size, text_config.intermediate_size, heads,
                getattr(text_config, "num_key_value_heads", None) or heads,
                getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
        full = sum(n_layers * layer_flops(n + t, *dims) for n, t in samples) / len(samples)
        return CostModel(budget, n_layers, samples, lambda v, t: layer_flops(v + t, *dims) / full)
    if timer is None or n_visual is None:
        raise BudgetError("a latency_ms budget needs a timer to calibrate its cost model")
    return latency_model(budget, samples, n_layers, timer, n_visual)


def latency_model(budget: Budget, samples: list[tuple[int, int]], n_layers: int,
                  timer: Callable[[int], float], n_visual: int, repeats: int = 3) -> CostModel:
    """Fit prefill ms = a + b*k + c*k^2 to timings at a few kept-token counts k (pruned from the
    start, so every layer sees k): a is the vision tower, text and fixed overhead; each of the
    n_layers layers costs (b*k + c*k^2) / n_layers. Median of `repeats` timings per k."""
    ks = sorted({max(1, round(n_visual * f)) for f in (1.0, 0.5, 0.25, 0.125, 0.03)})
    timer(ks[-1])  # warm-up, not recorded
    ms = [statistics.median(timer(k) for _ in range(repeats)) for k in ks]
    x = np.array(ks, dtype=np.float64)
    a, b, c = np.linalg.lstsq(np.stack([np.ones_like(x), x, x * x], 1), np.array(ms), rcond=None)[0]
    if c < 0 or b < 0:  # noise: fall back to a straight line, never a decreasing cost
        a, b = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), np.array(ms), rcond=None)[0]
        b, c = max(float(b), 0.0), 0.0
    fit = {"a_ms": float(a), "b_ms_per_token": float(b), "c_ms_per_token2": float(c),
           "timed": {str(k): round(m, 3) for k, m in zip(ks, ms, strict=True)}}
    return CostModel(budget, n_layers, samples, lambda v, t: (b * v + c * v * v) / n_layers, float(a), fit)


def time_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3
