"""The lmms-eval model classes behind `--model pruneware`: chat (preferred) and simple.

Unlike several built-in wrappers:
- requests are batched (`--batch_size N`), left-padded, one `generate` per batch;
- an exception in generation propagates: it is never turned into an empty answer;
- images go to the processor as given (PIL or file), never re-encoded as JPEG; a Qwen model's
  images first take `qwen_vl_utils`' route, as Qwen's own tooling sends them.

Each batch runs inside `pruneware.prune(model, plan, seed=..., avg_tokens=...)`; budgets are
solved per sample, so a padded batch gives the answers its samples give alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

import pruneware
from pruneware.evals.qwen_inputs import is_qwen_processor, qwen_images
from pruneware.integrations.lmms_eval.args import ModelArgs, load_model
from pruneware.integrations.lmms_eval.cost import CostLog, default_cost_path
from pruneware.integrations.lmms_eval.prompting import Generation, Prompt, from_context, from_messages, render


class _Pruneware(lmms):
    """Shared loading, batching, pruning and cost recording."""

    GEN_KWARGS: int  # position of generation_kwargs in a generate_until request's args

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.args = ModelArgs.parse(**kwargs)
        self._model, self.processor = load_model(self.args)
        if self.args.pruned:  # a malformed plan or unknown preset fails here, before any request
            pruneware.prune(self._model, self.args.plan, seed=self.args.seed, avg_tokens=self.args.avg_tokens)
        self.cost = CostLog(self.args.plan, self.args.pretrained)
        self.cost_path = Path(self.args.cost_file) if self.args.cost_file else default_cost_path()

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    @property
    def device(self) -> torch.device:
        return self._model.device

    # one batch ---------------------------------------------------------------------------
    def _inputs(self, texts: list[str], images_per_prompt: list[list]) -> dict:
        """A left-padded batch; a Qwen processor's images go through `qwen_vl_utils` first, as
        Qwen's own tooling (and pruneware's evals, `evals/qwen_inputs.py`) sends them."""
        if is_qwen_processor(self.processor):
            images = qwen_images(self.processor, images_per_prompt)
        else:
            images = [im for per_prompt in images_per_prompt for im in per_prompt]
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            batch = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        return batch.to(self.device)

    def _visual_counts(self, input_ids: torch.Tensor) -> list[int]:
        ids = [getattr(self._model.config, n, None) for n in ("image_token_id", "video_token_id")]
        counts = sum((input_ids == t).sum(1) for t in ids if t is not None)
        return [int(c) for c in counts] if isinstance(counts, torch.Tensor) else [0] * len(input_ids)

    def _session(self):
        if not self.args.pruned:
            return None
        return pruneware.prune(self._model, self.args.plan, seed=self.args.seed, avg_tokens=self.args.avg_tokens)

    @torch.inference_mode()
    def _generate(self, prompts: Sequence[Prompt], gen: Generation, keys: list[dict]) -> list[GenerationResult]:
        """Answers for one batch of prompts, and their pruning cost recorded under `keys`."""
        texts = [render(self.processor, p) for p in prompts]
        inputs = self._inputs(texts, [p.images for p in prompts])
        session = self._session()
        if session is None:
            out, report = self._model.generate(**inputs, **gen.kwargs), None
        else:
            with session as run:
                out = self._model.generate(**inputs, **gen.kwargs)
            report = run.report
        new = out[:, inputs["input_ids"].shape[1]:]  # [B, new tokens]
        answers = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        self.cost.record_batch(keys, report, inputs["attention_mask"], self._visual_counts(inputs["input_ids"]),
                               self._model.config.get_text_config())  # fmt: skip
        pad = gen.kwargs.get("pad_token_id")
        return [GenerationResult(gen.cut(a), TokenCounts(output_tokens=int((row != pad).sum()) if pad is not None else len(row)))
                for a, row in zip(answers, new, strict=True)]  # fmt: skip

    def _finish(self, start: int, elapsed: float, results: list) -> None:
        """Write the cost file and hand the cost summary to lmms-eval's results (`throughput`)."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        if self.cost_path is not None:
            self.cost.write(self.cost_path)
            logger.info(f"pruneware: per-request pruning cost written to {self.cost_path}")
        tokens = sum(r.token_counts.output_tokens or 0 for r in results if isinstance(r, GenerationResult))
        part = CostLog(self.cost.plan, self.cost.model, self.cost.requests[start:])
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=tokens, avg_speed=tokens / elapsed if elapsed else 0.0,
                    additional_metrics=part.throughput_metrics())  # fmt: skip

    def _run_batched(self, requests: list[Instance], unpack: Callable[[tuple], tuple[Prompt, dict]]) -> list:
        """generate_until: group by generation settings, batch in request order, answer in that order."""
        groups: dict[str, list[int]] = {}
        gens = [Generation.from_task(r.args[self.GEN_KWARGS], self._pad_id()) for r in requests]
        for i, gen in enumerate(gens):
            groups.setdefault(gen.key, []).append(i)
        results: list = [None] * len(requests)
        start, began = len(self.cost.requests), time.perf_counter()
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="pruneware")
        for indices in groups.values():
            for b in range(0, len(indices), self.batch_size):
                batch = indices[b : b + self.batch_size]
                prompts, keys = zip(*[unpack(requests[i].args) for i in batch], strict=True)
                for i, result in zip(batch, self._generate(prompts, gens[batch[0]], list(keys)), strict=True):
                    results[i] = result
                bar.update(len(batch))
        bar.close()
        self._finish(start, time.perf_counter() - began, results)
        return results

    def _pad_id(self) -> int | None:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    # loglikelihood -----------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its (image, context) prompt, pruned.

        Request args: (context, continuation, doc_to_visual, doc_id, task, split). Text tokens are
        never pruned, so the continuation's rows are the last ones of the pruned forward.
        """
        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc="pruneware loglikelihood"):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            prompt = from_context(context, doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual else [])
            head = self._inputs([render(self.processor, prompt)], [prompt.images])["input_ids"]
            inputs = self._inputs([render(self.processor, prompt, continuation)], [prompt.images])
            n = inputs["input_ids"].shape[1] - head.shape[1]
            if n <= 0 or not torch.equal(inputs["input_ids"][0, : head.shape[1]], head[0]):
                raise ValueError(f"continuation {continuation!r} does not tokenize as an extension of its context")
            target = inputs["input_ids"][0, -n:]
            session = self._session()
            if session is None:
                logits = self._model(**inputs).logits
            else:
                with session:
                    logits = self._model(**inputs).logits
            logprobs = logits[0, -n - 1 : -1].float().log_softmax(-1)  # [n, V]
            out.append((float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())))
        return out


class PrunewareChat(_Pruneware):
    """`--model pruneware` (chat): requests carry `doc_to_messages`."""

    is_simple = False
    GEN_KWARGS = 2  # position of generation_kwargs in a request's args

    def _unpack(self, a: tuple) -> tuple[Prompt, dict]:
        _, doc_to_messages, _, doc_id, task, split = a
        return from_messages(doc_to_messages(self._doc(task, split, doc_id))), {"task": task, "doc_id": doc_id}

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        return self._run_batched(requests, self._unpack)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Round 0 asks `doc_to_messages(doc)`; round r asks it again with `round_idx`,
        `previous_output` and `previous_round_info`, until it reports the last round."""
        results, start, began = [], len(self.cost.requests), time.perf_counter()
        for request in requests:
            _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            doc, gen, outputs, info = self._doc(task, split, doc_id), Generation.from_task(gen_kwargs, self._pad_id()), [], None
            raw = doc_to_messages(doc)
            while True:
                key = {"task": task, "doc_id": doc_id, "round": len(outputs)}
                outputs.append(self._generate([from_messages(raw)], gen, [key])[0].text)
                payload = doc_to_messages(doc, round_idx=len(outputs), previous_output=list(outputs), previous_round_info=info)
                if not (isinstance(payload, tuple) and len(payload) == 4) or payload[1]:
                    break
                raw, _, _, info = payload
            results.append(outputs)
        self._finish(start, time.perf_counter() - began, [])
        return results


