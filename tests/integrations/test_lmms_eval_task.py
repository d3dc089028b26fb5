"""`pruneware export-bench`: the synthetic benchmark as a local dataset and an lmms-eval task YAML.
Needs only `datasets` (not lmms-eval)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("datasets", reason="export-bench needs datasets")

import datasets  # noqa: E402
import yaml  # noqa: E402

from pruneware.cli import app  # noqa: E402
from pruneware.evals.datasets import load_benchmark  # noqa: E402
from pruneware.integrations.lmms_eval import task  # noqa: E402


def test_export_bench_writes_the_eval_questions_losslessly(tmp_path):
    result = CliRunner().invoke(app, ["export-bench", "--out", str(tmp_path), "--n", "7", "--seed", "5", "--json"])
    assert result.exit_code == 0, result.output
    paths = json.loads(result.stdout)
    stored = datasets.load_from_disk(paths["data"])["test"]
    items = load_benchmark("synthetic", limit=7, seed=5)
    assert stored["id"] == [it.id for it in items] and stored["answer"] == [it.answer for it in items]
    for row, item in zip(stored, items, strict=True):
        assert np.array_equal(np.asarray(task.doc_to_visual(row)[0]), np.asarray(item.image))  # PNG: no loss
        assert task.doc_to_text(row) == item.question

    class Loader(yaml.SafeLoader):  # lmms-eval's `!function` tag, kept as text
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load((tmp_path / "pruneware_synthetic.yaml").read_text(), Loader=Loader)
    assert config["dataset_path"] == paths["data"] and config["dataset_kwargs"] == {"load_from_disk": True}
    assert config["generation_kwargs"]["max_new_tokens"] == task.MAX_NEW_TOKENS
    for key in ("doc_to_visual", "doc_to_text", "process_results"):
        module, name = config[key].rsplit(".", 1)
        assert module == task.__name__ and callable(getattr(task, name))


def test_process_results_scores_the_first_word():
    assert task.process_results({"answer": "red"}, ["Red, I think"]) == {"exact_match": 1.0}
    assert task.process_results({"answer": "red"}, ["blue"]) == {"exact_match": 0.0}


def test_export_bench_refuses_bad_input(tmp_path):
    result = CliRunner().invoke(app, ["export-bench", "--out", str(tmp_path), "--n", "0"])
    assert result.exit_code == 2 and "n must be >= 1" in result.output


def test_cost_file_sits_beside_lmms_eval_results():
    pytest.importorskip("lmms_eval")
    from pruneware.integrations.lmms_eval.cost import default_cost_path

    argv = ["--model", "pruneware", "--model_args", "plan=fastv,pretrained=org/My-Model", "--output_path", "runs/x"]
    path = default_cost_path(argv)
    assert path.parent.as_posix() == "runs/x/org__My-Model" and path.name.startswith("pruneware_cost_")
    assert default_cost_path(["--model", "pruneware"]) is None
