"""`pruneware eval --engine vllm`: the same sweep through a real vLLM engine with the pruneware plugin.

One engine per plan (`pruneware.integrations.vllm.offline.build_llm`), greedy answers, scored
exactly like the HF rows (`pruneware.evals.runner.item_score`), written to the same resumable
rows.jsonl. vLLM runs only `pre` stages, so plans are checked here, before any engine starts,
with the plugin's own parser (the same PlanError the engine would raise). Rows carry what vLLM
reports: the prompt length and the visual (placeholder) tokens in it; the HF-only measures
(KL, FLOPs, prefill latency) are None.

vllm is imported only when an engine is built (inside `offline.build_llm`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pruneware.evals.runner import NONE, Variant, item_score, read_rows
from pruneware.plans import PlanError

CHUNK = 64  # questions per generate call: rows are written (and resumable) after each chunk


def _config(folder: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        from pruneware.cli.common import UserError

        raise UserError(f"--engine vllm needs a local model folder with config.json (an embedded name or a folder); got {folder}")
    return json.loads(path.read_text())


def check_plans(model: str, plans: Sequence[str], seed: int = 0) -> str:
    """Refuse, before any engine starts, what the plugin would refuse at engine build; returns
    the folder vLLM loads. Raises PlanError (a bad plan) or UserError (an unsupported model)."""
    from pruneware.cli.common import UserError
    from pruneware.integrations.vllm import ARCHITECTURES, ONE_AXIS_ROPE
    from pruneware.integrations.vllm.offline import model_folder
    from pruneware.integrations.vllm.spec import parse_stages

    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError("--engine vllm needs vLLM in this environment: pip install 'vllm>=0.32' (CUDA) "
                        "or bash .ci/install_vllm_cpu.sh (CPU)")
    folder = model_folder(model)
    config = _config(folder)
    base = config.get("architectures", [None])[0]
    if base not in ARCHITECTURES and any(p != NONE for p in plans):
        raise UserError(f"the vLLM plugin prunes {', '.join(sorted(ARCHITECTURES))}; {model} is {base!r}")
    layers = int(config.get("text_config", config).get("num_hidden_layers", 32))
    rope = "1d" if base in ONE_AXIS_ROPE else "mrope"
    for plan in plans:
        if plan != NONE:
            try:
                parse_stages(plan, layers, rope)
            except PlanError as err:
                raise PlanError(f"--engine vllm cannot run {plan!r}: {err}") from None
    return folder


def files_fingerprint(folder: str) -> str:
    """A short hash of a model folder's weight files (names, sizes, first and last MiB): the
    run.json key of a vLLM run, computed without loading the model."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def stdout_to_stderr():
    """Send file descriptor 1 to stderr meanwhile: vLLM logs to stdout, in this process and in the
    engine processes it starts (they inherit the descriptor), and `--json` owns stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _image_token_ids(llm: Any) -> set[int]:
    config = llm.llm_engine.model_config.hf_config
    names = ("image_token_id", "image_token_index", "video_token_id")
    return {int(v) for v in (getattr(config, n, None) for n in names) if isinstance(v, int)}


def _generate(llm: Any, processor: Any, items: Sequence[Any], max_tokens: int) -> list[dict]:
    """Per item: text, first generated token, prompt length and visual tokens."""
    from vllm import SamplingParams

    from pruneware.integrations.vllm.offline import chat_prompt

    requests = [{"prompt": chat_prompt(processor, it.question), "multi_modal_data": {"image": it.image}} for it in items]
    outputs = llm.generate(requests, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    visual = _image_token_ids(llm)
    return [{"text": o.outputs[0].text.strip(),
             "first": o.outputs[0].token_ids[0] if o.outputs[0].token_ids else None,
             "prompt_tokens": len(o.prompt_token_ids),
             "visual_tokens": sum(1 for t in o.prompt_token_ids if t in visual)} for o in outputs]


def run_sweep_vllm(
    model: str, items: Sequence[Any], plan_variants: Sequence[Variant], out_path: str | Path, seed: int = 0,
    max_new_tokens: int = 3, bench: str = "synthetic", on_progress: Callable[[int, int], None] | None = None,
    **engine_kwargs: Any,
) -> list[dict]:
    """Every variant on every item through vLLM, `none` first (its answers are the reference
    for answer and first-token agreement); returns all rows (old and new) of `out_path`."""
    from transformers import AutoProcessor

    from pruneware.integrations.vllm.offline import build_llm, model_folder

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out_path)
    done = {(r["variant"], r["id"]) for r in rows}
    ref = {r["id"]: r for r in rows if r["variant"] == Variant(NONE, None).key}
    total = len(plan_variants) * len(items)
    progress = sum(1 for v in plan_variants for it in items if (v.key, str(it.id)) in done)
    if on_progress:
        on_progress(progress, total)
    processor = AutoProcessor.from_pretrained(model_folder(model))
    if out_path.is_file() and out_path.stat().st_size and not out_path.read_bytes().endswith(b"\n"):
        with out_path.open("a") as sink:  # an interrupted write left a torn line: end it
            sink.write("\n")
    ordered = sorted(plan_variants, key=lambda v: v.plan != NONE)
    with out_path.open("a") as sink:
        for variant in ordered:
            todo = [it for it in items if (variant.key, str(it.id)) not in done]
            if not todo:
                continue
            llm = build_llm(model, variant.plan, seed=seed, **engine_kwargs)
            try:
                for start in range(0, len(todo), CHUNK):
                    batch = todo[start : start + CHUNK]
                    for item, out in zip(batch, _generate(llm, processor, batch, max_new_tokens)):
                        base = ref.get(str(item.id))
                        if variant.plan == NONE:  # the reference agrees with itself, as in the HF rows
                            base = {"prediction": out["text"], "first_token": out["first"]}
                        row = {
                            "variant": variant.key, "requested": variant.plan, "avg_tokens": None,
                            "plan": variant.plan, "engine": "vllm", "id": str(item.id), "task": item.task,
                            "prediction": out["text"], "score": item_score(bench, out["text"], item),
                            "answer_agrees": None if base is None else out["text"] == base["prediction"],
                            "top1_agrees": None if base is None else out["first"] == base.get("first_token"),
                            "first_token": out["first"], "kl": None,
                            "visual_tokens": out["visual_tokens"], "prompt_tokens": out["prompt_tokens"],
                            "flops": None, "vision_flops": None, "prefill_ms": None,
                        }
                        sink.write(json.dumps(row) + "\n")
                        rows.append(row)
                        if variant.plan == NONE:
                            ref[row["id"]] = row
                        progress += 1
                    sink.flush()
                    if on_progress:
                        on_progress(progress, total)
            finally:
                del llm
                gc.collect()
    return rows


__all__ = ["check_plans", "files_fingerprint", "run_sweep_vllm", "stdout_to_stderr"]
