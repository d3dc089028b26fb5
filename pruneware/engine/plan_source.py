"""From what the user passed (a plan string, a Plan, or a preset name, maybe with avg_tokens)
to the concrete plan each prefill runs, checked against the model before anything is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pruneware.adapters import Adapter
from pruneware.plans.plan import Plan, PlanError, writes_budgets
from pruneware.plans.presets import ExactPreset, Preset, available_presets, user_template
from pruneware.policies import Policy, build_policy, policy_names

NOMINAL_VISUAL_TOKENS = 576  # used only to validate a lazily solved plan before the first input
_MAX_SOLVED = 512


@dataclass
class PlanSource:
    """A fixed plan, or a template whose counts are solved per input for `avg_tokens`."""

    adapter: Adapter
    fixed: Plan | None
    template: Preset | None
    avg_tokens: float | None
    small_images: str = "error"  # "keep": a sample with fewer visual tokens than avg_tokens keeps them all
    _policies: dict[tuple, Policy] = field(default_factory=dict)
    _solved: dict[int, Plan] = field(default_factory=dict)

    @classmethod
    def create(cls, plan: str | Plan, adapter: Adapter, avg_tokens: float | None, small_images: str = "error") -> PlanSource:
        """Raises PlanError when a plan that writes its own budgets is given `avg_tokens` too.

        small_images: under `avg_tokens`, what a sample with fewer visual tokens than
        `avg_tokens` gets: "error" (a PlanError naming the sample) or "keep" (all its tokens).
        """
        n_layers = adapter.n_layers
        preset = available_presets().get(plan.strip()) if isinstance(plan, str) else None
        if preset is not None:
            if avg_tokens is not None and isinstance(preset, ExactPreset):
                preset.build(n_layers, avg_tokens)  # raises: an exact schedule has no avg_tokens
            fixed = preset.build(n_layers, rope=adapter.rope) if avg_tokens is None else None
            source = cls(adapter, fixed, preset if avg_tokens is not None else None, avg_tokens)
        elif isinstance(plan, Plan | str):
            parsed = plan if isinstance(plan, Plan) else Plan.parse(plan)
            if avg_tokens is None:
                source = cls(adapter, parsed, None, None)
            elif isinstance(plan, Plan) or writes_budgets(plan):
                raise PlanError(
                    f"plan {str(parsed)!r} sets its own budgets, which conflict with avg_tokens={avg_tokens:g}: "
                    "drop avg_tokens, pass a preset name "
                    f"({', '.join(sorted(available_presets()))}), or leave the budgets out (e.g. 'divprune@pre,random@4')"
                )
            elif parsed.vision:
                raise PlanError(
                    f"plan {str(parsed)!r}: avg_tokens solves the language model's budgets and does not place "
                    "vision-side stages (pre-vit, vitK); give them budgets and drop avg_tokens"
                )
            else:
                source = cls(adapter, None, user_template(parsed, n_layers), avg_tokens)
        else:
            raise PlanError(f"plan must be a plan string, a Plan or a preset name, got {type(plan).__name__}")
        source.small_images = small_images
        source._check(source.plan_for(NOMINAL_VISUAL_TOKENS, strict=False))
        return source

    def _check(self, plan: Plan) -> None:
        plan.validate_for(self.adapter.n_layers, self.adapter.rope)
        for i, stage in enumerate(plan.stages):
            needs = self.policy(plan, i).needs
            if stage.where == "pre" and not needs.pre:
                reason = "needs attention rows from inside the language model" if needs.attention else "runs only in it"
                raise PlanError(
                    f"stage {stage}: {stage.policy!r} {reason}, so it cannot run at 'pre'; give a layer K >= 1"
                )
            if needs.merges and not self.adapter.supports_merging:
                raise PlanError(
                    f"stage {stage}: {type(self.adapter).__name__} cannot run merging policies ({stage.policy!r}); "
                    f"use a selection policy: {policy_names(lambda n: not n.merges)}"
                )
            if needs.merges and stage.budget == 0:
                raise PlanError(f"stage {stage}: a merging policy needs a budget >= 1 (it pools into that many tokens)")
            if stage.where != "pre" and needs.merges:
                raise PlanError(
                    f"stage {stage}: {stage.policy!r} merges tokens into new embeddings and runs only at 'pre'"
                )
            if stage.where != "pre" and needs.vision:
                raise PlanError(f"stage {stage}: {stage.policy!r} reads the vision tower and runs only at 'pre'")
            if stage.where != "pre" and not needs.llm:
                raise PlanError(f"stage {stage}: {stage.policy!r} runs only at 'pre'")
            if needs.recycles and stage.where != "pre" and stage.layer < self.adapter.injection_layers():
                raise PlanError(
                    f"stage {stage}: {stage.policy!r} recycles pruned tokens into slots whose features the model "
                    f"adds again after layers 0..{self.adapter.injection_layers() - 1} (DeepStack); "
                    f"place it at K >= {self.adapter.injection_layers()}"
                )
            if stage.where == 0 and needs.attention == "previous":
                raise PlanError(f"stage {stage}: {stage.policy!r} needs layer K-1's attention; use K >= 1")

    def sample_plans(self, n_visual: list[int]) -> list[Plan]:
        """Each sample's plan: under `avg_tokens`, solved for the sample's own visual tokens.

        Raises PlanError, naming the sample and the valid range, when a budget is out of reach;
        with `small_images="keep"`, a sample below `avg_tokens` (see `below_budget`) instead runs
        the template's stages with a count budget of all its tokens.
        """
        if self.fixed is not None:
            return [self.fixed] * max(len(n_visual), 1)
        plans = []
        for b, n in enumerate(n_visual):
            if n == 0:  # a text-only sample keeps nothing visual whatever its budgets
                plans.append(self._any_plan())
                continue
            if self._keeps_all(n):
                plans.append(self._keep_all_plan(n))
                continue
            try:
                plans.append(self.plan_for(n))
            except PlanError as err:
                raise PlanError(f"sample {b} of the batch ({n} visual tokens): {err}") from None
        return plans or [self._any_plan()]

    def below_budget(self, n_visual: list[int]) -> list[int]:
        """The samples (batch indices) that keep every visual token under `small_images="keep"`."""
        return [b for b, n in enumerate(n_visual) if n and self._keeps_all(n)]

    def _keeps_all(self, n_visual: int) -> bool:
        return self.small_images == "keep" and self.template is not None and n_visual < (self.avg_tokens or 0)

    def _keep_all_plan(self, n_visual: int) -> Plan:
        """The template's stages (places, policies, positions), each keeping all `n_visual` tokens."""
        key = -n_visual  # memoised beside the solved plans, which use positive keys
        plan = self._solved.get(key)
        if plan is None:
            base = self.template.build(self.adapter.n_layers, rope=self.adapter.rope)  # type: ignore[union-attr]
            plan = Plan(tuple(replace(s, budget=n_visual, relative=False) for s in base.stages))
            if len(self._solved) >= _MAX_SOLVED:
                self._solved.clear()
            self._solved[key] = plan
        return plan

    def plan_for(self, n_visual: int, strict: bool = True) -> Plan:
        """The plan for a sample with `n_visual` visual tokens (memoised per count)."""
        if self.fixed is not None:
            return self.fixed
        assert self.template is not None and self.avg_tokens is not None
        key = max(n_visual, 1)
        plan = self._solved.get(key)  # shared by concurrent requests: read once, never re-read
        if plan is None:
            try:
                plan = self.template.build(self.adapter.n_layers, self.avg_tokens, key, self.adapter.rope)
            except PlanError:
                if strict:
                    raise
                return self.template.build(self.adapter.n_layers, rope=self.adapter.rope)
            if len(self._solved) >= _MAX_SOLVED:  # dynamic resolution: bound the memo
                self._solved.clear()
            self._solved[key] = plan
        return plan

    def policy(self, plan: Plan, index: int) -> Policy:
        stage = plan.stages[index]
        key = (stage.policy, stage.params, index)  # not the budget: solved budgets vary per input
        if key not in self._policies:
            self._policies[key] = build_policy(stage)
        return self._policies[key]

    def _any_plan(self) -> Plan:
        return self.plan_for(NOMINAL_VISUAL_TOKENS, strict=False)

    def first_llm_layer(self) -> int | None:
        layers = [s.where for s in self._any_plan().stages if s.where != "pre"]
        return min(layers) if layers else None  # type: ignore[type-var]

    def needs_attention(self) -> bool:
        plan = self._any_plan()
        return any(self.policy(plan, i).needs.attention is not None for i in range(len(plan.stages)))

    @staticmethod
    def stage_index_at(plan: Plan, layer: int) -> int | None:
        for i, stage in enumerate(plan.stages):
            if stage.where == layer:
                return i
        return None
