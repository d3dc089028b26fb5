"""Sweep plans x budgets over a benchmark: accuracy, fidelity to the unpruned model, and cost.

For each batch of examples the unpruned reference (answer and next-token distribution) is
computed once and reused by every plan. Each finished (plan, budget, example) row is appended
to a JSONL file at once, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import pruneware
from pruneware.adapters import adapter_for
from pruneware.plans import PlanError, accepts_avg_tokens
from pruneware.report import lm_flops_per_sample

NONE = "none"


@dataclass(frozen=True)
class Variant:
    """One point of the sweep: a plan (as the user wrote it) at one budget."""

    plan: str
    avg_tokens: float | None

    @property
    def key(self) -> str:
        return f"{self.plan}|{self.avg_tokens}"


def variants(plans: Sequence[str], avg_tokens: Sequence[float | None]) -> list[Variant]:
    """Presets (and plans without written budgets) at every budget; `none` and plans with
    written budgets once, as written."""
    out, budgets = [], list(avg_tokens) or [None]
    for plan in plans:
        if plan == NONE or not accepts_avg_tokens(plan):
            out.append(Variant(plan, None))
        else:
            out.extend(Variant(plan, b) for b in budgets)
    return out


def _answers(item: Any) -> list[str]:
    return list(getattr(item, "answers", None) or [item.answer])


def item_score(bench: str, prediction: str, item: Any) -> float:
    """One example's score under the benchmark's per-question metric (means give accuracy)."""
    from pruneware.evals import metrics

    answers = _answers(item)
    if bench == "textvqa":
        return metrics.vqa_accuracy(prediction, answers)
    if bench in ("pope", "mme"):
        return float(metrics.parse_yes_no(prediction) == metrics.parse_yes_no(answers[0]))
    if bench == "synthetic":  # one-word answers: the first word decides, as in the model cards
        from pruneware.evals.synthetic.accuracy import normalize

        prediction = normalize(prediction)
    return metrics.exact_match(prediction, answers)


def prompt_inputs(processor, items: Sequence[Any], device) -> dict:
    """The processor's left-padded batch for `items` (each with `question` and `image`), on `device`
    (Qwen processors get their inputs through qwen-vl-utils: `pruneware.evals.qwen_inputs`)."""
    from pruneware.evals.qwen_inputs import vision_inputs

    return vision_inputs(processor, [it.question for it in items], [it.image for it in items]).to(device)


class _PrefillClock:
    """A logits processor that notes when generation first asks for logits: the prefill's end."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            if scores.is_cuda:
                torch.cuda.synchronize()
            self.at = time.perf_counter()
        return scores


@torch.inference_mode()
def timed_answers(model, processor, inputs: dict, max_new_tokens: int) -> tuple[torch.Tensor, list[str], float]:
    """Next-token logits [B, V] of the prompt, decoded answers, and the prefill time in ms.

    One ``generate`` call: the logits are its first step's raw logits, and the prefill time runs
    from the call to the moment the first logits exist (generate's own set-up included).
    """
    from transformers import LogitsProcessorList

    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    clock = _PrefillClock()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                         logits_processor=LogitsProcessorList([clock]), output_logits=True, return_dict_in_generate=True)
    prefill_ms = (clock.at - start) * 1e3
    texts = tok.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return out.logits[0].float(), [t.strip() for t in texts], prefill_ms


def run_sweep(
    model, processor, items: Sequence[Any], plan_variants: Sequence[Variant], out_path: str | Path,
    batch_size: int = 8, seed: int = 0, max_new_tokens: int = 3, bench: str = "synthetic",
    on_progress: Callable[[int, int], None] | None = None, skipped: dict[str, str] | None = None,
    small_images: str = "error",
) -> list[dict]:
    """Evaluate every variant on every item; returns all rows (old and new) of `out_path`.

    small_images: passed to `pruneware.prune` (under avg_tokens, "keep" lets an image below the
    budget keep all its tokens instead of failing its batch).

    A variant that cannot run (a PlanError, e.g. an unreachable avg_tokens) is left out and
    its reason recorded in `skipped` (variant key -> message).
    """
    skipped = {} if skipped is None else skipped
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out_path)
    done = {(r["variant"], r["id"]) for r in rows}
    total = len(plan_variants) * len(items)
    progress = sum(1 for v in plan_variants for it in items if (v.key, str(it.id)) in done)
    if on_progress:
        on_progress(progress, total)
    device = next(model.parameters()).device
    if out_path.is_file() and out_path.stat().st_size and not out_path.read_bytes().endswith(b"\n"):
        with out_path.open("a") as sink:  # an interrupted write left a torn line: end it
            sink.write("\n")
    with out_path.open("a") as sink:
        for start in range(0, len(items), batch_size):
            batch = list(items[start : start + batch_size])
            pending = [v for v in plan_variants if any((v.key, str(it.id)) not in done for it in batch)]
            if not pending:
                continue
            inputs = prompt_inputs(processor, batch, device)
            ref_logits, ref_answers, ref_ms = timed_answers(model, processor, inputs, max_new_tokens)
            for variant in pending:
                if variant.key in skipped:
                    continue
                if variant.plan == NONE:
                    logits, answers, ms, report = ref_logits, ref_answers, ref_ms, None
                else:
                    try:
                        with pruneware.prune(
                            model, variant.plan, seed=seed, avg_tokens=variant.avg_tokens, small_images=small_images,
                        ) as run:
                            logits, answers, ms = timed_answers(model, processor, inputs, max_new_tokens)
                    except PlanError as err:  # e.g. avg_tokens out of reach for this preset and model
                        skipped[variant.key] = str(err)
                        continue
                    report = run.report
                kl = torch.nn.functional.kl_div(
                    logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="none"
                ).sum(-1)
                for b, item in enumerate(batch):
                    if (variant.key, str(item.id)) in done:
                        continue
                    row = {
                        "variant": variant.key, "requested": variant.plan, "avg_tokens": variant.avg_tokens,
                        "plan": NONE if report is None else report.sample_plans[b],  # what ran on this sample
                        "id": str(item.id), "task": item.task, "prediction": answers[b],
                        "score": item_score(bench, answers[b], item),
                        "answer_agrees": answers[b] == ref_answers[b],
                        "top1_agrees": bool(logits[b].argmax() == ref_logits[b].argmax()),
                        "kl": round(float(kl[b]), 6),
                        "visual_tokens": _visual_tokens(report, b, inputs, model),
                        "flops": _flops(report, b, inputs, model),
                        "vision_flops": sample_vision_flops(report, b, inputs, model),
                        "prefill_ms": round(ms / len(batch), 3),
                    }
                    sink.write(json.dumps(row) + "\n")
                    rows.append(row)
                    progress += 1
                sink.flush()
                if on_progress:
                    on_progress(progress, total)
    return rows


