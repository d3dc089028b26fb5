"""What the vLLM plugin prunes: a `pre` stage and in-LLM stages decided before the forward,
read from the model config or the environment, and the fixed token layout each image or video
frame gets.

vLLM fixes every item's placeholder count when it processes the prompt, one item at a time, and
caches items independently; so in vLLM a stage's budget applies **per image and per video
frame** (a ratio of that frame's tokens, or a count per frame), not per sample as in the HF
session. The same `FrameLayout` is used by the processor (prompt and profiling token counts),
by `embed_multimodal` (rows returned) and by the M-RoPE positions, so the three always agree.

This module does not import vllm.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pruneware.integrations.vllm import ENV_PLAN
from pruneware.plans.plan import Plan, PlanError, Stage
from pruneware.policies import Policy, build_policy, get_policy, policy_names
from pruneware.policies.pooling import pooled_shape

IN_LLM_FAMILIES = "LLaVA-1.5, Qwen2-VL and Qwen2.5-VL"  # the classes that install `deep_layers`
# the architectures whose vision tower the plugin runs block by block (`vit`): vision-side stages
VISION_SIDE_ARCHITECTURES = ("PrunewareLlavaForConditionalGeneration", "PrunewareQwen2_5_VLForConditionalGeneration")
CONFIG_KEY = "pruneware"  # hf_overrides={"pruneware": {"plan": ..., "seed": ...}}
CONFIG_FIELDS = ("plan", "seed", "avg_tokens")
SEED_STRIDE = 1_000_003  # the HF session derives stage i's seed as seed * SEED_STRIDE + i

IN_LLM_REFUSAL = (
    "in vLLM a stage inside the LLM either reads no token states (decided before the step) or is "
    "scored by the attention the last token pays at layer K-1 (policies: {names}); other in-LLM "
    "stages ('adaptinfer@1', 'pdrop@8', 'dart@2', 'sparsevlm@2') run in the HF wrapper (pruneware.prune)"
)


@dataclass(frozen=True)
class FrameLayout:
    """Tokens one frame (or image) keeps, and the grid that places them.

    Attributes:
        count: tokens kept; equals rows * cols for pooling, <= rows * cols for selection.
        rows, cols: the pseudo-grid: kept token i (in original raster order) sits at
            (i // cols, i % cols). For pooling it is the pooled grid itself.
    """

    count: int
    rows: int
    cols: int


@dataclass(frozen=True)
class PruneSpec:
    """One pre-LLM stage as the vLLM plugin runs it. `policy` is built from the stage's params.

    With `avg_tokens`, `template` (a preset, or a plan without budgets) is solved per frame for
    that frame's own token count, as the HF session solves it per sample; for a single `pre`
    stage the solution keeps `avg_tokens` tokens (rounded), and an item with fewer tokens than
    that is refused with the solver's error.
    """

    stage: Stage
    seed: int = 0
    avg_tokens: float | None = None
    template: Any = field(default=None, repr=False, compare=False)
    n_layers: int = 32
    rope: Literal["1d", "mrope"] = "1d"
    deep: tuple[Stage, ...] = ()  # the in-LLM stages, in order
    pre_real: bool = True  # False: the plan has no `pre` stage and `stage` keeps every token
    policy: Policy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for stage in (self.stage, *self.deep):
            check_stage(stage)
        reads = [get_policy(s.policy).needs.states for s in self.deep]
        if any(before and not now for before, now in zip(reads, reads[1:])):
            names = policy_names(lambda n: n.llm and not n.states)
            raise PlanError(f"in vLLM an in-LLM stage that reads no states ({names}) cannot follow an "
                            f"attention-scored one: {', '.join(map(str, self.deep))}")
        object.__setattr__(self, "policy", build_policy(self.stage))
        object.__setattr__(self, "deep_policies", tuple(build_policy(s) for s in self.deep))
        object.__setattr__(self, "_solved", {})

    @property
    def stage_seed(self) -> int:
        """The seed of `stage`: the HF session's for stage 0, or for its vision-side stage (one less)."""
        return self.seed * SEED_STRIDE - int(self.stage.in_vision)

    def deep_seed(self, i: int) -> int:
        """The seed of in-LLM stage `i`: the HF session's seed for its index in the plan."""
        return self.seed * SEED_STRIDE + i + int(self.pre_real)

    def budget(self, rows: int, cols: int) -> int:
        """The stage's budget for one frame: what the policy is asked to keep (or pool into)."""
        n = rows * cols
        if self.avg_tokens is None:
            return self.stage.keep_count(n)
        solved = self._solved.get(n)  # type: ignore[attr-defined]
        if solved is None:
            plan = self.template.build(self.n_layers, self.avg_tokens, n, self.rope)
            solved = self._solved[n] = plan.stages[0].keep_count(n)  # type: ignore[attr-defined]
        return solved

    def frame(self, rows: int, cols: int) -> FrameLayout:
        """The layout of one frame of `rows` x `cols` tokens (after the model's spatial merge)."""
        budget = self.budget(rows, cols)
        if self.policy.needs.merges:
            factor = dict(self.stage.params).get("factor")
            pr, pc = pooled_shape(rows, cols, budget, factor)
            return FrameLayout(pr * pc, pr, pc)
        # Selection: keep the image's aspect ratio for the pseudo-grid.
        pc = max(1, min(cols, budget, round(math.sqrt(budget * cols / rows))))
        return FrameLayout(budget, math.ceil(budget / pc), pc)

    def item_tokens(self, frames: int, rows: int, cols: int) -> int:
        """Placeholder tokens for an item of `frames` frames of `rows` x `cols` tokens each."""
        return frames * self.frame(rows, cols).count


def vllm_policy_names() -> str:
    """The policies the plugin runs: pre-LLM, reading neither the vision tower nor the text."""
    return policy_names(lambda n: n.pre and not n.vision and not n.text)


def deep_policy_names() -> str:
    """The policies the plugin runs inside the LLM: those whose kept set needs no states, and
    those scored by the last token's attention at layer K-1."""
    from pruneware.integrations.vllm.deep_scoring import scored_needs

    return policy_names(lambda n: n.llm and (not n.states or scored_needs(n)))


def vit_policy_names() -> str:
    """The policies the plugin runs at `vitK` and `pre-vit`: vision-side ones that read no
    attention of the tower (the plugin runs vLLM's blocks, whose attention it does not read)."""
    return policy_names(lambda n: n.vit and not n.vision)


def check_stage(stage: Stage) -> None:
    """Refuse what vLLM cannot run: in-LLM stages that read states, attention-guided pre-LLM
    policies, and vision-side policies that read the tower's attention."""
    if stage.in_vision:
        needs = get_policy(stage.policy).needs
        if not needs.vit:
            raise PlanError(f"stage {stage}: {stage.policy!r} cannot run in the vision tower; in vLLM: {vit_policy_names()}")
        if needs.vision:
            raise PlanError(
                f"stage {stage}: {stage.policy!r} reads the vision tower's attention, which the vLLM plugin does not "
                f"hook (it runs in the HF wrapper, pruneware.prune); vision-side policies in vLLM: {vit_policy_names()}"
            )
        if stage.budget == 0:
            raise PlanError(f"stage {stage}: a vision-side stage keeps at least one unit per image; use a budget >= 1")
        return
    if isinstance(stage.where, int):
        from pruneware.integrations.vllm.deep_scoring import scored_needs

        needs = get_policy(stage.policy).needs
        if needs.states and not scored_needs(needs):
            raise PlanError(f"stage {stage}: " + IN_LLM_REFUSAL.format(names=deep_policy_names()))
        return
    if stage.where != "pre":
        raise PlanError(f"stage {stage}: unknown place {stage.where!r} for the vLLM plugin")
    cls = get_policy(stage.policy)
    if cls.needs.attention or not cls.needs.pre:
        raise PlanError(
            f"stage {stage}: policy {stage.policy!r} needs attention rows from inside the LLM, which "
            f"vLLM does not expose; pre-LLM policies: {vllm_policy_names()}"
        )
    if cls.needs.text:
        raise PlanError(
            f"stage {stage}: policy {stage.policy!r} reads the instruction's text embeddings beside the image's, "
            f"which vLLM does not pass to the multimodal embedding; pre-LLM policies: {vllm_policy_names()}"
        )
    if cls.needs.vision:
        raise PlanError(
            f"stage {stage}: policy {stage.policy!r} reads the vision tower's attention or resolution, which the "
            f"vLLM plugin does not hook; pre-LLM policies: {vllm_policy_names()} "
            "(vision-score is the plugin's stand-in for [CLS] attention)"
        )
    if stage.budget == 0:
        raise PlanError(f"stage {stage}: vLLM needs at least one placeholder token per item; use a budget >= 1")


def avg_tokens_template(text: str, avg_tokens: float, n_layers: int, rope: Literal["1d", "mrope"]) -> tuple[Stage, Any]:
    """(the stage, the template solved per frame) for a preset or budget-free plan + avg_tokens."""
    from pruneware.plans import available_presets, writes_budgets
    from pruneware.plans.presets import user_template

    text = text.strip()
    presets = available_presets()
    if "@" not in text and text in presets:
        template = presets[text]
    elif writes_budgets(text):
        raise PlanError(
            f"plan {text!r} sets its own budgets, which conflict with avg_tokens={avg_tokens:g}: drop avg_tokens, "
            "or leave the budget out (e.g. 'divprune@pre')"
        )
    else:
        template = user_template(Plan.parse(text), n_layers)
    for stage in template.build(n_layers, rope=rope).all_stages:
        check_stage(stage)  # before solving: "pre only" is the message that matters here
        if stage.where != "pre":
            raise PlanError(f"avg_tokens in vLLM solves one 'pre' stage per frame; plan {text!r} has {stage}: "
                            "give its budgets explicitly instead")
    probe = template.build(n_layers, avg_tokens, max(576, math.ceil(avg_tokens)), rope)
    probe.validate_for(n_layers, rope)
    return probe.stages[0], template


def parse_stages(text: str, n_layers: int, rope: Literal["1d", "mrope"]) -> tuple[Stage | None, tuple[Stage, ...]]:
    """(the `pre` stage or None, the in-LLM stages) of a plan string or preset name, checked for vLLM."""
    from pruneware.plans.presets import available_presets, get_preset

    text = text.strip()
    if "@" not in text and text in available_presets():
        plan = get_preset(text).build(n_layers, rope=rope)
    else:
        plan = Plan.parse(text)
    for stage in plan.all_stages:
        check_stage(stage)  # before validate_for: "pre only" is the message that matters here
    plan.validate_for(n_layers, rope)
    vision = plan.vision
    if vision and len(plan.all_stages) > 1:
        raise PlanError(
            f"plan {text!r}: in vLLM a vision-side stage ({vision[0]}) runs alone; plans that combine it with "
            "'pre' or in-LLM stages run in the HF wrapper (pruneware.prune)"
        )
    if vision:
        return vision[0], ()
    pre = plan.stages[0] if plan.stages and plan.stages[0].where == "pre" else None  # at most one, first
    return pre, tuple(s for s in plan.stages if s.where != "pre")


def has_llm_stages(text: str, scored: bool = False) -> bool:
    """Whether a plan string or preset name has stages inside the LLM (they need prefix caching
    off); with `scored`, stages scored in the step (they need chunked prefill off too)."""
    from pruneware.integrations.vllm.deep_scoring import scored_in_llm

    from pruneware.plans.presets import available_presets, get_preset

    text = text.strip()
    plan = get_preset(text).build(32) if "@" not in text and text in available_presets() else Plan.parse(text)
    return any(isinstance(s.where, int) and (not scored or scored_in_llm(s)) for s in plan.stages)


def spec_for(text: str, seed: int, n_layers: int, rope: Literal["1d", "mrope"]) -> PruneSpec:
    """The spec of a plan with explicit budgets; a plan without a `pre` stage keeps every
    placeholder before the LLM (a keep-all `random@pre:1.0`, which selects every token in order)."""
    pre, deep = parse_stages(text, n_layers, rope)
    if pre is None:
        return PruneSpec(Stage("random", "pre", 1.0), seed, deep=deep, pre_real=False, n_layers=n_layers, rope=rope)
    return PruneSpec(pre, seed, deep=deep, n_layers=n_layers, rope=rope)


def spec_from_config(hf_config: Any, rope: Literal["1d", "mrope"]) -> PruneSpec | None:
    """The spec asked for in `hf_config.pruneware` (from hf_overrides) or, failing that, in
    $PRUNEWARE_VLLM_PLAN; None when neither is set."""
    options = getattr(hf_config, CONFIG_KEY, None)
    if options is None and not os.environ.get(ENV_PLAN, "").strip():
        return None
    if options is None:
        options = {"plan": os.environ[ENV_PLAN]}
    if not isinstance(options, Mapping):
        raise PlanError(f"hf_overrides[{CONFIG_KEY!r}] must be a dict like {{'plan': 'divprune@pre:64'}}, got {options!r}")
    unknown = sorted(set(options) - set(CONFIG_FIELDS))
    if unknown:
        raise PlanError(f"unknown keys {unknown} in hf_overrides[{CONFIG_KEY!r}]; valid keys: {list(CONFIG_FIELDS)}")
    plan = options.get("plan") or os.environ.get(ENV_PLAN, "")
    if not str(plan).strip():
        raise PlanError(f"hf_overrides[{CONFIG_KEY!r}] has no 'plan' and ${ENV_PLAN} is not set")
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PlanError(f"hf_overrides[{CONFIG_KEY!r}]['seed'] must be an integer, got {seed!r}")
    text_config = getattr(hf_config, "text_config", hf_config)
    n_layers = int(getattr(text_config, "num_hidden_layers", 32))
    avg_tokens = options.get("avg_tokens")
    if avg_tokens is None:
        return spec_for(str(plan), seed, n_layers, rope)
    if isinstance(avg_tokens, bool) or not isinstance(avg_tokens, int | float) or avg_tokens < 1:
        raise PlanError(f"hf_overrides[{CONFIG_KEY!r}]['avg_tokens'] must be a number >= 1, got {avg_tokens!r}")
    stage, template = avg_tokens_template(str(plan), float(avg_tokens), n_layers, rope)
    return PruneSpec(stage, seed, avg_tokens=float(avg_tokens), template=template, n_layers=n_layers, rope=rope)


def require_spec(hf_config: Any, architecture: str, rope: Literal["1d", "mrope"]) -> PruneSpec:
    spec = spec_from_config(hf_config, rope)
    if spec is None:
        raise PlanError(
            f"{architecture} needs a plan: pass hf_overrides={{'architectures': ['{architecture}'], "
            f"'{CONFIG_KEY}': {{'plan': 'divprune@pre:0.25'}}}} or set ${ENV_PLAN}"
        )
    if spec.stage.in_vision and architecture not in VISION_SIDE_ARCHITECTURES:
        raise PlanError(f"stage {spec.stage}: the vLLM plugin does not cut {architecture}'s vision tower; vision-side "
                        f"stages ('pre-vit', 'vitK') are served for {', '.join(VISION_SIDE_ARCHITECTURES)} "
                        "(on other families they run in the HF wrapper, pruneware.prune)")
    return spec


def refuse_in_llm(spec: PruneSpec, architecture: str, supported: str) -> None:
    """Refuse in-LLM stages on a family the plugin serves with `pre` stages only."""
    if spec.deep:
        raise PlanError(f"{architecture} runs 'pre' stages only; in-LLM stages ({', '.join(map(str, spec.deep))}) "
                        f"are served for {supported}")


def refuse_tower_lora(vllm_config: Any, architecture: str) -> None:
    """Tower/connector LoRA sizes its token counts from the (pruned) embeddings: refuse it."""
    lora = getattr(vllm_config, "lora_config", None)
    if lora is not None and getattr(lora, "enable_tower_connector_lora", False):
        raise ValueError(f"{architecture} does not support enable_tower_connector_lora: its token counts assume unpruned items")


def square_grid(n: int) -> tuple[int, int]:
    """(s, s) for a square token count, else one row: the grid of an image given only its size."""
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)
