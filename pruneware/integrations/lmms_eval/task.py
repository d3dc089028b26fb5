"""The synthetic benchmark as an lmms-eval task: a local dataset plus a task YAML.

`pruneware export-bench --out DIR` writes
- `DIR/data/`: the eval split as a `datasets` `save_to_disk` folder (split `test`; columns
  `id`, `task`, `question`, `answer`, `image`, images stored losslessly as PNG), and
- `DIR/pruneware_synthetic.yaml`: a task that loads it with `dataset_kwargs: {load_from_disk: true}`
  (an absolute path: move the folder, export again), greedy 3-token answers, scored by the
  benchmark's own exact match (first word, lowercased).

    python -m lmms_eval --model pruneware --model_args pretrained=tiny-llava,plan=divprune@pre:0.25 \
        --tasks pruneware_synthetic --include_path DIR

The questions are those of `pruneware eval` (`--bench synthetic`) with the same `--seed`: the
first N of an export are the `--limit N` questions of `pruneware eval`. This module imports no
lmms-eval: the YAML names its functions by module path.
"""

from __future__ import annotations

from pathlib import Path

TASK = "pruneware_synthetic"
MAX_NEW_TOKENS = 3  # as `pruneware eval`

_YAML = """\
# Written by `pruneware export-bench`: the synthetic VQA benchmark of pruneware (eval split,
# seed {seed}, {n} questions). Load with `python -m lmms_eval --include_path {out} --tasks {task}`.
task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function pruneware.integrations.lmms_eval.task.doc_to_visual
doc_to_text: !function pruneware.integrations.lmms_eval.task.doc_to_text
doc_to_target: answer
process_results: !function pruneware.integrations.lmms_eval.task.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  seed: {seed}
"""


def doc_to_visual(doc: dict) -> list:
    """The question's image, as stored (RGB PNG, decoded by `datasets`)."""
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question as `pruneware eval` asks it: no pre- or post-prompt."""
    return doc["question"]


def process_results(doc: dict, results: list) -> dict[str, float]:
    """Exact match of the answer's first word, as the synthetic benchmark scores it."""
    from pruneware.evals.synthetic.accuracy import normalize

    return {"exact_match": float(normalize(results[0]) == doc["answer"])}


def export_bench(out: str | Path, n: int = 500, seed: int = 0, task: str = TASK) -> dict[str, Path]:
    """Write the dataset and the task YAML under `out`; returns their paths.

    Raises:
        ValueError: n < 1, or a task name lmms-eval could not use as a YAML file name.
        ImportError: the `datasets` library is missing (`pip install "pruneware[eval]"`).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not task.replace("_", "").isalnum():
        raise ValueError(f"task name {task!r} must be letters, digits and underscores")
    try:
        import datasets
    except ImportError:
        raise ImportError('export-bench needs the datasets library: pip install "pruneware[eval]"') from None
    from pruneware.evals.datasets import load_benchmark

    datasets.disable_progress_bars()
    out = Path(out).expanduser().resolve()
    items = load_benchmark("synthetic", limit=n, seed=seed)
    features = datasets.Features({
        "id": datasets.Value("string"), "task": datasets.Value("string"), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "image": datasets.Image(),
    })  # fmt: skip
    rows = {"id": [it.id for it in items], "task": [it.task for it in items],
            "question": [it.question for it in items], "answer": [it.answer for it in items],
            "image": [it.image for it in items]}  # fmt: skip
    data = out / "data"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(data))
    yaml = out / f"{task}.yaml"
    yaml.write_text(_YAML.format(seed=seed, n=n, out=out, task=task, data=data, max_new_tokens=MAX_NEW_TOKENS))
    return {"data": data, "yaml": yaml}
