"""Hypothesis strategies for the property-based suite: tiny models, batches and plans.

Plans are drawn over every registered policy (`pruneware.policies.available()`), placed where
its `Needs` allow on the model at hand, so a newly registered policy is covered without
touching this file. Batches are 1-3 left-padded samples with text before and after one or two
images (Qwen images of mixed sizes).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from hypothesis import assume, reject, settings
from hypothesis import strategies as st

import pruneware
from pruneware import Plan, Stage
from pruneware.adapters import adapter_for
from pruneware.policies import available, get_policy
from tests.reference import pad_batch
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen

FAMILIES = ("llava", "qwen")
LAYERS = 4
QWEN_GRIDS = ((4, 4), (4, 8), (8, 8), (8, 12))  # 4, 8, 16 and 24 visual tokens
# The tolerance of the equivalence suite (tests/engine/test_equivalence.py).
ATOL, RTOL = 2e-5, 1e-4


def examples(n: int) -> settings:
    """`n` examples under the `ci` profile, scaled with the loaded profile (x10 under `long`)."""
    return settings(max_examples=max(1, n * settings.default.max_examples // 10))


@functools.cache
def model(family: str):
    torch.manual_seed(0)
    return tiny_llava(layers=LAYERS) if family == "llava" else tiny_qwen(layers=LAYERS)


# --- batches ------------------------------------------------------------------------------------


@st.composite
def sample_specs(draw, family: str) -> tuple:
    """(text before, images, text after): images is a count (LLaVA) or a list of Qwen grids."""
    before, after = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    n_images = draw(st.integers(1, 2))
    images = n_images if family == "llava" else draw(st.lists(st.sampled_from(QWEN_GRIDS), min_size=n_images, max_size=n_images))
    return before, images, after


def build_sample(family: str, spec: tuple, seed: int) -> dict:
    before, images, after = spec
    if family == "llava":
        return llava_inputs(model(family), [(before, images, after)], seed=seed)
    return qwen_inputs(model(family), [(before, list(images), after)], seed=seed)


@st.composite
def batches(draw, family: str, max_size: int = 3) -> tuple[dict, list[dict]]:
    """(a left-padded batch, its samples alone)."""
    specs = draw(st.lists(sample_specs(family), min_size=1, max_size=max_size))
    samples = [build_sample(family, spec, seed) for seed, spec in enumerate(specs)]
    return pad_batch(samples), samples


# --- plans --------------------------------------------------------------------------------------


def allowed(policy: str, where: str | int, family: str) -> bool:
    """Whether `policy`'s declared needs let it run at `where` on this family's tiny model."""
    needs = get_policy(policy).needs
    adapter = adapter_for(model(family))
    if where == "pre":
        return needs.pre and (not needs.merges or adapter.supports_merging)
    return needs.llm and not (needs.attention == "previous" and where == 0) and not (
        needs.recycles and where < adapter.injection_layers()
    )


@st.composite
def budgets(draw, merges: bool) -> tuple[float | int, bool]:
    """(budget, relative): a ratio in (0, 1], a count (>= 1 for a merging policy), or `*r`."""
    kind = draw(st.sampled_from(["ratio", "count", "relative"]))
    if kind == "count":
        return draw(st.integers(1 if merges else 0, 40)), False
    ratio = draw(st.one_of(st.sampled_from([1.0, 0.5, 0.25, 0.1, 0.01]), st.floats(1e-4, 1.0)))
    return ratio, kind == "relative"


@st.composite
def plans(draw, family: str, keep_all: bool = False) -> Plan:
    """A plan of 1-3 stages over the registered policies, at `pre` or layer 0 and at layers
    1..LAYERS-1, in increasing order, that the session accepts for `family`'s tiny model. With `keep_all`,
    every stage keeps everything (a budget ratio of 1.0)."""
    n_stages = draw(st.integers(1, 3))
    places = draw(
        st.lists(st.sampled_from(["pre", *range(LAYERS)]), min_size=n_stages, max_size=n_stages, unique=True)
        .filter(lambda p: not ("pre" in p and 0 in p))  # both run before layer 0: one place
    )
    places.sort(key=lambda where: -1 if where == "pre" else where)
    stages = []
    for where in places:
        options = [name for name in sorted(available()) if allowed(name, where, family)]
        assume(options)
        policy = draw(st.sampled_from(options))
        budget, relative = (1.0, False) if keep_all else draw(budgets(get_policy(policy).needs.merges))
        positions = draw(st.sampled_from(["keep", "compact"])) if family == "llava" else "keep"
        stages.append(Stage(policy, where, budget, positions, relative=relative))
    plan = Plan(tuple(stages))
    try:
        pruneware.prune(model(family), plan)  # creates the session, installs nothing
    except pruneware.PlanError:
        assume(False)  # a rule beyond the declared needs; `test_plans.py` counts how often
    return plan


@contextmanager
def refusals_discarded() -> Iterator[None]:
    """A plan the session accepted may still refuse an input it cannot serve, with a PlanError
    raised before any layer runs (e.g. a count budget `resize` cannot honour on a sample of
    several Qwen images): such an example is discarded, and Hypothesis fails the test if most
    are. Any other exception fails it."""
    try:
        yield
    except pruneware.PlanError:
        reject()


# --- what a report must say ---------------------------------------------------------------------


def visual_positions(input_ids: torch.Tensor) -> set[int]:
    return set((input_ids == IMAGE_TOKEN).nonzero().squeeze(1).tolist())


def n_images(sample: dict, family: str) -> int:
    if family == "llava":
        return int(sample["pixel_values"].shape[0]) if "pixel_values" in sample else 0
    return int(sample["image_grid_thw"].shape[0]) if "image_grid_thw" in sample else 0


def expected_count(stage: Stage, n_visual: int, received: int, images: int) -> int:
    """What a selection stage keeps of the `received` tokens of a sample with `n_visual` visual
    tokens in `images` images: its budget (`Stage.keep_count`), at least one token per image
    unless the budget is 0 (plans/plan.py), never more than it received."""
    count = min(received, stage.keep_count(n_visual, received))
    return min(received, max(count, images)) if count else 0


def check_report(report, batch: dict, samples_images: list[int]) -> None:
    """Kept indices unique, sorted, visual positions of the input, inside the previous stage's
    set, and as many as each stage's budget (or its floor); see `expected_count`."""
    ids = batch["input_ids"]
    for b in range(ids.shape[0]):
        plan = Plan.parse(report.sample_plans[b])
        previous = visual_positions(ids[b])
        n_visual = len(previous)
        for stage, stage_report in zip(plan.stages, report.stages, strict=True):
            kept = stage_report.kept[b].tolist()
            assert kept == sorted(set(kept)), f"{stage}: kept indices not unique and sorted: {kept}"
            assert set(kept) <= previous, f"{stage}: kept {sorted(set(kept) - previous)} outside the previous set"
            received = stage_report.n_before[b]
            assert received == len(previous), f"{stage}: received {received}, the previous stage left {len(previous)}"
            assert stage_report.n_after[b] == len(kept)
            expected = expected_count(stage, n_visual, received, samples_images[b])
            needs = get_policy(stage.policy).needs
            if needs.merges:  # pooled into a grid of at most `expected` cells, >= 1 per image
                assert min(samples_images[b], received) <= len(kept) <= expected, (stage, received, len(kept))
            elif needs.recycles:  # the kept ones plus the merged tokens they recycle into
                assert expected <= len(kept) <= received, (stage, received, len(kept))
            else:
                assert len(kept) == expected, f"{stage}: kept {len(kept)} of {received}, expected {expected}"
            previous = set(kept)
