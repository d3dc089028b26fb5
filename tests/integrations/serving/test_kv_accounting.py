"""In-LLM stages shrink the KV cache by the pruned share, in the KV-cache manager's own accounting.

On the real vLLM CPU engine (`drive_kv`): the layers of each pruned level form KV-cache groups of
their own (`deep_kv.DeepLevelSpec`), and right after its prefill a request holds
ceil(prompt / block) blocks in the unpruned layers' group and ceil((prompt - dropped) / block) in
each level's groups, dropped being what the plan removes of the image's tokens by that level
(computed here from the budgets by hand). On Qwen the images of one batch have different sizes, so
each request drops a different count. The engine's peak block usage falls below the unpruned
engine's for the same requests. Answers are checked against the HF path in `test_in_llm.py` (the
same engines build these groups)."""

from __future__ import annotations

import math

import pytest
import torch

import pruneware
from pruneware import models
from pruneware.evals.synthetic import make_split
from pruneware.evals.synthetic.accuracy import predict
from tests.integrations.serving.conftest import run_driver

pytestmark = pytest.mark.slow
N = 6
SIZES = {"tiny-llava": None, "tiny-qwen2.5-vl": [[336, 336], [448, 280], [224, 392]]}
# plan -> (first layer of each level, share of an image's tokens alive at each level)
CASES = {
    ("tiny-llava", "random@4:0.25"): ([4], [0.25]),
    ("tiny-llava", "pdrop@2:0.5,pdrop@4:0.25,pdrop@6:0.1"): ([2, 4, 6], [0.5, 0.25, 0.1]),
    ("tiny-qwen2.5-vl", "fastv@2:0.1"): ([2], [0.1]),  # 6 deep layers: vLLM splits them over 3 groups
    ("tiny-qwen2.5-vl", "random@4:0.25"): ([4], [0.25]),
}


def drive(python, model: str, plan: str) -> dict:
    return run_driver(python, "tests.integrations.serving.drive_kv", {"model": model, "plan": plan, "n": N, "sizes": SIZES[model]})


@pytest.fixture(scope="module")
def unpruned(vllm_python):
    return {model: drive(vllm_python, model, "none") for model in SIZES}


@pytest.mark.parametrize(("model", "plan"), list(CASES))
def test_deep_levels_hold_blocks_for_the_tokens_they_keep(vllm_python, unpruned, model, plan):
    starts, alive = CASES[(model, plan)]
    out = drive(vllm_python, model, plan)
    block = out["block_size"]
    layer_level = {}
    for group in out["groups"]:
        for name in group["layers"]:
            layer_level[int(name.split(".layers.")[1].split(".")[0])] = (group["level"], group["spec"])
    for layer, (level, spec) in layer_level.items():
        expected = sum(layer >= start for start in starts)
        assert level == expected, f"layer {layer} is in a level-{level} group, expected level {expected}"
        assert spec == ("FullAttentionSpec" if expected == 0 else "DeepLevelSpec")
    for blocks, prompt, visual in zip(out["blocks"], out["prompt_lengths"], out["visual_tokens"], strict=True):
        per_group = {}
        for group, count in zip(out["groups"], blocks, strict=True):
            per_group.setdefault(group["level"], set()).add(count)
        assert per_group[0] == {math.ceil(prompt / block)}
        for level, share in enumerate(alive, start=1):
            kept = max(1, round(share * visual))
            assert per_group[level] == {math.ceil((prompt - (visual - kept)) / block)}, (level, per_group, prompt, visual)
    if SIZES[model]:
        assert len(set(out["visual_tokens"])) == len(SIZES[model])
        # Requests of different sizes batched together answer as the HF path does (its padded batch).
        ours = hf_answers(model, plan, SIZES[model])
        agree = sum(a == b for a, b in zip(ours, out["answers"], strict=True))
        assert agree >= N - 1, f"{model} {plan}: vLLM and HF agree on {agree} of {N} mixed-size questions"


def hf_answers(name: str, plan: str, sizes: list[list[int]]) -> list[str]:
    model, processor = models.load(name)
    items = make_split("eval", N, seed=0)
    for i, item in enumerate(items):
        item.image = item.image.resize(tuple(sizes[i % len(sizes)]))
    with pruneware.prune(model, plan, seed=0), torch.inference_mode():
        return predict(model, processor, items)
    assert out["peak_usage"] < unpruned[model]["peak_usage"]
    assert out["prompt_lengths"] == unpruned[model]["prompt_lengths"]  # in-LLM stages keep every placeholder
