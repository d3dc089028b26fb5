"""Benchmark scores, fidelity to the unpruned model, and KV-cache cost.

- Accuracy: :func:`exact_match`, :func:`vqa_accuracy` (the official VQA soft accuracy),
  :func:`pope_metrics` (accuracy, precision, recall, F1 with "yes" positive) and
  :func:`mme_score` (per category accuracy + accuracy+, perception and cognition totals).
  :func:`score` picks a benchmark's main metric and breaks it down per task.
- Fidelity: :func:`top1_agreement` and :func:`next_token_kl` over next-token logits, and
  :func:`answer_agreement` over generated answers.
- Cost: :func:`kv_cache_bytes` of a live cache, :func:`kv_bytes` from the shapes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

_NUMBERS = dict(zip("none zero one two three four five six seven eight nine ten".split(), "0 0 1 2 3 4 5 6 7 8 9 10".split()))  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-<>@`,?!:*#%&|~^$]")

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")  # fmt: skip
MAIN_METRIC = {
    "synthetic": "accuracy", "jsonl": "accuracy", "gqa": "accuracy",
    "textvqa": "vqa_accuracy", "pope": "f1", "mme": "total",
}  # fmt: skip


class ScoredItem(Protocol):
    """What :func:`score` reads from an item (``pruneware.evals.datasets.Item`` has it)."""

    answers: list[str]
    task: str
    image_id: str


def normalize_answer(text: str) -> str:
    """The VQA answer normalisation, in short.

    Lowercase; drop the commas inside numbers ("1,000") and the periods not before a digit;
    other punctuation becomes a space; number words become digits ("two" -> "2"); the articles
    a/an/the are dropped, unless the answer is nothing else (so the letter "a" survives).
    Follows the official VQA evaluation script, without its table of contractions.
    """
    s = " ".join(text.lower().split())
    s = _PUNCT.sub(" ", _PERIOD.sub("", _DIGIT_COMMA.sub("", s)))
    words = [_NUMBERS.get(w, w) for w in s.split()]
    return " ".join([w for w in words if w not in _ARTICLES] or words)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA soft accuracy of one prediction against the human answers.

    Each human answer is left out in turn and the prediction scores min(1, matches among the
    others / 3); the score is the mean. With ten answers that is the mean over the 10-choose-9
    subsets: 1, 2, 3 or 4+ matching humans give 0.3, 0.6, 0.9, 1.0. One answer: exact match.
    """
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if len(hits) < 2:
        return float(any(hits))
    return sum(min(1.0, (sum(hits) - h) / 3) for h in hits) / len(hits)


def parse_yes_no(text: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"`` from a free-form answer to a yes/no question.

    The first word decides if it is yes or no; otherwise, as in the POPE evaluation, a "no" or
    "not" in the first sentence means no, and a "yes" there means yes.
    """
    words = normalize_answer(text.split(".")[0]).split()
    if words and words[0] in ("yes", "no"):
        return words[0]
    if "no" in words or "not" in words:
        return "no"
    return "yes" if "yes" in words else "other"


def pope_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 and yes-ratio, with "yes" as the positive class.

    Predictions are parsed with :func:`parse_yes_no`; one that is neither yes nor no counts as
    a wrong answer and as a predicted "no". ``yes_ratio`` is the share of predicted yes.
    """
    _same_length(predictions, answers)
    pred = [parse_yes_no(p) for p in predictions]
    gold = [parse_yes_no(a) for a in answers]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g != "yes" for p, g in zip(pred, gold))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": _mean(p == g for p, g in zip(pred, gold)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": _mean(p == "yes" for p in pred),
    }


def mme_score(
    predictions: Sequence[str], answers: Sequence[str], categories: Sequence[str], image_ids: Sequence[str]
) -> dict:
    """The MME score: per category, 100 x (accuracy + accuracy+), then the totals.

    accuracy is over questions; accuracy+ is the share of images whose questions (two per
    image in MME) are all right. ``perception`` sums the ten perception categories present
    (max 2000), ``cognition`` the four cognition ones (max 800); ``total`` is their sum.
    Returns ``{"categories": {cat: {"acc", "acc_plus", "score"}}, "perception", "cognition", "total"}``.
    """
    _same_length(predictions, answers, categories, image_ids)
    by_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for p, a, c, i in zip(predictions, answers, categories, image_ids):
        by_image[c][i].append(parse_yes_no(p) == parse_yes_no(a))
    cats = {}
    for c, images in sorted(by_image.items()):
        acc = 100 * _mean(h for hits in images.values() for h in hits)
        acc_plus = 100 * _mean(all(hits) for hits in images.values())
        cats[c] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(v["score"] for c, v in cats.items() if c in MME_PERCEPTION)
    cognition = sum(v["score"] for c, v in cats.items() if c in MME_COGNITION)
    return {"categories": cats, "perception": perception, "cognition": cognition, "total": perception + cognition}


