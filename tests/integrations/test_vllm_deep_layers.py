"""In-LLM stages in the vLLM plugin, without an engine: the plan parsing, which tokens each stage
drops (the HF session's random draw), and the compacted KV layout of a pruned level across
chunked prefill and decode steps, against a plain per-token simulation."""

from __future__ import annotations

import pytest
import torch

from pruneware.integrations.vllm.deep_layers import level_layout
from pruneware.integrations.vllm.prune import deep_levels
from pruneware.integrations.vllm.spec import parse_stages, spec_for
from pruneware.plans import PlanError


def test_plans_split_into_pre_and_in_llm_stages():
    pre, deep = parse_stages("divprune@pre:0.5,random@4:0.25", 8, "1d")
    assert pre is not None and pre.policy == "divprune" and [s.where for s in deep] == [4]
    pre, deep = parse_stages("random@4:0.25", 8, "mrope")
    assert pre is None and deep[0].policy == "random"
    spec = spec_for("random@4:0.25", 0, 8, "1d")
    assert not spec.pre_real and spec.stage.keep_count(576) == 576  # keeps every placeholder


@pytest.mark.parametrize("plan", ["adaptinfer@2:0.5", "divprune@4:64", "sparsevlm@2:0.5", "dart@2:0.5"])
def test_in_llm_stages_that_read_states_are_refused_naming_random(plan):
    with pytest.raises(PlanError, match="random"):
        parse_stages(plan, 8, "1d")


def test_in_llm_stages_need_explicit_budgets_under_avg_tokens():
    from pruneware.integrations.vllm.spec import avg_tokens_template

    with pytest.raises(PlanError, match="explicit"):
        avg_tokens_template("divprune@pre,random@4", 64, 8, "1d")


@pytest.mark.parametrize("seed", [0, 3])
def test_deep_levels_are_the_hf_sessions_random_draw(seed):
    spec = spec_for("divprune@pre:0.5,random@4:0.25,random@6:0.1", seed, 8, "1d")
    levels = deep_levels(spec, 288, 576)
    # Stage 1 (plan index 1) keeps round(0.25 * 576) = 144 of 288 by the top scores of
    # torch.rand(288) seeded seed * 1_000_003 + 1; stage 2 keeps round(0.1 * 576) = 58 of those.
    draw = torch.rand(288, generator=torch.Generator().manual_seed(seed * 1_000_003 + 1))
    kept1 = set(torch.topk(draw, 144).indices.tolist())
    assert set(torch.nonzero(levels != 1).squeeze(1).tolist()) == kept1
    alive = sorted(kept1)
    draw2 = torch.rand(len(alive), generator=torch.Generator().manual_seed(seed * 1_000_003 + 2))
    kept2 = {alive[i] for i in torch.topk(draw2, 58).indices.tolist()}
    assert set(torch.nonzero(levels == 0).squeeze(1).tolist()) == kept2
    assert int((levels == 2).sum()) == 144 - 58


def simulate(requests: list[list[int]], steps: list[list[int]], level: int, block_size: int, table: torch.Tensor):
    """Per-token reference: `requests[r]` is the full list of token levels of request r; each step
    schedules `steps[s][r]` new tokens of each request. Yields (layout, expected) per step."""
    done = [0] * len(requests)
    dropped = torch.zeros(len(requests), dtype=torch.long)
    for counts in steps:
        qsl = torch.tensor([0, *torch.cumsum(torch.tensor(counts), 0).tolist()])
        new = [requests[r][done[r] : done[r] + c] for r, c in enumerate(counts)]
        seq = torch.tensor([done[r] + c for r, c in enumerate(counts)])
        token_levels = torch.tensor([lv for part in new for lv in part], dtype=torch.long)
        before = torch.where(torch.tensor(done) > 0, dropped, 0)
        layout = level_layout(qsl, seq, table, token_levels, level, before, block_size)
        dropped = layout.dropped
        expected_slots, expected_alive, row = [], [], 0
        for r, part in enumerate(new):
            for j, lv in enumerate(part):
                t = done[r] + j
                if lv == 0 or lv > level:
                    # its index among the request's tokens that reach this level
                    c = sum(1 for x in requests[r][:t] if x == 0 or x > level)
                    expected_slots.append(int(table[r, c // block_size]) * block_size + c % block_size)
                    expected_alive.append(row)
                row += 1
        alive_len = [sum(1 for x in requests[r][: done[r] + c] if x == 0 or x > level) for r, c in enumerate(counts)]
        for r, c in enumerate(counts):
            done[r] += c
        yield layout, (expected_alive, expected_slots, alive_len)


@pytest.mark.parametrize("level", [1, 2])
def test_level_layout_equals_a_per_token_simulation_over_chunks_and_decode(level):
    gen = torch.Generator().manual_seed(0)
    requests = []
    for length in (37, 21, 50):
        levels = torch.zeros(length + 6, dtype=torch.long)  # prompt + 6 decode tokens
        image = slice(5, 5 + length // 2)
        levels[image] = torch.randint(0, 3, (image.stop - image.start,), generator=gen)
        requests.append(levels.tolist())
    steps = [[20, 21, 0], [17, 0, 30], [1, 1, 20]] + [[1, 1, 1]] * 5
    table = torch.randperm(64, generator=gen)[:3 * 12].reshape(3, 12)  # distinct blocks per request
    for layout, (alive, slots, lens) in simulate(requests, steps, level, 8, table):
        assert layout.alive.tolist() == alive
        assert layout.slot_mapping.tolist() == slots
        assert layout.seq_lens.tolist() == lens
        assert layout.query_start_loc[-1].item() == len(alive)
