"""Named plans: presets whose layers scale with model depth, the papers' exact schedules, and
the templates `avg_tokens` solves (a preset, or a user's plan without budgets).

A preset is a list of stage templates whose layers are given for a reference depth (32, the
depth of LLaVA-1.5-7B) and scaled to the model's depth; a preset may carry a variant for
M-RoPE (Qwen) models with its own reference depth, where the paper ran one. Stage positions
follow the paper's code on 1-D RoPE models (`compact` where it re-indexes) and are always
`keep` on M-RoPE models. With `avg_tokens=N`, the per-stage counts are solved so that the
average number of visual tokens over all decoder layers truly is N. The papers' own schedules
(`pruneware.plans.schedules`) are presets too, exact and unscaled: `adaptinfer-llava-64` is the
AdaptInfer paper's "64", which computes 82.9 visual tokens per layer on LLaVA-1.5-7B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pruneware.plans.avg_tokens import solve_counts
from pruneware.plans.plan import Plan, PlanError, PositionsMode, Stage, writes_budgets
from pruneware.plans.schedules import SCHEDULES, Schedule
from pruneware.policies.sparsevlm import tokens_after as sparsevlm_tokens_after

REFERENCE_DEPTH = 32


@dataclass(frozen=True)
class StageTemplate:
    """A stage of a preset. `layer32` is the layer at the preset's reference depth (None = pre-LLM).

    `ratio` is the default budget (a ratio of the original tokens, or with `relative` of the
    tokens the stage receives); `decay` is the exponent used by the avg_tokens solver: the
    stage keeps `n_visual * s**decay` tokens for one shared scale s in (0, 1]. `positions`
    applies on 1-D RoPE models.
    """

    policy: str
    layer32: int | None
    ratio: float
    decay: float = 1.0
    positions: PositionsMode = "keep"
    relative: bool = False
    params: tuple = ()  # the policy's parameters, as `Stage.params` (a user plan's `[key=value]`)


@dataclass(frozen=True)
class Preset:
    name: str
    stages: tuple[StageTemplate, ...]
    description: str
    depth: int = REFERENCE_DEPTH  # the depth `layer32` is given for
    mrope: Preset | None = None  # the variant for M-RoPE models, when the paper ran one
    # Visual tokens leaving a stage that receives n and keeps `count`, when a stage adds tokens
    # of its own (SparseVLM's recycled ones); None: exactly `count`.
    after: Callable[[int, int], int] | None = None

    def variant(self, rope: Literal["1d", "mrope"]) -> Preset:
        return self.mrope if rope == "mrope" and self.mrope is not None else self

    def layers(self, n_layers: int, rope: Literal["1d", "mrope"] = "1d") -> list[int | None]:
        preset = self.variant(rope)
        out: list[int | None] = []
        for t in preset.stages:
            if t.layer32 is None:
                out.append(None)
                continue
            layer = max(1, min(n_layers - 1, round(t.layer32 * n_layers / preset.depth)))
            if out and out[-1] is not None and layer <= out[-1]:
                layer = out[-1] + 1
            if layer >= n_layers:
                raise PlanError(f"preset {self.name!r} needs more than {n_layers} decoder layers")
            out.append(layer)
        return out

    def build(
        self, n_layers: int, avg_tokens: float | None = None, n_visual: int | None = None,
        rope: Literal["1d", "mrope"] = "1d",
    ) -> Plan:
        """The plan for a model of `n_layers` layers; with `avg_tokens`, `n_visual` is required."""
        preset = self.variant(rope)
        layers = self.layers(n_layers, rope)
        wheres = ["pre" if layer is None else layer for layer in layers]
        modes = [t.positions if rope == "1d" else "keep" for t in preset.stages]
        if avg_tokens is None:
            return Plan(tuple(
                Stage(t.policy, w, t.ratio, m, t.params, relative=t.relative)
                for t, w, m in zip(preset.stages, wheres, modes, strict=True)
            ))
        if n_visual is None or n_visual < 1:
            raise PlanError("avg_tokens needs the number of visual tokens per sample (n_visual >= 1)")
        counts = solve_counts(
            [0 if layer is None else layer for layer in layers],
            [t.decay for t in preset.stages], n_visual, n_layers, avg_tokens, self.name, preset.after,
        )
        return Plan(tuple(
            Stage(t.policy, w, c, m, t.params) for t, w, c, m in zip(preset.stages, wheres, counts, modes, strict=True)
        ))


@dataclass(frozen=True)
class ExactPreset(Preset):
    """A paper's exact schedule: the same plan on every model (layers are not scaled)."""

    schedule: Schedule | None = None

    @property
    def plan(self) -> Plan:
        assert self.schedule is not None
        return Plan.parse(self.schedule.plan)

    def layers(self, n_layers: int, rope: Literal["1d", "mrope"] = "1d") -> list[int | None]:
        return [None if s.where == "pre" else int(s.where) for s in self.plan.stages]

    def build(
        self, n_layers: int, avg_tokens: float | None = None, n_visual: int | None = None,
        rope: Literal["1d", "mrope"] = "1d",
    ) -> Plan:
        if avg_tokens is not None:
            raise PlanError(
                f"preset {self.name!r} is a paper's exact schedule; it takes no avg_tokens "
                f"(use the scaled preset {self.schedule.scaled if self.schedule else self.name!r} with avg_tokens)"
            )
        return self.plan


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


