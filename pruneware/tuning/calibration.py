"""The calibration set: inputs built once, the unpruned reference computed once, and the
objective of any plan measured against it.

Objective of a plan, per calibration question i (lower is better):

    loss_i = KL(p_ref,i || p_plan,i) + accuracy_weight * (1 - score_i)

where p is the distribution of the first answer token (the next token after the prompt) and
score_i is the benchmark's per-question score of that token's text (only when the question has
a label). The objective is the mean over questions. The KL term measures how much the pruned
model's answer moves; the accuracy term breaks ties toward plans that stay right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import pruneware
from pruneware.adapters import adapter_for
from pruneware.errors import PlanError
from pruneware.plans.plan import Plan

REPORTING_SPLIT_PREFIX = "eval-"  # ids of the synthetic eval split: the split results are reported on


class CalibrationError(PlanError):
    """Calibration data that cannot be used (empty, or the reporting split)."""


def default_calibration(n: int, seed: int = 0) -> list:
    """`n` questions of the synthetic *train* split (never the eval split results are reported on)."""
    from pruneware.evals.datasets import Item
    from pruneware.evals.synthetic import make_split

    return [Item(e.image, e.question, [e.answer], e.task, e.id) for e in make_split("train", n, seed)]


def check_not_reporting(items: Sequence[Any]) -> None:
    """Refuse synthetic eval-split questions: a plan tuned on them would be graded on its own data."""
    bad = [str(it.id) for it in items if str(getattr(it, "id", "")).startswith(REPORTING_SPLIT_PREFIX)]
    if bad:
        raise CalibrationError(
            f"calibration item {bad[0]!r} is from the synthetic eval split, which results are reported on; "
            "tune on the train split (the default) or on your own data (--bench jsonl --data ...)"
        )


@dataclass(frozen=True)
class Measurement:
    """A plan's objective on the calibration set, and what it kept."""

    loss: float
    kl: float
    accuracy: float | None
    avg_visual_tokens: float
    flops_ratio: float
    vision_ratio: float = 1.0  # vision-encoder FLOPs relative to the unpruned model's

    def summary(self) -> dict:
        acc = None if self.accuracy is None else round(self.accuracy, 4)
        return {"loss": round(self.loss, 6), "kl": round(self.kl, 6), "accuracy": acc,
                "avg_visual_tokens": round(self.avg_visual_tokens, 2), "flops_ratio": round(self.flops_ratio, 4),
                "vision_ratio": round(self.vision_ratio, 4)}