def _visual_tokens(report, b: int, inputs: dict, model) -> float:
    """Sample b's visual tokens averaged over layers (all of them, unpruned)."""
    if report is not None:
        return float(report.visual_per_sample[b])
    ids = inputs["input_ids"][b]
    token_ids = [getattr(model.config, name, None) for name in ("image_token_id", "video_token_id")]
    return float(sum(int((ids == t).sum()) for t in token_ids if t is not None))


def _flops(report, b: int, inputs: dict, model) -> float:
    """Sample b's language-model prefill FLOPs (estimate, see pruneware.report)."""
    if report is not None:
        return float(report.flops_per_sample[b])
    config = model.config.get_text_config()
    tokens = int(inputs["attention_mask"][b].sum())
    return lm_flops_per_sample([[tokens]] * config.num_hidden_layers, config)[0]


def sample_vision_flops(report, b: int, inputs: dict, model) -> float:
    """Sample b's vision-side FLOPs per image, for the input the vision encoder actually ran on
    (see pruneware.adapters.vision_flops). With one image per sample (every bundled benchmark) it
    is that image's; otherwise the batch's mean per image."""
    per_image = report.vision_flops if report is not None and report.vision_flops else None
    if per_image is None:
        try:
            per_image = adapter_for(model).input_vision_flops(inputs)
        except TypeError:  # a model without an adapter (an unpruned baseline): its vision side is not counted
            per_image = []
    if not per_image:
        return 0.0
    if len(per_image) == inputs["input_ids"].shape[0]:
        return float(per_image[b])
    return float(sum(per_image) / len(per_image))


def read_rows(path: Path) -> list[dict]:
    """Rows already written; a torn last line (interrupted write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summarize(rows: Sequence[dict], plan_variants: Sequence[Variant], items: Sequence[Any] = (),
              bench: str = "synthetic") -> list[dict]:
    """One result row per variant: accuracy, relative accuracy, fidelity and cost means, and
    the benchmark's main metric (e.g. POPE F1, MME score) when `items` are given."""
    from pruneware.evals.metrics import score

    by_id = {str(it.id): it for it in items}
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_variant[r["variant"]].append(r)
    base = by_variant.get(Variant(NONE, None).key)
    base_acc = sum(r["score"] for r in base) / len(base) if base else None
    out = []
    for v in plan_variants:
        group = by_variant.get(v.key, [])
        if not group:
            continue
        def mean(key: str, digits: int | None = None) -> float | None:  # None: no row measured it (vLLM rows)
            values = [r[key] for r in group if r.get(key) is not None]
            value = sum(values) / len(values) if values else None
            return value if value is None or digits is None else round(value, digits)

        tasks: dict[str, list[bool]] = defaultdict(list)
        for r in group:
            tasks[r["task"]].append(r["score"])
        accuracy = mean("score")
        main = None
        if by_id and all(r["id"] in by_id for r in group):
            main = score(bench, [r["prediction"] for r in group], [by_id[r["id"]] for r in group])
        out.append({
            "plan": v.plan, "avg_tokens": v.avg_tokens, "n": len(group),
            "plans_run": sorted({r.get("plan", v.plan) for r in group}),  # per-sample budgets may differ
            "accuracy": round(accuracy, 4),
            "relative_accuracy": round(accuracy / base_acc, 4) if base_acc else None,
            "avg_visual_tokens": mean("visual_tokens", 2),
            "avg_prompt_tokens": mean("prompt_tokens", 2),  # vLLM rows only
            "flops": mean("flops"),
            "vision_flops": None if all(r.get("flops") is None for r in group)  # rows of older runs lack it: 0
            else sum(r.get("vision_flops") or 0.0 for r in group) / len(group),
            "prefill_ms": mean("prefill_ms", 3),
            "top1_agreement": mean("top1_agrees", 4),
            "answer_agreement": mean("answer_agrees", 4),
            "kl": mean("kl", 6),
            "per_task": {t: round(sum(v) / len(v), 4) for t, v in sorted(tasks.items())},
            "main_metric": None if main is None else {"name": main["metric"], "score": main["score"]},
        })
    return out
