"""From what the user passed (a plan string, a Plan, or a preset name, maybe with avg_tokens)
to the concrete plan each prefill runs, checked against the model before anything is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pruneware.adapters import Adapter
from pruneware.plan import Plan, PlanError
from pruneware.policies import Policy, get_policy
from pruneware.presets import ExactPreset, Preset, StageTemplate, available_presets

NOMINAL_VISUAL_TOKENS = 576  # used only to validate a lazily solved plan before the first input


@dataclass
class PlanSource:
    """A fixed plan, or a template whose counts are solved per input for `avg_tokens`."""

    adapter: Adapter
    fixed: Plan | None
    template: Preset | None
    avg_tokens: float | None
    _policies: dict[tuple[str, int], Policy] = field(default_factory=dict)
    _solved: dict[int, Plan] = field(default_factory=dict)

    @classmethod
    def create(cls, plan: str | Plan, adapter: Adapter, avg_tokens: float | None) -> PlanSource:
        n_layers = adapter.n_layers
        if isinstance(plan, Plan):
            template = None if avg_tokens is None else _template_of(plan, n_layers)
            source = cls(adapter, plan if avg_tokens is None else None, template, avg_tokens)
        elif isinstance(plan, str):
            presets = available_presets()
            if plan.strip() in presets:
                preset = presets[plan.strip()]
                if avg_tokens is not None and isinstance(preset, ExactPreset):
                    preset.build(n_layers, avg_tokens)  # raises: an exact schedule has no avg_tokens
                fixed = preset.build(n_layers, rope=adapter.rope) if avg_tokens is None else None
                source = cls(adapter, fixed, preset if avg_tokens is not None else None, avg_tokens)
            elif avg_tokens is None:
                source = cls(adapter, Plan.parse(plan), None, None)
            else:
                source = cls(adapter, None, _template_of(Plan.parse(plan), n_layers), avg_tokens)
        else:
            raise PlanError(f"plan must be a plan string, a Plan or a preset name, got {type(plan).__name__}")
        source._check(source.plan_for(NOMINAL_VISUAL_TOKENS, strict=False))
        return source

    def _check(self, plan: Plan) -> None:
        plan.validate_for(self.adapter.n_layers, self.adapter.rope)
        for i, stage in enumerate(plan.stages):
            policy = self.policy(plan, i)
            if stage.where == "pre" and not policy.pre_llm:
                raise PlanError(
                    f"stage {stage}: {stage.policy!r} needs attention rows from the layer before, "
                    "so it cannot run at 'pre'; give a layer K >= 1"
                )
            if policy.merges and not self.adapter.supports_merging:
                raise PlanError(
                    f"stage {stage}: {type(self.adapter).__name__} cannot run merging policies ({stage.policy!r}); "
                    "use a selection policy: random, divprune, fastv, adaptinfer, vision-score"
                )
            if policy.merges and stage.budget == 0:
                raise PlanError(f"stage {stage}: a merging policy needs a budget >= 1 (it pools into that many tokens)")
            if stage.where != "pre" and policy.merges:
                raise PlanError(
                    f"stage {stage}: {stage.policy!r} merges tokens into new embeddings and runs only at 'pre'"
                )
            if stage.where == 0 and policy.needs_attention:
                raise PlanError(f"stage {stage}: {stage.policy!r} needs layer K-1's attention; use K >= 1")

    def plan_for(self, n_visual: int, strict: bool = True) -> Plan:
        """The plan for a batch whose largest sample has `n_visual` visual tokens."""
        if self.fixed is not None:
            return self.fixed
        assert self.template is not None and self.avg_tokens is not None
        key = max(n_visual, 1)
        if key not in self._solved:
            try:
                self._solved[key] = self.template.build(self.adapter.n_layers, self.avg_tokens, key, self.adapter.rope)
            except PlanError:
                if strict:
                    raise
                return self.template.build(self.adapter.n_layers, rope=self.adapter.rope)
        return self._solved[key]

    def policy(self, plan: Plan, index: int) -> Policy:
        stage = plan.stages[index]
        key = (str(stage), index)
        if key not in self._policies:
            cls = get_policy(stage.policy)
            try:
                self._policies[key] = cls(**dict(stage.params))
            except TypeError as err:
                raise PlanError(f"bad parameters for policy {stage.policy!r} in {stage}: {err}") from None
        return self._policies[key]

    def _any_plan(self) -> Plan:
        return self.plan_for(NOMINAL_VISUAL_TOKENS, strict=False)

    def first_llm_layer(self) -> int | None:
        layers = [s.where for s in self._any_plan().stages if s.where != "pre"]
        return min(layers) if layers else None  # type: ignore[type-var]

    def needs_attention(self) -> bool:
        plan = self._any_plan()
        return any(self.policy(plan, i).needs_attention for i in range(len(plan.stages)))

    @staticmethod
    def stage_index_at(plan: Plan, layer: int) -> int | None:
        for i, stage in enumerate(plan.stages):
            if stage.where == layer:
                return i
        return None


def _template_of(plan: Plan, n_layers: int) -> Preset:
    """A plan's stages as a template whose counts decay geometrically with stage order."""
    plan.validate_for(n_layers, "1d")
    stages = tuple(
        StageTemplate(
            s.policy, None if s.where == "pre" else round(s.layer * 32 / n_layers) or 1, 0.5, float(i + 1), s.positions
        )
        for i, s in enumerate(plan.stages)
    )
    return _FixedLayers(str(plan), stages, "user plan", wheres=tuple(s.where for s in plan.stages))


@dataclass(frozen=True)
class _FixedLayers(Preset):
    """A template that keeps the user's exact layers instead of scaling them."""

    wheres: tuple = ()

    def layers(self, n_layers: int, rope: str = "1d") -> list[int | None]:
        return [None if w == "pre" else w for w in self.wheres]