class Calibration:
    """Questions with their unpruned reference, cached once (`tune` refuses the reporting split;
    this class itself also serves held-out comparisons, see benchmarks/tune_vs_presets.py).

    `measure(plan)` runs one pruned prefill per batch (no generation: the objective reads the
    first answer token) and compares it with the cached reference log-probabilities [N, V].
    """

    def __init__(self, model, processor, items: Sequence[Any], *, bench: str = "synthetic", batch_size: int = 32,
                 seed: int = 0, accuracy_weight: float = 1.0) -> None:
        from pruneware.evals.runner import prompt_inputs

        if not items:
            raise CalibrationError("the calibration set is empty: give at least one question")
        if accuracy_weight < 0:
            raise CalibrationError(f"accuracy_weight must be >= 0, got {accuracy_weight:g}")
        self.model, self.processor, self.items = model, processor, list(items)
        self.bench, self.seed, self.accuracy_weight = bench, seed, accuracy_weight
        self.adapter = adapter_for(model)
        device = next(model.parameters()).device
        self.batches = [prompt_inputs(processor, self.items[i:i + batch_size], device)
                        for i in range(0, len(self.items), batch_size)]
        ids = set(self.adapter.visual_token_ids())
        self.samples: list[tuple[int, int]] = []  # (visual, text) tokens per question
        for inputs in self.batches:
            for row, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
                visual = sum(int((row == t).sum()) for t in ids)
                self.samples.append((visual, int(mask.sum()) - visual))
        if any(n == 0 for n, _ in self.samples):
            raise CalibrationError("a calibration question has no visual tokens; every question needs an image")
        # per batch, the unpruned vision-side FLOPs (counted from the inputs, as eval rows are)
        self.vision_flops = [sum(self.adapter.input_vision_flops(dict(inputs))) for inputs in self.batches]
        self.ref_logp = self._logits().log_softmax(-1)  # [N, V] float32
        self.ref_scores = self._scores(self.ref_logp)

    @property
    def n_visual(self) -> int | None:
        """The visual tokens per question when every question has the same number, else None."""
        counts = {n for n, _ in self.samples}
        return counts.pop() if len(counts) == 1 else None

    @torch.inference_mode()
    def _logits(self, plan: Plan | None = None, reports: list | None = None) -> torch.Tensor:
        out = []
        for inputs in self.batches:
            if plan is None:
                out.append(self.model(**inputs, logits_to_keep=1).logits[:, -1].float())
                continue
            with pruneware.prune(self.model, plan, seed=self.seed) as run:
                out.append(self.model(**inputs, logits_to_keep=1).logits[:, -1].float())
            if reports is not None:
                reports.append(run.report)
        return torch.cat(out)  # [N, V]

    def _scores(self, logp: torch.Tensor) -> list[float] | None:
        from pruneware.evals.runner import item_score

        if not all(getattr(it, "answers", None) or getattr(it, "answer", None) for it in self.items):
            return None
        texts = self.processor.tokenizer.batch_decode(logp.argmax(-1)[:, None].tolist(), skip_special_tokens=True)
        return [item_score(self.bench, text.strip(), it) for text, it in zip(texts, self.items, strict=True)]

    @property
    def reference_accuracy(self) -> float | None:
        return None if self.ref_scores is None else sum(self.ref_scores) / len(self.ref_scores)

    def per_question(self, plan: Plan) -> tuple[torch.Tensor, list[float] | None, list]:
        """Run `plan` on every question: KL [N] against the reference, scores (None without
        labels) and the reports of each batch."""
        reports: list = []
        logp = self._logits(plan, reports).log_softmax(-1)
        ref = self.ref_logp
        kl = torch.where(ref.isneginf(), 0.0, ref.exp() * (ref - logp)).sum(-1)  # [N]
        return kl, self._scores(logp), reports

    def measure(self, plan: Plan) -> Measurement:
        """Run `plan` on every calibration question; its objective, accuracy and cost."""
        kl, scores, reports = self.per_question(plan)
        loss = kl.clone()
        if scores is not None:
            loss += self.accuracy_weight * (1.0 - torch.tensor(scores))
        visual = [v for r in reports for v in r.visual_per_sample]
        flops = sum(r.lm_flops for r in reports) / max(sum(r.lm_flops_unpruned for r in reports), 1.0)
        # a report without vision FLOPs ran the tower whole on its inputs
        vision = sum(sum(r.vision_flops) if r.vision_flops else full
                     for r, full in zip(reports, self.vision_flops, strict=True))
        return Measurement(
            float(loss.mean()), float(kl.mean()), None if scores is None else sum(scores) / len(scores),
            sum(visual) / len(visual), flops, vision / max(sum(self.vision_flops), 1.0),
        )

    @torch.inference_mode()
    def prefill_ms(self, plan: Plan | None, examples: int = 2) -> float:
        """Mean over the first `examples` questions of one batch-1 prefill, in ms."""
        from pruneware.evals.runner import prompt_inputs
        from pruneware.tuning.budget import time_ms

        device = next(self.model.parameters()).device
        total = 0.0
        for item in self.items[:examples]:
            inputs = prompt_inputs(self.processor, [item], device)
            if plan is None:
                total += time_ms(lambda: self.model(**inputs))
            else:
                with pruneware.prune(self.model, plan, seed=self.seed):
                    total += time_ms(lambda: self.model(**inputs))
        return total / min(examples, len(self.items))
