"""DivPrune's grid term as a knob of the tuner: each schedule the search shortlists (and each of
its recycling variants) is also verified with its `pre` DivPrune stage selecting on
``1 - cos + w * grid distance`` (`divprune[spatial=w]`, `pruneware.policies.divprune`), and the
measurement decides.

Only a first stage that is `divprune` at `pre` takes the term: it is the one stage that sees every
token of the image's grid. The variant keeps the stage's count, slots and positions, so it costs
exactly what its schedule costs and every budget holds unchanged. Off by default (no weights): on
tiny-llava the term did not help (benchmarks/RESULTS.md, "Issue 36, item 4").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from pruneware.errors import PlanError
from pruneware.plans.plan import Plan


def checked_weights(weights: Sequence[float] | str | None) -> tuple[float, ...]:
    """The grid-term weights the tuner tries besides none, deduplicated in order; () tries none.

    Accepts a sequence or a ','-separated string ("0.25,0.5"); "none" or "" means ().
    Raises PlanError naming the valid range for anything that is not a finite number > 0.
    """
    if weights is None:
        return ()
    items = [w.strip() for w in weights.split(",")] if isinstance(weights, str) else list(weights)
    out: list[float] = []
    for item in items:
        if item in ("", "none"):
            continue
        try:
            w = float(item) if not isinstance(item, bool) else math.nan
        except (TypeError, ValueError):
            w = math.nan
        if not math.isfinite(w) or w <= 0:
            raise PlanError(f"spatial weight {item!r} for the tuner: valid are finite numbers > 0 "
                            "(e.g. 0.25,0.5), or none")
        if w not in out:
            out.append(w)
    return tuple(out)


def spatial_variant(plan: Plan, weight: float) -> Plan | None:
    """`plan` with its first stage, a `divprune` stage at `pre`, given `spatial=weight`; None when
    the first stage is not one, or already sets `spatial`."""
    stages = plan.all_stages
    first = stages[0] if stages else None
    if first is None or first.policy != "divprune" or first.where != "pre" \
            or any(key == "spatial" for key, _ in first.params):
        return None
    return Plan((replace(first, params=(*first.params, ("spatial", weight))), *stages[1:]))


def with_spatial(candidates: dict[str, tuple[Plan, str]], weights: Sequence[float]) -> dict[str, tuple[Plan, str]]:
    """The candidates in order, each one the search found (recycling variants included) followed
    by its grid-term variants (origin "<its origin> + spatial=W (pre stage)"); presets unchanged."""
    out: dict[str, tuple[Plan, str]] = {}
    for key, (plan, origin) in candidates.items():
        out[key] = (plan, origin)
        if not origin.startswith("search"):
            continue
        for weight in weights:
            variant = spatial_variant(plan, weight)
            if variant is None or str(variant) in out or str(variant) in candidates:
                continue
            out[str(variant)] = (variant, f"{origin} + spatial={weight:g} (pre stage)")
    return out
