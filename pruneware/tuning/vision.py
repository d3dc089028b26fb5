"""Vision-side places for the tuner (`pre-vit`, `vitK`) and what a plan costs the vision tower.

Used only when `tune` gets a vision budget (`vision_flops_ratio=v`): the plan must then also keep
the vision encoder's FLOPs (tower and projector, per image) at or below v of the unpruned tower's.
The language-model budget (avg_tokens, flops_ratio or latency_ms) still holds as before; a
vision-side stage at ratio r counts there like a `pre` stage at r, since the language model sees
r of the visual tokens from its first layer on.

A plan has at most one vision-side stage and it comes first; `pre` and in-LLM stages leave the
tower whole (except `resize` on Qwen, which re-encodes a smaller image). So a plan's vision cost
is a function of its first stage alone: v(place, policy, ratio), read from the vision FLOPs that
the calibration runs of that place and policy reported (counted from what actually ran, see
`pruneware.adapters.vision_flops`), interpolated linearly in the ratio between measured points
and (1, 1). Every term of a tower's FLOPs is linear or convex in the units kept (dense layers,
attention), so the chord over-estimates between two measured points: a plan the interpolation
admits costs at most what it predicts. The tuner still checks the measured cost of the chosen plan.
"""

from __future__ import annotations

import math

from pruneware.adapters import adapter_for
from pruneware.errors import PlanError

MAX_VISION_PLACES = 3  # `pre-vit` and up to two cut points inside the tower


def vision_places(model, max_places: int = MAX_VISION_PLACES) -> list[str]:
    """`pre-vit` and up to `max_places - 1` cut points `vitK`, K evenly spread over 1..depth-1.

    Raises PlanError when its tower cannot be cut (e.g. a CLIP read without its [CLS] token)."""
    cut = adapter_for(model).vision_cut()
    if cut is None:
        family = getattr(model.config, "model_type", type(model).__name__)
        raise PlanError(
            f"{family} has no vision-side stages (pre-vit, vitK) in pruneware; tune it without a vision budget "
            "(vision_flops_ratio / --vision-flops-ratio), or use LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL or "
            "Qwen3-VL"
        )
    blocks = list(range(1, cut.depth))
    k = max_places - 1
    if len(blocks) > k:
        blocks = sorted({blocks[round(i * (len(blocks) - 1) / max(k - 1, 1))] for i in range(k)})
    return ["pre-vit", *(f"vit{b}" for b in blocks)]


def is_vision_place(place) -> bool:
    """`pre-vit` or `vitK` (tuner places are `pre`, these strings, or decoder layer indices)."""
    return isinstance(place, str) and place != "pre"


def place_layer(place) -> int:
    """The first decoder layer that sees a stage's cut: 0 for `pre` and the vision-side places."""
    return 0 if isinstance(place, str) else int(place)


class VisionCost:
    """v(place, policy, ratio): vision FLOPs relative to the unpruned tower, from measurements.

    A (place, policy) with measured points is interpolated linearly in the ratio between them and
    (1, 1); below its smallest measured ratio it is `inf` (not allowed; the search never goes
    below the profiled ratios anyway). Unmeasured in-LLM and `pre` places cost 1 (the whole
    tower); an unmeasured vision-side place costs `inf`.
    """

    def __init__(self) -> None:
        self.points: dict[tuple, dict[float, float]] = {}

    def add(self, place, policy: str, ratio: float, vision_ratio: float) -> None:
        self.points.setdefault((place, policy), {})[ratio] = vision_ratio

    def ratio(self, place, policy: str, ratio: float) -> float:
        pts = self.points.get((place, policy))
        if not pts:
            return math.inf if is_vision_place(place) else 1.0
        curve = sorted({1.0: 1.0, **pts}.items(), reverse=True)  # [(ratio, vision)] from 1 down
        if ratio >= 1.0:
            return 1.0
        for (r0, v0), (r1, v1) in zip(curve, curve[1:]):
            if r1 <= ratio <= r0:
                return v0 + (ratio - r0) * (v1 - v0) / (r1 - r0)
        return math.inf  # below the smallest measured ratio

    def summary(self) -> dict[str, dict[str, float]]:
        """JSON-friendly: {"place/policy": {ratio: vision ratio}}."""
        return {f"{p}/{pol}": {f"{r:g}": round(v, 4) for r, v in sorted(pts.items())}
                for (p, pol), pts in self.points.items()}