class PrunewareSimple(_Pruneware):
    """`--model pruneware --force_simple`: requests carry a context string and `doc_to_visual`."""

    is_simple = True
    GEN_KWARGS = 1

    def _unpack(self, a: tuple) -> tuple[Prompt, dict]:
        context, _, doc_to_visual, doc_id, task, split = a
        return from_context(context, doc_to_visual(self._doc(task, split, doc_id))), {"task": task, "doc_id": doc_id}

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        return self._run_batched(requests, self._unpack)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Round 0 uses the context; round r asks `doc_to_text(doc, round_idx=r, previous_output,
        previous_round_info)` for (visuals, text, terminal, outputs, info)."""
        results, start, began = [], len(self.cost.requests), time.perf_counter()
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc, gen, outputs, info = self._doc(task, split, doc_id), Generation.from_task(gen_kwargs, self._pad_id()), [], None
            prompt = from_context(context, doc_to_visual(doc))
            while True:
                key = {"task": task, "doc_id": doc_id, "round": len(outputs)}
                outputs.append(self._generate([prompt], gen, [key])[0].text)
                visuals, text, terminal, _, info = doc_to_text(doc, previous_output=list(outputs), round_idx=len(outputs),
                                                               previous_round_info=info)  # fmt: skip
                if terminal:
                    break
                prompt = from_context(text, visuals)
            results.append(outputs)
        self._finish(start, time.perf_counter() - began, [])
        return results
