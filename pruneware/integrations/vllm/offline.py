"""Run pruneware plans through a real vLLM engine: the offline `LLM`, for evals, tests and benchmarks.

    from pruneware.integrations.vllm.offline import build_llm, image_requests, greedy_answers
    llm = build_llm("tiny-llava", "divprune@pre:64")
    texts, prompt_lengths = greedy_answers(llm, image_requests(llm, items), max_tokens=3)

`model` is an embedded model name (`tiny-llava`, `tiny-qwen2.5-vl`), a local folder or a hub id;
the plan is passed through `hf_overrides` with the pruned architecture, exactly as a user would.
Call it under `if __name__ == "__main__":` (vLLM starts its engine in a spawned process).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pruneware.integrations.vllm import ARCHITECTURES
from pruneware.integrations.vllm.spec import CONFIG_KEY

# On a CPU, vLLM reserves `gpu_memory_utilization` of the machine's RAM for the KV cache; the tiny
# models need little, and several engines may share one machine in tests.
CPU_DEFAULTS = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.15}


def model_folder(model: str) -> str:
    """The folder (or hub id) vLLM should load for `model`."""
    from pruneware import models

    return str(models.path(model)) if model in models.MODELS else model


def hf_overrides(folder: str, plan: str | None, seed: int = 0, avg_tokens: float | None = None) -> dict[str, Any]:
    """The `hf_overrides` that turn the plugin on for `plan` (empty for None: the base model);
    with `avg_tokens`, `plan` is a preset or a plan without budgets, solved per image."""
    if plan is None or plan == "none":
        return {}
    config = Path(folder) / "config.json"
    base = json.loads(config.read_text())["architectures"][0] if config.is_file() else None
    if base not in ARCHITECTURES:
        raise ValueError(f"the vLLM plugin prunes {sorted(ARCHITECTURES)}; {folder} is {base!r}")
    options = {"plan": plan, "seed": seed} | ({} if avg_tokens is None else {"avg_tokens": avg_tokens})
    return {"architectures": [ARCHITECTURES[base][0]], CONFIG_KEY: options}


def build_llm(model: str, plan: str | None = None, seed: int = 0, avg_tokens: float | None = None, **engine_kwargs: Any):
    """A vLLM `LLM` for `model` with `plan` applied by the plugin (None or "none": unpruned)."""
    from vllm import LLM
    from vllm.platforms import current_platform

    from pruneware.integrations.vllm.spec import has_llm_stages

    folder = model_folder(model)
    kwargs = (CPU_DEFAULTS if current_platform.is_cpu() else {}) | {"seed": seed}
    if plan not in (None, "none") and has_llm_stages(plan):
        kwargs |= {"enable_prefix_caching": False, "enforce_eager": True}  # see deep_layers
        if has_llm_stages(plan, scored=True):
            kwargs |= {"enable_chunked_prefill": False, "max_num_batched_tokens": 16384}
    kwargs |= engine_kwargs
    return LLM(folder, hf_overrides=hf_overrides(folder, plan, seed, avg_tokens), **kwargs)


def chat_prompt(processor: Any, question: str, modality: str = "image") -> str:
    """The model's chat prompt for one image (or video) and one question."""
    messages = [{"role": "user", "content": [{"type": modality}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def image_requests(llm: Any, items: Sequence[Any]) -> list[dict[str, Any]]:
    """vLLM prompts for items with `.image` and `.question` (synthetic examples, eval items)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(llm.llm_engine.model_config.model)
    return [{"prompt": chat_prompt(processor, item.question), "multi_modal_data": {"image": item.image}} for item in items]


def greedy_answers(llm: Any, requests: list[dict[str, Any]], max_tokens: int = 3) -> tuple[list[str], list[int]]:
    """(generated texts, prompt lengths) for `requests`, greedy."""
    from vllm import SamplingParams

    outputs = llm.generate(requests, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return [o.outputs[0].text for o in outputs], [len(o.prompt_token_ids) for o in outputs]


__all__ = ["CPU_DEFAULTS", "build_llm", "chat_prompt", "greedy_answers", "hf_overrides", "image_requests", "model_folder"]