def score(bench_name: str, predictions: Sequence[str], items: Sequence[ScoredItem]) -> dict:
    """A benchmark's main metric over ``predictions`` (in the order of ``items``), per task too.

    Main metric: exact-match ``accuracy`` (synthetic, jsonl, gqa), ``vqa_accuracy`` (textvqa),
    ``f1`` (pope; accuracy, precision, recall, yes_ratio beside it) or the MME ``total``
    (perception and cognition beside it). Returns ``{"benchmark", "metric", "score", "n",
    "per_task": {task: main metric}, "counts": {task: n}, ...}``; pope and mme add
    ``"categories"`` with every metric per category.
    """
    if bench_name not in MAIN_METRIC:
        raise ValueError(f"unknown benchmark {bench_name!r}; valid benchmarks: {', '.join(MAIN_METRIC)}")
    _same_length(predictions, items)
    metric = MAIN_METRIC[bench_name]
    tasks: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        tasks[item.task].append(i)
    out: dict = {"benchmark": bench_name, "metric": metric, "n": len(items)}
    if bench_name == "pope":
        out |= pope_metrics(predictions, [it.answers[0] for it in items])
        cats = {t: pope_metrics([predictions[i] for i in ix], [items[i].answers[0] for i in ix]) for t, ix in tasks.items()}
        per_task = {t: m["f1"] for t, m in cats.items()}
        out["categories"] = dict(sorted(cats.items()))
    elif bench_name == "mme":
        mme = mme_score(predictions, [it.answers[0] for it in items], [it.task for it in items], [it.image_id for it in items])
        out |= mme
        per_task = {t: v["score"] for t, v in mme["categories"].items()}
    else:
        fn = vqa_accuracy if bench_name == "textvqa" else exact_match
        hits = [fn(p, it.answers) for p, it in zip(predictions, items)]
        out[metric] = _mean(hits)
        per_task = {t: _mean(hits[i] for i in ix) for t, ix in tasks.items()}
    out["score"] = out[metric]
    out["per_task"] = dict(sorted(per_task.items()))
    out["counts"] = {t: len(ix) for t, ix in sorted(tasks.items())}
    return out


# --- fidelity to the unpruned model ----------------------------------------------------------


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Share of rows whose most likely next token is the reference's. Both ``[B, V]``."""
    _same_shape(logits, ref_logits)
    return (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()


def next_token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Mean over rows of KL(reference || pruned) of the next-token distribution, in nats.

    ``logits`` (pruned run) and ``ref_logits`` (unpruned run): ``[B, V]``. Computed in float32;
    tokens the reference gives probability 0 (``-inf`` logits) contribute 0.
    """
    _same_shape(logits, ref_logits)
    log_q = logits.float().log_softmax(-1)  # [B, V]
    log_p = ref_logits.float().log_softmax(-1)  # [B, V]
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p.isneginf(), 0.0, terms).sum(-1).mean().item()


def answer_agreement(predictions: Sequence[str], ref_predictions: Sequence[str]) -> float:
    """Share of generated answers equal, after :func:`normalize_answer`, to the unpruned ones."""
    _same_length(predictions, ref_predictions)
    return _mean(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, ref_predictions))


# --- cost --------------------------------------------------------------------------------------


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a cache.

    Takes a transformers ``Cache`` (``cache.layers[i].keys`` / ``.values``) or legacy
    ``((k, v), ...)`` tuples. Layers pruned to fewer tokens count what they really hold.
    """
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    else:
        tensors = [t for layer in cache for t in layer]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def kv_bytes(
    layers: int,
    tokens: int | Sequence[int],
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype | str = torch.bfloat16,
    batch: int = 1,
) -> int:
    """Bytes of keys plus values for ``tokens`` cached tokens per layer.

    ``tokens`` is one count for every layer or one count per layer (a pruned run keeps fewer
    tokens in later layers). ``dtype`` is a torch dtype or its name ("float16").
    """
    per_layer = [tokens] * layers if isinstance(tokens, int) else list(tokens)
    if len(per_layer) != layers:
        raise ValueError(f"tokens has {len(per_layer)} counts for {layers} layers")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype name such as 'float16' or 'bfloat16'")
        dtype = getattr(torch, dtype)
    return 2 * batch * sum(per_layer) * kv_heads * head_dim * dtype.itemsize


# --- helpers ---------------------------------------------------------------------------------


def _mean(values: Iterable[float | bool]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _same_length(*seqs: Sequence) -> None:
    if len({len(s) for s in seqs}) > 1:
        raise ValueError(f"expected sequences of one length, got lengths {[len(s) for s in seqs]}")


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"expected two [B, V] logits tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
