"""Properties of pruned generation, over drawn plans x batches on both tiny families: cached
`generate` (dynamic cache) equals a static cache for every plan, and uncached recomputation
and `generate(use_cache=False)` for every plan whose stages rank without the text, token for
token, with logits to the equivalence suite's tolerance.

A stage that ranks with text rows (the last token's attention, the instruction after the
image: `Needs.attention` or `Needs.text`) ranks, in a recomputation, with the tokens generated
so far as well, so it may keep other tokens than at the prefill: there the cache is the
definition (FastV's code prunes once, at the prefill) and recomputation is no reference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pruneware
from pruneware.policies import get_policy
from tests.properties.strategies import FAMILIES, batches, examples, model, plans, refusals_discarded
from tests.tiny import IMAGE_TOKEN, VIDEO_TOKEN

STEPS = 3
TOL = dict(atol=1e-4, rtol=1e-4)  # as tests/engine/test_equivalence.py compares generated logits
# A random tiny model may well pick the image token (or Qwen's vision start/end) as the next
# token, which would turn its own output into a malformed image placeholder: never generated.
SPECIAL = [IMAGE_TOKEN, VIDEO_TOKEN, 92, 93]


def generate(family: str, inputs: dict, **kwargs):
    out = model(family).generate(
        **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True,
        suppress_tokens=SPECIAL, **kwargs,
    )
    return out.sequences, torch.stack(out.logits, 1)  # logits: raw, before the suppression


def recomputed(family: str, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by a full forward per step (no cache), as `generate` with SPECIAL suppressed:
    ids [B, L + STEPS], raw logits [B, STEPS, V] (tests/reference.py's `uncached_greedy`)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    steps = []
    for _ in range(STEPS):
        kwargs = dict(extra)
        if "mm_token_type_ids" in inputs:
            kwargs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()
        last = model(family)(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits[:, -1]
        steps.append(last)
        allowed = last.clone()
        allowed[:, SPECIAL] = float("-inf")
        ids = torch.cat([ids, allowed.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, torch.stack(steps, 1)


def ranks_with_text(plan) -> bool:
    return any(get_policy(s.policy).needs.attention is not None or get_policy(s.policy).needs.text for s in plan.stages)


@pytest.mark.parametrize("family", FAMILIES)
@examples(8)
@given(data=st.data())
def test_cached_uncached_and_static_generation_agree(family, data):
    plan = data.draw(plans(family), label="plan")
    batch, _ = data.draw(batches(family, max_size=2), label="batch")
    with refusals_discarded(), pruneware.prune(model(family), plan, seed=1), torch.no_grad():
        ids, scores = generate(family, batch)
        paths = {"static cache": generate(family, batch, cache_implementation="static")}
        if not ranks_with_text(plan):
            paths["recomputed"] = recomputed(family, batch)
            paths["use_cache=False"] = generate(family, batch, use_cache=False)
    for name, (other_ids, other_scores) in paths.items():
        assert torch.equal(ids, other_ids), f"{plan}: cached and {name} generate different tokens"
        torch.testing.assert_close(scores, other_scores, **TOL, msg=lambda m: f"{plan}, cached vs {name}: {m}")
