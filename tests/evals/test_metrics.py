"""Metric values against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from pruneware.evals.datasets import Item
from pruneware.evals.metrics import (
    answer_agreement,
    exact_match,
    kv_bytes,
    kv_cache_bytes,
    mme_score,
    next_token_kl,
    normalize_answer,
    parse_yes_no,
    pope_metrics,
    score,
    top1_agreement,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("Two dogs.", "2 dogs"), ("The  Cat!", "cat"), ("1,000", "1000"), ("3.5", "3.5"),
        ("x-ray", "x ray"), ("a", "a"), ("An apple", "apple"), ("none", "0"), ("Yes\n", "yes"),
    ],
)  # fmt: skip
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_normalises_both_sides():
    assert exact_match("Two.", ["2"]) == 1.0
    assert exact_match("the red one", ["blue", "Red One"]) == 1.0
    assert exact_match("red", ["blue"]) == 0.0


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_the_mean_over_ten_choose_nine(matches, expected):
    answers = ["stop"] * matches + ["go"] * (10 - matches)
    assert vqa_accuracy("Stop", answers) == pytest.approx(expected)


def test_vqa_accuracy_small_answer_lists():
    assert vqa_accuracy("two", ["2"]) == 1.0 and vqa_accuracy("3", ["2"]) == 0.0
    # three answers, two match: left-out match -> 1/3, left-out miss -> 2/3; mean (1/3 + 1/3 + 2/3) / 3
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes", "yes"), ("no.", "no"), ("Yes, there is a dog.", "yes"), ("There is no dog.", "no"),
        ("It is not there", "no"), ("I think yes", "yes"), ("maybe", "other"), ("", "other"),
    ],
)  # fmt: skip
def test_parse_yes_no(text, label):
    assert parse_yes_no(text) == label


def test_pope_metrics_by_hand():
    gold = ["yes", "yes", "yes", "no", "no", "no"]
    pred = ["Yes", "yes", "No", "yes", "no", "maybe"]
    # TP = 2, FP = 1, FN = 1; right: 1, 2, 5 -> 3 / 6; predicted yes 3 / 6
    m = pope_metrics(pred, gold)
    assert m == pytest.approx({"accuracy": 0.5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.5})
    assert pope_metrics(["no"] * 2, ["yes", "no"])["f1"] == 0.0


def test_mme_score_acc_plus_by_hand():
    # existence: image 1 both right, image 2 one right -> acc 75, acc+ 50, score 125
    # code_reasoning: one image, both wrong -> 0; an unknown category stays out of the totals
    preds = ["yes", "no", "yes", "yes", "no", "yes", "yes", "no"]
    gold = ["Yes", "No", "Yes", "No", "Yes", "No", "Yes", "No"]
    cats = ["existence"] * 4 + ["code_reasoning"] * 2 + ["other"] * 2
    images = ["e1", "e1", "e2", "e2", "c1", "c1", "o1", "o1"]
    m = mme_score(preds, gold, cats, images)
    assert m["categories"]["existence"] == pytest.approx({"acc": 75.0, "acc_plus": 50.0, "score": 125.0})
    assert m["categories"]["code_reasoning"]["score"] == 0.0 and m["categories"]["other"]["score"] == 200.0
    assert (m["perception"], m["cognition"], m["total"]) == (125.0, 0.0, 125.0)


def _items(answers: list[list[str]], tasks: list[str], image_ids: list[str] | None = None) -> list[Item]:
    ids = image_ids or [f"img{i}" for i in range(len(tasks))]
    return [Item(None, "q?", a, t, f"q{i}", ids[i]) for i, (a, t) in enumerate(zip(answers, tasks))]


def test_score_picks_the_main_metric_per_benchmark():
    items = _items([["red"], ["2"], ["a"]], ["attribute", "counting", "glyph"])
    out = score("synthetic", ["Red", "three", "a"], items)
    assert (out["metric"], out["n"]) == ("accuracy", 3) and out["score"] == pytest.approx(2 / 3)
    assert out["per_task"] == {"attribute": 1.0, "counting": 0.0, "glyph": 1.0}
    assert out["counts"] == {"attribute": 1, "counting": 1, "glyph": 1}

    tv = score("textvqa", ["stop", "go"], _items([["stop"] * 2 + ["x"] * 8, ["go"] * 10], ["textvqa"] * 2))
    assert tv["metric"] == "vqa_accuracy" and tv["score"] == pytest.approx((0.6 + 1.0) / 2)

    pope = score("pope", ["yes", "no", "yes", "yes"], _items([["yes"], ["yes"], ["no"], ["yes"]], ["random", "random", "popular", "popular"]))
    assert pope["metric"] == "f1" and pope["score"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert pope["per_task"] == pytest.approx({"popular": 2 / 3, "random": 2 / 3})
    assert pope["categories"]["random"]["accuracy"] == 0.5 and pope["accuracy"] == 0.5

    mme = score("mme", ["yes", "no"], _items([["Yes"], ["No"]], ["OCR", "OCR"], ["o", "o"]))
    assert mme["metric"] == "total" and mme["score"] == 200.0 and mme["per_task"] == {"OCR": 200.0}

    with pytest.raises(ValueError, match="valid benchmarks: synthetic"):
        score("vqav2", [], [])
    with pytest.raises(ValueError, match="one length"):
        score("gqa", ["a"], [])


def test_top1_agreement_and_kl_by_hand():
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]]))  # a -inf logit in row 0
    pruned = torch.log(torch.tensor([[0.25, 0.75, 1e-9], [0.1, 0.2, 0.7]]))
    kl_row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert next_token_kl(pruned, ref) == pytest.approx(kl_row0 / 2, rel=1e-5)
    assert next_token_kl(ref, ref) == pytest.approx(0.0, abs=1e-7)
    # row 0: ref argmax 0 (tie, first), pruned argmax 1 -> disagree; row 1 agrees
    assert top1_agreement(pruned, ref) == 0.5
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        top1_agreement(pruned, ref[:1])


def test_answer_agreement():
    assert answer_agreement(["Two", "red", "cat"], ["2", "blue", "the cat"]) == pytest.approx(2 / 3)


def test_kv_bytes_from_shapes_and_from_a_cache():
    # 2 (k, v) x (10 + 4 tokens) x 2 heads x 8 dims x 2 bytes
    assert kv_bytes(2, [10, 4], kv_heads=2, head_dim=8, dtype="float16") == 896
    assert kv_bytes(2, 7, kv_heads=2, head_dim=8, dtype=torch.float32, batch=3) == 2 * 3 * 14 * 2 * 8 * 4
    with pytest.raises(ValueError, match="3 counts for 2 layers"):
        kv_bytes(2, [1, 2, 3], 1, 1)
    with pytest.raises(ValueError, match="unknown dtype"):
        kv_bytes(1, 1, 1, 1, dtype="float17")
    cache = DynamicCache()
    for layer, tokens in enumerate((10, 4)):  # a later layer pruned to fewer tokens
        kv = torch.zeros(1, 2, tokens, 8, dtype=torch.float16)  # [B, kv_heads, T, D]
        cache.update(kv, kv.clone(), layer)
    assert kv_cache_bytes(cache) == 896
    legacy = [(torch.zeros(1, 2, 10, 8, dtype=torch.float16),) * 2, (torch.zeros(1, 2, 4, 8, dtype=torch.float16),) * 2]
    assert kv_cache_bytes(legacy) == 896