def accepts_avg_tokens(plan: str) -> bool:
    """True for a scaled preset's name or a plan string without written budgets: `avg_tokens`
    solves it. A paper's exact schedule (an `ExactPreset`) writes its own budgets: False."""
    preset = available_presets().get(plan.strip())
    if preset is not None:
        return not isinstance(preset, ExactPreset)
    return not writes_budgets(plan)


def user_template(plan: Plan, n_layers: int) -> Preset:
    """A plan's stages as a template whose counts decay geometrically with stage order."""
    plan.validate_for(n_layers, "1d")
    stages = tuple(
        StageTemplate(
            s.policy, None if s.where == "pre" else round(s.layer * 32 / n_layers) or 1, 0.5, float(i + 1), s.positions,
            params=s.params,
        )
        for i, s in enumerate(plan.stages)
    )
    return FixedLayers(str(plan), stages, "user plan", wheres=tuple(s.where for s in plan.stages))


@dataclass(frozen=True)
class FixedLayers(Preset):
    """A template that keeps the user's exact layers instead of scaling them."""

    wheres: tuple = ()

    def layers(self, n_layers: int, rope: str = "1d") -> list[int | None]:
        return [None if w == "pre" else w for w in self.wheres]


register_preset(Preset("fastv", (StageTemplate("fastv", 2, 0.5),), "FastV: last-token attention at layer K-1, prune at K=2/32."))
register_preset(Preset("random", (StageTemplate("random", 20, 0.5),), "Uniform random pruning past the information horizon (layer 20/32)."))
register_preset(Preset("crosslmm", (StageTemplate("crosslmm", None, 0.25),), "CrossLMM: grid pooling + V2V cross-attention before the LLM."))
register_preset(Preset("divprune", (StageTemplate("divprune", None, 0.25),), "DivPrune: max-min diversity before the LLM."))
register_preset(Preset("cdpruner", (StageTemplate("cdpruner", None, 0.25),), "CDPruner: a DPP on similarity x instruction relevance, before the LLM."))
register_preset(Preset("fastervlm", (StageTemplate("fastervlm", None, 0.25),), "FasterVLM: the vision tower's [CLS] attention, before the LLM."))
register_preset(Preset("visionzip", (StageTemplate("visionzip", None, 0.25),), "VisionZip: dominant [CLS]-attention tokens + contextual merges, before the LLM."))
register_preset(Preset("resize", (StageTemplate("resize", None, 0.25),), "Matched-token baseline: a lower resolution (Qwen) or a pooled grid (LLaVA)."))
# AdaptInfer: the official code reads attention inside layers 1, 10, 20 (LLaVA-1.5, 32 layers)
# and prunes their outputs, i.e. stages before 2, 11, 21; defaults are the paper's "64" counts
# on 576 tokens (133, 27, 3), positions re-indexed. Qwen2-VL (28 layers): before 1, 10, 20,
# budgets relative to the tokens left (`retained_tokens=10`), M-RoPE positions kept.
register_preset(
    Preset(
        "adaptinfer",
        (
            StageTemplate("adaptinfer", 2, 0.231, 1.0, "compact"),
            StageTemplate("adaptinfer", 11, 0.046875, 2.1, "compact"),
            StageTemplate("adaptinfer", 21, 0.0052, 3.6, "compact"),
        ),
        "AdaptInfer: per-head text-prior attention; stages before layers 2, 11, 21 of 32 "
        "(Qwen2-VL: 1, 10, 20 of 28).",
        mrope=Preset(
            "adaptinfer",
            (
                StageTemplate("adaptinfer", 1, 0.17, 1.0, relative=True),
                StageTemplate("adaptinfer", 10, 0.6, 1.29, relative=True),
                StageTemplate("adaptinfer", 20, 0.3, 1.97, relative=True),
            ),
            "AdaptInfer on Qwen2-VL", depth=28,
        ),
    )
)
# PyramidDrop: the official code ranks after layers 8, 16, 24 of 32 with the attention layer K
# computes on its unpruned input (stages before 8, 16, 24), keeping 1/2, 1/4, 1/8 of the image
# tokens (`layer_list [8,16,24]`, `image_token_ratio_list [0.5,0.25,0.125]` in the eval
# scripts), positions re-indexed.
register_preset(
    Preset(
        "pdrop",
        (
            StageTemplate("pdrop", 8, 0.5, 1.0, "compact"),
            StageTemplate("pdrop", 16, 0.25, 2.0, "compact"),
            StageTemplate("pdrop", 24, 0.125, 3.0, "compact"),
        ),
        "PyramidDrop: last-instruction-token attention of layer K; stages before layers 8, 16, 24 of 32 "
        "keeping 1/2, 1/4, 1/8.",
    )
)
# DART: the official scripts prune before layer 2 of 32 (`--pruned_layer 2`) with
# `--reduction_ratio 0.778`, keeping 22.2% of the image tokens; positions kept.
register_preset(
    Preset("dart", (StageTemplate("dart", 2, 0.222),),
           "DART: key-norm pivots at layer K-1, keep the tokens least similar to them; before layer 2/32.")
)
# SparseVLM: the official code reads attention inside layers 2, 6, 15 of 32 (`pruning_loc`) and
# prunes their outputs (stages before 3, 7, 16), positions re-indexed; each stage also adds the
# tokens it recycles. Defaults are its "64" counts on 576 tokens (66, 30, 17); the decays make
# avg_tokens=82.25, the true average of those counts, land on them.
register_preset(
    Preset(
        "sparsevlm",
        (
            StageTemplate("sparsevlm", 3, 0.1146, 1.0, "compact"),
            StageTemplate("sparsevlm", 7, 0.0521, 1.365, "compact"),
            StageTemplate("sparsevlm", 16, 0.0295, 1.623, "compact"),
        ),
        "SparseVLM: attention of the image-relevant text raters; stages before layers 3, 7, 16 of 32 "
        "(official pruning_loc 2, 6, 15), pruned tokens recycled into a few merged ones.",
        after=sparsevlm_tokens_after,
    )
)
# Information Horizon: DivPrune before the LLM, random before layer 20 of 32, positions
# re-indexed; defaults are the paper's "64" counts on 576 tokens (96, 10).
register_preset(
    Preset(
        "info-horizon",
        (StageTemplate("divprune", None, 0.1667, 1.0, "compact"),
         StageTemplate("random", 20, 0.0174, 2.26, "compact")),
        "Information Horizon: DivPrune before the LLM, then random before layer 20/32, positions re-indexed.",
    )
)
for _schedule in SCHEDULES:
    register_preset(ExactPreset(
        _schedule.name, (), f"{_schedule.paper} {_schedule.label} on {_schedule.model}, exact: {_schedule.plan}",
        schedule=_schedule,
    ))
