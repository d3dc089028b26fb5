"""`cdpruner` keeps what CDPruner's official code keeps (tests/official.py, `official_cdpruner`).

The official rule is rebuilt line by line from Theia-4869/CDPruner (`llava_arch.py`,
`encode_images`) and fed what pruneware's substitute feeds it: the projected visual tokens as
both the similarity features and the image embeddings, and the language model's input
embeddings of the text after the image as the text embeddings, with the official (negative)
sign. On random inputs at several sizes, and end to end on tiny LLaVA and Qwen2-VL in a
left-padded batch with both kernel backends, the kept sets must be identical.
"""

from __future__ import annotations

import pytest
import torch

import pruneware
from pruneware.errors import PlanError
from pruneware.integrations.vllm.spec import check_stage
from pruneware.kernels import dispatch
from pruneware.plans.plan import Stage
from pruneware.policies import StageInput
from pruneware.policies.base import TextRows
from pruneware.policies.cdpruner import CDPrunerPolicy, instruction_relevance
from tests.official import official_cdpruner
from tests.reference import pad_batch, record_lm_inputs
from tests.tiny import IMAGE_TOKEN, llava_inputs, qwen_media_inputs, tiny_llava, tiny_qwen2_vl


def one_image_input(x: torch.Tensor, text: torch.Tensor) -> StageInput:
    """A StageInput of one sample with one image of x [N, D] and text rows text [T, D]."""
    n, t = x.shape[0], text.shape[0]
    return StageInput(
        hidden=x[None], valid=torch.ones(1, n, dtype=torch.bool), image_ids=torch.zeros(1, n, dtype=torch.long),
        attention=None, seed=0, layer=0, sizes=[[n]],
        text=TextRows(text[None], torch.ones(1, t, dtype=torch.bool), None),
    )


@pytest.mark.parametrize("n, d, t, k", [(24, 32, 3, 6), (63, 96, 7, 16), (120, 128, 12, 40), (576, 96, 9, 64)])
def test_the_rule_matches_the_official_code(n, d, t, k):
    gen = torch.Generator().manual_seed(n)
    x, text = torch.randn(n, d, generator=gen), torch.randn(t, d, generator=gen)
    want = official_cdpruner(x[None], x[None], text, k)[0].nonzero().squeeze(1)
    got = CDPrunerPolicy(relevance="negative").select(one_image_input(x, text), [k])[0]
    assert torch.equal(got, want)
    # The default sign conditions on the other end of the relevance, so it keeps another set.
    assert not torch.equal(CDPrunerPolicy().select(one_image_input(x, text), [k])[0], want)


def official_kept(model, sample: dict, k: int) -> torch.Tensor:
    """Positions the official rule keeps for one unpadded sample: projected tokens from the
    language model's input, the text after the last visual token as the instruction."""
    embeds = record_lm_inputs(model, sample)["embeds"][0]  # [L, D]
    ids = sample["input_ids"][0]
    visual = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    after = torch.arange(ids.numel())[visual[-1] + 1:]
    mask = official_cdpruner(embeds[visual][None], embeds[visual][None], embeds[after], k)[0]
    return visual[mask]


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_the_engine_feeds_the_official_rule(family, kernels, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, kernels)
    torch.manual_seed(0)
    if family == "llava":
        model = tiny_llava(image_size=112)  # 64 visual tokens
        samples = [llava_inputs(model, [(5, 1, 9)], seed=1), llava_inputs(model, [(12, 1, 4)], seed=2)]
    else:
        model = tiny_qwen2_vl()
        samples = [qwen_media_inputs(model, [[5, ("image", 16, 16), 9]], seed=1),
                   qwen_media_inputs(model, [[12, ("image", 16, 16), 4]], seed=2)]
    k = 12
    want = [official_kept(model, s, k) for s in samples]
    batch = pad_batch(samples)
    pads = (batch["attention_mask"] == 0).sum(dim=1).tolist()
    with pruneware.prune(model, f"cdpruner[relevance=negative]@pre:{k}") as run, torch.no_grad():
        model(**batch)
    got = [kept - pad for kept, pad in zip(run.report.stages[0].kept, pads, strict=True)]
    for b in range(2):
        assert torch.equal(got[b], want[b]), f"sample {b}: {got[b].tolist()} != {want[b].tolist()}"


def test_relevance_variants():
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 10, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    valid, text_valid = torch.ones(2, 10, dtype=torch.bool), torch.tensor([[True, True, False], [True, True, True]])
    valid[1, 7:] = False
    pos = instruction_relevance(x, valid, text, text_valid, "positive")
    neg = instruction_relevance(x, valid, text, text_valid, "negative")
    # Min-max per sample over the valid tokens: the ends are 1e-6/span and 1 + 1e-6/span; padding is 0.
    assert pos[1, 7:].eq(0).all() and neg[1, 7:].eq(0).all()
    for rel in (pos, neg):
        assert torch.allclose(rel[valid].view(-1).max(), torch.tensor(1.0), atol=1e-5)
    # The two signs order the tokens in reverse (the padded text row of sample 0 is left out).
    assert torch.equal(pos[0].argsort(), neg[0].argsort().flip(0))
    unit = torch.nn.functional.normalize
    raw = (unit(x[0], dim=-1) @ unit(text[0, :2], dim=-1).T).mean(dim=1)
    assert torch.allclose(pos[0], (raw - raw.min() + 1e-6) / (raw.max() - raw.min()), atol=1e-6)
    assert instruction_relevance(x, valid, text, text_valid, "none")[valid].eq(1e-6).all()  # flat: one value
    theta = instruction_relevance(x, valid, text, text_valid, "positive", theta=0.5)
    assert torch.allclose(theta[valid], torch.exp(0.5 / (2 * 0.5) * pos[valid]))


@pytest.mark.parametrize("param, match", [
    ("relevance=bogus", r"relevance must be one of \('positive', 'negative', 'none'\), got 'bogus'"),
    ("theta=1.5", r"theta must be None or a number in \(0, 1\), got 1.5"),
])
def test_bad_parameters_are_named_and_leave_the_model_as_it_was(param, match):
    model = tiny_llava()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=match):
        with pruneware.prune(model, f"cdpruner[{param}]@pre:8"):
            pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_vllm_refuses_it_by_name():
    with pytest.raises(PlanError, match="instruction's text embeddings.*pre-LLM policies: .*divprune"):
        check_stage(Stage.parse("cdpruner@pre:8"))
