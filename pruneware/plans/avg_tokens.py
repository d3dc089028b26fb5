"""The `avg_tokens` budget solver: per-stage counts whose average number of visual tokens over
all decoder layers is the requested one (used by the presets and by user plans without budgets).
"""

from __future__ import annotations

from collections.abc import Callable

from pruneware.errors import PlanError


def _average(
    layers: list[int], counts: list[int], n_visual: int, n_layers: int,
    after: Callable[[int, int], int] | None = None,
) -> float:
    total, current, start = 0.0, n_visual, 0
    for layer, count in zip(layers, counts, strict=True):
        total += current * (layer - start)
        current, start = (count if after is None else after(current, count)), layer
    return (total + current * (n_layers - start)) / n_layers


def solve_counts(
    layers: list[int], decays: list[float], n_visual: int, n_layers: int, avg_tokens: float, name: str = "plan",
    after: Callable[[int, int], int] | None = None,
) -> list[int]:
    """Per-stage counts `round(n_visual * s**decay)` whose layer average is closest to `avg_tokens`
    (`after`: the tokens a stage leaves, see `Preset.after`)."""

    def counts_for(scale: float) -> list[int]:
        out, previous = [], n_visual
        for d in decays:
            previous = max(1, min(previous, round(n_visual * scale**d)))
            out.append(previous)
        return out

    lowest = _average(layers, [1] * len(layers), n_visual, n_layers, after)
    if not lowest <= avg_tokens <= n_visual:
        raise PlanError(
            f"avg_tokens={avg_tokens} is out of reach for preset {name!r} with {n_visual} visual tokens "
            f"and {n_layers} layers: choose a value in [{lowest:.1f}, {n_visual}]"
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _average(layers, counts_for(mid), n_visual, n_layers, after) < avg_tokens:
            lo = mid
        else:
            hi = mid
    best = min((counts_for(lo), counts_for(hi)), key=lambda c: abs(_average(layers, c, n_visual, n_layers, after) - avg_tokens))
    return best
