"""Named plans whose layers scale with model depth, and the `avg_tokens` budget solver.

A preset is a list of stage templates. Each template's layer is given for a 32-layer model
(the depth of LLaVA-1.5-7B, where the papers report their schedules) and is scaled to the
model's depth. With `avg_tokens=N`, the per-stage counts are solved so that the average number
of visual tokens over all decoder layers is N (the way the papers report budgets, e.g.
AdaptInfer keeps [133, 27, 3] at layers [1, 10, 20] for an average of 64 on LLaVA-1.5-7B).
"""

from __future__ import annotations

from dataclasses import dataclass

from pruneware.plan import Plan, PlanError, Stage

REFERENCE_DEPTH = 32


@dataclass(frozen=True)
class StageTemplate:
    """A stage of a preset. `layer32` is the layer for a 32-deep model (None = pre-LLM).

    `ratio` is the default budget; `decay` is the exponent used by the avg_tokens solver:
    the stage keeps `n_visual * s**decay` tokens for one shared scale s in (0, 1].
    """

    policy: str
    layer32: int | None
    ratio: float
    decay: float = 1.0


@dataclass(frozen=True)
class Preset:
    name: str
    stages: tuple[StageTemplate, ...]
    description: str

    def layers(self, n_layers: int) -> list[int | None]:
        out: list[int | None] = []
        for t in self.stages:
            if t.layer32 is None:
                out.append(None)
                continue
            layer = max(1, min(n_layers - 1, round(t.layer32 * n_layers / REFERENCE_DEPTH)))
            if out and out[-1] is not None and layer <= out[-1]:
                layer = out[-1] + 1
            if layer >= n_layers:
                raise PlanError(f"preset {self.name!r} needs more than {n_layers} decoder layers")
            out.append(layer)
        return out

    def build(self, n_layers: int, avg_tokens: float | None = None, n_visual: int | None = None) -> Plan:
        """The plan for a model of `n_layers` layers; with `avg_tokens`, `n_visual` is required."""
        layers = self.layers(n_layers)
        wheres = ["pre" if layer is None else layer for layer in layers]
        if avg_tokens is None:
            return Plan(tuple(Stage(t.policy, w, t.ratio) for t, w in zip(self.stages, wheres, strict=True)))
        if n_visual is None or n_visual < 1:
            raise PlanError("avg_tokens needs the number of visual tokens per sample (n_visual >= 1)")
        counts = solve_counts(
            [0 if layer is None else layer for layer in layers],
            [t.decay for t in self.stages], n_visual, n_layers, avg_tokens, self.name,
        )
        return Plan(tuple(Stage(t.policy, w, c) for t, w, c in zip(self.stages, wheres, counts, strict=True)))


def _average(layers: list[int], counts: list[int], n_visual: int, n_layers: int) -> float:
    total, current, start = 0.0, n_visual, 0
    for layer, count in zip(layers, counts, strict=True):
        total += current * (layer - start)
        current, start = count, layer
    return (total + current * (n_layers - start)) / n_layers


def solve_counts(
    layers: list[int], decays: list[float], n_visual: int, n_layers: int, avg_tokens: float, name: str = "plan"
) -> list[int]:
    """Per-stage counts `round(n_visual * s**decay)` whose layer average is closest to `avg_tokens`."""

    def counts_for(scale: float) -> list[int]:
        out, previous = [], n_visual
        for d in decays:
            previous = max(1, min(previous, round(n_visual * scale**d)))
            out.append(previous)
        return out

    lowest = _average(layers, [1] * len(layers), n_visual, n_layers)
    if not lowest <= avg_tokens <= n_visual:
        raise PlanError(
            f"avg_tokens={avg_tokens} is out of reach for preset {name!r} with {n_visual} visual tokens "
            f"and {n_layers} layers: choose a value in [{lowest:.1f}, {n_visual}]"
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _average(layers, counts_for(mid), n_visual, n_layers) < avg_tokens:
            lo = mid
        else:
            hi = mid
    best = min((counts_for(lo), counts_for(hi)), key=lambda c: abs(_average(layers, c, n_visual, n_layers) - avg_tokens))
    return best


_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    _PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise PlanError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(_PRESETS))}") from None


def available_presets() -> dict[str, Preset]:
    return dict(_PRESETS)


register_preset(Preset("fastv", (StageTemplate("fastv", 2, 0.5),), "FastV: last-token attention at layer K-1, prune at K=2/32."))
register_preset(Preset("random", (StageTemplate("random", 20, 0.5),), "Uniform random pruning past the information horizon (layer 20/32)."))
register_preset(Preset("crosslmm", (StageTemplate("crosslmm", None, 0.25),), "CrossLMM: grid pooling + V2V cross-attention before the LLM."))
register_preset(Preset("divprune", (StageTemplate("divprune", None, 0.25),), "DivPrune: max-min diversity before the LLM."))
register_preset(
    Preset(
        "adaptinfer",
        (StageTemplate("adaptinfer", 1, 0.5, 1.0), StageTemplate("adaptinfer", 10, 0.125, 2.1),
         StageTemplate("adaptinfer", 20, 0.03125, 3.6)),
        "AdaptInfer: text-prior-weighted attention, pruning at layers 1, 10, 20 of 32.",
    )
)
register_preset(
    Preset(
        "info-horizon",
        (StageTemplate("divprune", None, 0.5, 1.0), StageTemplate("random", 20, 0.25, 2.0)),
        "Information Horizon: DivPrune before the LLM, then random past layer 20/32.",
    )
)
