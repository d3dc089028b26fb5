"""Every registered policy, on tiny LLaVA and tiny Qwen2.5-VL, through the core properties
(STYLE.md #6). A new policy is covered by registering it: the cases come from the registry at
collection time, and each policy's places come from what its class declares.

  (a) keep-all (budget 1.0) is bit-identical to the unpruned model;
  (b) a left-padded batch equals its samples run alone: last-token logits and kept indices;
  (c) the model is restored afterwards (prune and attach/detach): parameters and buffers,
      hooks on every module, instance forwards, attention implementations and registries;
  (d) cached `generate` equals uncached recomputation: for policies whose choice does not read
      the text, a loop of full forwards under the same plan; for attention policies (whose query
      rows grow with every generated token, so recomputing the choice is not the same function),
      the plain-loop reference over prompt + generated tokens that drops what the prefill dropped
      (a recycling policy's new states for the prompt rows are taken from the prefill).

In-LLM stages sit at layer 2 (a stage at layer 0 has its own generate tests in
tests/engine/test_layer0_generate.py); known open bugs are strict xfails, so a case flips when
its bug is fixed.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import pruneware
from pruneware.policies import available
from tests.reference import kept_positions, pad_batch, record_lm_inputs, reference_logits, uncached_greedy
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen

FAMILIES = ["llava", "qwen"]
LAYER = 2  # in-LLM stages: >= 1 (attention policies read layer K-1), and past no injection layers here
BUDGET = 0.5  # a pruning budget every policy can meet on 16 (LLaVA) or 24 (Qwen) visual tokens
STEPS = 3  # new tokens for (d)


def placements(cls) -> list[str | int]:
    """Where a policy class may run, as its `needs` declares (`pre` unless it needs attention rows
    from inside the LLM; in the LLM unless it merges into new embeddings or reads the vision tower)."""
    out: list[str | int] = []
    if cls.needs.pre:
        out.append("pre")
    if cls.needs.llm:
        out.append(LAYER)
    return out


CASES = [(name, where) for name, cls in sorted(available().items()) for where in placements(cls)]


def _reads_text(name: str) -> bool:
    """The policy's choice depends on the query rows (the last or post-image text tokens), through
    attention or, for `Needs(text=True)` (CDPruner), their states."""
    needs = available()[name].needs
    return needs.attention is not None or needs.text


# Known open bugs (filed elsewhere). strict: the case flips to a failure when the bug is fixed.
KNOWN: dict[tuple[str, str, str], str] = {}

# Keep-all cannot be bit-identical by design: the stage changes embeddings even at a full budget.
NOT_IDENTITY: dict[str, str] = {}
NEAR_IDENTITY = {  # ... but only by rounding: checked within 1e-5 instead
    "sparsevlm": "SparseVLM's official rule keeps at most n - 1 tokens and recycles the rest as a cluster mean "
    "weighted 1 / (size + 1e-6), so at a full budget one token's state is scaled by 1 / (1 + 1e-6) (checked "
    "exactly in test_sparsevlm.py; docs/methods.md)",
}


def cases(prop: str):
    out = []
    for name, where in CASES:
        for family in FAMILIES:
            marks = []
            reason = KNOWN.get((prop, name, family)) or KNOWN.get((prop, name, "*"))
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            out.append(pytest.param(name, where, family, marks=marks, id=f"{name}@{where}-{family}"))
    return out


def model_for(family: str):
    return tiny_llava() if family == "llava" else tiny_qwen()


def one_sample(model, family: str) -> dict:
    if family == "llava":
        return llava_inputs(model, [(4, 1, 5)])
    return qwen_inputs(model, [(3, [(8, 12)], 5)])


def batch_samples(model, family: str) -> list[dict]:
    """Samples of different lengths (the equivalence suite's), one with two images, and a short one
    that sits behind much padding."""
    if family == "llava":
        return [llava_inputs(model, [(2, 1, 7)], seed=1), llava_inputs(model, [(6, 1, 2)], seed=2),
                llava_inputs(model, [(3, 2, 3)], seed=3), llava_inputs(model, [(1, 1, 1)], seed=5)]
    return [qwen_inputs(model, [(2, [(8, 8)], 6)], seed=1), qwen_inputs(model, [(5, [(8, 12)], 2)], seed=2),
            qwen_inputs(model, [(3, [(4, 8), (8, 8)], 3)], seed=3), qwen_inputs(model, [(1, [(4, 4)], 1)], seed=5)]


def plan(name: str, where: str | int, budget: float = BUDGET) -> str:
    return f"{name}@{where}:{budget}"


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_every_policy_has_a_place():
    # Policies that run only in or before the vision tower are covered by test_every_policy_vit.py.
    vision_only = {n for n, cls in available().items() if cls.needs.vit and not (cls.needs.pre or cls.needs.llm)}
    assert CASES and {name for name, _ in CASES} | vision_only == set(available())


# (a) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "where", "family"), cases("keep_all"))
def test_keep_all_is_bit_identical(name, where, family):
    if name in NOT_IDENTITY:
        pytest.skip(NOT_IDENTITY[name])
    model = model_for(family)
    inputs = one_sample(model, family)
    expected = logits(model, inputs)
    with pruneware.prune(model, plan(name, where, 1.0)) as run:
        got = logits(model, inputs)
    n_visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    assert [s.n_after for s in run.report.stages] == [[n_visual]]
    assert got.shape == expected.shape
    if name in NEAR_IDENTITY:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=NEAR_IDENTITY[name])
    else:
        assert torch.equal(got, expected)


# (b) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "where", "family"), cases("padded"))
def test_padded_batch_equals_samples_alone(name, where, family):
    model = model_for(family)
    samples = batch_samples(model, family)
    batch = pad_batch(samples)
    with pruneware.prune(model, plan(name, where), seed=2) as run:
        batched = logits(model, batch)
        batch_kept = [s.kept for s in run.report.stages]
        for b, sample in enumerate(samples):
            alone = logits(model, sample)
            offset = batch["input_ids"].shape[1] - sample["input_ids"].shape[1]
            for stage_kept, stage in zip(batch_kept, run.report.stages, strict=True):
                assert stage.n_after[0] < stage.n_before[0]  # it really prunes
                assert torch.equal(stage_kept[b] - offset, stage.kept[0]), f"sample {b}: kept indices differ"
            torch.testing.assert_close(batched[b, -1], alone[0, -1], atol=2e-5, rtol=1e-4)


# (c) -------------------------------------------------------------------------------------------


def fingerprint(model) -> dict:
    """Everything a session may touch, but the weights."""
    config = model.config
    return {
        "hooks": {
            name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks), tuple(m._backward_hooks))
            for name, m in model.named_modules()
        },
        "global_hooks": (
            tuple(torch.nn.modules.module._global_forward_pre_hooks),
            tuple(torch.nn.modules.module._global_forward_hooks),
        ),
        "instance_forwards": sorted(name for name, m in model.named_modules() if "forward" in vars(m)),
        "attn": (
            config._attn_implementation,
            config.get_text_config()._attn_implementation,
            config.vision_config._attn_implementation,
        ),
        "attention_registry": sorted(AttentionInterface._global_mapping),
        "mask_registry": sorted(AttentionMaskInterface._global_mapping),
    }


def tensors(model) -> dict[str, torch.Tensor]:
    """Parameters and buffers (persistent or not, e.g. rotary inv_freq), cloned."""
    out = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters()}
    out.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()})
    return out


@pytest.mark.parametrize(("name", "where", "family"), cases("restored"))
def test_model_is_restored(name, where, family):
    model = model_for(family)
    inputs = one_sample(model, family)
    expected = logits(model, inputs)  # transformers installs its own capture hooks on a first forward
    before, weights = fingerprint(model), tensors(model)
    with pruneware.prune(model, plan(name, where)) as run:
        logits(model, inputs)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert run.report.stages[0].n_after[0] < run.report.stages[0].n_before[0]
    assert fingerprint(model) == before
    pruneware.attach(model, plan(name, where))
    try:
        logits(model, inputs)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        pruneware.detach(model)
    assert fingerprint(model) == before
    after = tensors(model)
    assert after.keys() == weights.keys()
    changed = [k for k in weights if not torch.equal(after[k], weights[k])]
    assert not changed, changed
    assert torch.equal(logits(model, inputs), expected)


# (d) -------------------------------------------------------------------------------------------


def _first_input(module: torch.nn.Module, store: list):
    """Record the hidden states `module` (a decoder layer) receives on its first call: the prefill's."""
    def hook(_module, args, kwargs):
        if not store:
            store.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _replaying(module: torch.nn.Module, rows: torch.Tensor):
    """Make `module` (a decoder layer) take `rows` [1, L', D] as the states of the first L' rows of its input."""
    def hook(_module, args, kwargs):
        hidden = args[0].clone()
        hidden[:, : rows.shape[1]] = rows
        return (hidden, *args[1:]), kwargs
    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(("name", "where", "family"), cases("generate"))
def test_cached_generate_equals_uncached_recomputation(name, where, family):
    model = model_for(family)
    inputs = one_sample(model, family)
    layers = model.model.language_model.layers
    recycles = available()[name].needs.recycles and where != "pre"
    kw = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    prefill: list[torch.Tensor] = []
    with pruneware.prune(model, plan(name, where), seed=5) as run:
        handle = _first_input(layers[where], prefill) if recycles else None
        try:
            out = model.generate(**inputs, **kw)
        finally:
            if handle is not None:
                handle.remove()
        kept = [(0 if s.where == "pre" else s.where, s.kept[0]) for s in run.report.stages]
        assert run.report.stages[0].n_after[0] < run.report.stages[0].n_before[0]
        if not _reads_text(name):
            ids, uncached = uncached_greedy(model, inputs, STEPS)
    cached = torch.stack(out.logits, 1)
    if not _reads_text(name):
        assert torch.equal(out.sequences, ids)
        torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)
        return
    # Recomputing an attention policy's choice on prompt + generated tokens reads other query rows:
    # the reference keeps the prefill's choice and recomputes everything else without a cache. A
    # recycling policy also gives some kept slots new states: the reference takes the prompt rows'
    # states at the stage from the prefill (its own tests check those states), and recomputes the rest.
    length = inputs["input_ids"].shape[1]
    for t in range(STEPS):
        seq = out.sequences[:, : length + t]
        step = {**inputs, "input_ids": seq, "attention_mask": torch.ones_like(seq)}
        if "mm_token_type_ids" in inputs:
            step["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, t))
        stages = [(layer, kept_positions(seq[0], [IMAGE_TOKEN], k)) for layer, k in kept]
        seen = record_lm_inputs(model, step)
        handle = _replaying(layers[where], prefill[0]) if recycles else None
        try:
            with torch.no_grad():
                want = reference_logits(model, seen, stages)[0, -1]
        finally:
            if handle is not None:
                handle.remove()
        torch.testing.assert_close(cached[0, t], want, atol=1e-4, rtol=1e-4)
        assert int(want.argmax()) == int(out.sequences[0, length + t]), f"step {t}: greedy token differs"
