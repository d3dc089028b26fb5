"""The lmms-eval model classes in process, on the embedded tiny LLaVA: batching, multi-round,
loglikelihood, errors. Skipped without lmms-eval (`.ci/install_lmms.sh`)."""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not importable: run .ci/install_lmms.sh to install it")

from lmms_eval.api.instance import Instance  # noqa: E402

from pruneware.evals.datasets import load_benchmark  # noqa: E402
import torch  # noqa: E402

from pruneware.integrations.lmms_eval.model import PrunewareChat, PrunewareSimple  # noqa: E402
from pruneware.integrations.lmms_eval.prompting import from_messages, render  # noqa: E402

PLAN = "divprune@pre:0.25"
GEN = {"max_new_tokens": 3, "temperature": 0, "do_sample": False}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [{"image": it.image, "question": it.question, "answer": it.answer} for it in load_benchmark("synthetic", limit=6, seed=3)]


def _messages(doc: dict, **_: object) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}]}]


def _chat_requests(n: int, gen: dict | None = None) -> list[Instance]:
    return [Instance("generate_until", ("", _messages, dict(gen or GEN), i, "t", "test"), 0, {"task": "t", "doc_id": i, "repeats": 1})
            for i in range(n)]  # fmt: skip


def _model(cls, docs, pretrained_override: str = "tiny-llava", **kwargs):
    model = cls(pretrained=pretrained_override, plan=PLAN, device="cpu", **kwargs)
    model.task_dict = {"t": {"test": docs}}
    return model


@pytest.fixture(scope="module")
def chat(docs) -> PrunewareChat:
    return _model(PrunewareChat, docs, batch_size=4)


def test_batched_left_padded_answers_equal_one_by_one(chat, docs):
    batched = [r.text for r in chat.generate_until(_chat_requests(len(docs)))]
    single = _model(PrunewareChat, docs, batch_size=1)
    alone = [r.text for r in single.generate_until(_chat_requests(len(docs)))]
    assert batched == alone
    assert len({len(d["question"]) for d in docs}) > 1  # prompts of different lengths: padding was exercised
    assert all(r["stages"][0]["kept"] == r["stages"][0]["of"] // 4 for r in chat.cost.requests[-len(docs):])


def test_simple_interface_gives_the_chat_answers(chat, docs):
    simple = _model(PrunewareSimple, docs, batch_size=3)
    requests = [Instance("generate_until", (d["question"], dict(GEN), lambda doc: [doc["image"]], i, "t", "test"), 0,
                         {"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]  # fmt: skip
    assert [r.text for r in simple.generate_until(requests)] == [r.text for r in chat.generate_until(_chat_requests(len(docs)))]


def test_until_cuts_and_settings_group_batches(chat):
    plain = [r.text for r in chat.generate_until(_chat_requests(2))]
    cut = {**GEN, "until": [plain[0][1:2] or "x"]}  # a stop string inside the first answer
    mixed = chat.generate_until(_chat_requests(1, cut) + _chat_requests(2)[1:])
    assert mixed[0].text == plain[0].split(cut["until"][0], 1)[0].strip()
    assert mixed[1].text == plain[1]


def test_generation_errors_propagate(chat, monkeypatch):
    def broken(**_):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(chat.model, "generate", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        chat.generate_until(_chat_requests(2))


def test_multi_round_asks_the_task_for_each_round(chat, docs):
    seen = []

    def rounds(doc, round_idx=None, previous_output=None, previous_round_info=None):
        if round_idx is None:
            return _messages(doc)
        seen.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return (None, True, previous_output, previous_round_info)
        return (_messages(docs[1]), False, previous_output, {"round": round_idx})

    request = Instance("generate_until_multi_round", ("", rounds, dict(GEN), 0, "t", "test"), 0, {"task": "t", "doc_id": 0, "repeats": 1})
    [outputs] = chat.generate_until_multi_round([request])
    first, second = (r.text for r in chat.generate_until(_chat_requests(2)))
    assert outputs == [first, second]
    assert seen == [(1, [first], None), (2, [first, second], {"round": 1})]


def test_loglikelihood_scores_the_greedy_answer_highest(chat, docs):
    [answer] = [r.text for r in chat.generate_until(_chat_requests(1, {**GEN, "max_new_tokens": 1}))]
    other = "no" if answer != "no" else "yes"
    visual = lambda doc: [doc["image"]]  # noqa: E731
    requests = [Instance("loglikelihood", (docs[0]["question"], c, visual, 0, "t", "test"), 0, {"task": "t", "doc_id": 0, "repeats": 1})
                for c in (answer, other)]  # fmt: skip
    (lp_answer, greedy_answer), (lp_other, greedy_other) = chat.loglikelihood(requests)
    assert greedy_answer and not greedy_other
    assert lp_other < lp_answer <= 0


def test_qwen_family_is_picked_by_model_type(docs):
    """tiny-qwen2.5-vl (M-RoPE, dynamic resolution) through the same class: batched answers equal
    one-by-one answers, and the pre stage keeps a quarter of each image's tokens."""
    batched = _model(PrunewareChat, docs, batch_size=3, pretrained_override="tiny-qwen2.5-vl")
    alone = _model(PrunewareChat, docs, batch_size=1, pretrained_override="tiny-qwen2.5-vl")
    assert batched.model.config.model_type == "qwen2_5_vl"
    assert [r.text for r in batched.generate_until(_chat_requests(4))] == [r.text for r in alone.generate_until(_chat_requests(4))]
    assert all(r["stages"][0]["kept"] == round(r["stages"][0]["of"] * 0.25) for r in batched.cost.requests)


def test_unsupported_model_is_refused(tmp_path):
    from transformers import AutoConfig

    from pruneware.integrations.lmms_eval.args import ModelArgs, ModelArgsError, load_model

    AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelArgsError, match=r"model_type 'gpt2'; pruneware supports .*llava"):
        load_model(ModelArgs.parse(pretrained=str(tmp_path)))


def test_qwen_images_take_qwen_vl_utils_route(docs):
    """A Qwen model's images reach the processor as `qwen_vl_utils` sizes them (the same pixels and
    grid as pruneware's own evals, `qwen_inputs`); for an image whose sides are not whole merge
    units this differs from the processor alone (tiny-qwen2.5-vl: 46x52 patches alone, 44x54 here)."""
    import numpy as np
    from PIL import Image

    from pruneware.evals.qwen_inputs import qwen_inputs

    model = _model(PrunewareChat, docs, batch_size=2, pretrained_override="tiny-qwen2.5-vl")
    odd = Image.fromarray(np.random.default_rng(0).integers(0, 255, (257, 301, 3), dtype=np.uint8))
    images = [[odd], [docs[0]["image"]]]
    prompts = [from_messages([{"role": "user", "content": [{"type": "image", "url": im[0]}, {"type": "text", "text": "q"}]}])
               for im in images]  # fmt: skip
    got = model._inputs([render(model.processor, p) for p in prompts], images)
    want = qwen_inputs(model.processor, ["q", "q"], images=[odd, docs[0]["image"]])
    alone = model.processor(text=["<|image_pad|>"], images=[odd], return_tensors="pt")
    assert got["image_grid_thw"].tolist() == want["image_grid_thw"].tolist()
    assert got["image_grid_thw"][0].tolist() != alone["image_grid_thw"][0].tolist()
    assert torch.equal(got["pixel_values"], want["pixel_values"])
