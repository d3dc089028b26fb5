"""Issue 33 rows 11 and 12: every bad invocation gets one `error: ...` line on stderr and exit
code 2, before any model work; and `--small-images` (row 7) through the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pruneware.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--max-new-tokens", "0"], "error: --max-new-tokens must be >= 1, got 0"),
        (["run", "--max-new-tokens", "-1"], "error: --max-new-tokens must be >= 1, got -1"),
        (["run", "--seed", str(2**70)], r"error: seed must be an integer in [-2**63, 2**64 - 1]"),
        (["run", "--avg-tokens", "-5"], "error: avg_tokens must be a positive finite number"),
        (["run", "--small-images", "drop"], "error: --small-images must be one of error, keep, got 'drop'"),
        (["eval", "--batch-size", "0", "--out", "OUT"], "error: --batch-size must be >= 1, got 0"),
        (["eval", "--out", "FILE"], "error: --out FILE is an existing file; give a folder"),
        (["eval", "--out", "FILE/sub"], "error: --out FILE/sub: FILE is a file, not a folder"),
        (["eval", "--limit", "0", "--out", "OUT"], "error: --limit must be >= 1, got 0"),
        (["eval", "--limit", "-3", "--out", "OUT"], "error: --limit must be >= 1, got -3"),
        (["eval", "--bench", "jsonl", "--data", "EMPTY", "--out", "OUT"], "error: benchmark 'jsonl' at EMPTY holds no examples"),
        (["viz", "--out", "FILE/kept.png"], "error: --out FILE/kept.png: FILE is a file, not a folder"),
        (["viz", "--out", "OUT/kept"], "error: --out OUT/kept needs an image extension that PIL writes"),
        (["viz", "--out", "DIR"], "error: --out DIR is a folder; give a file name such as DIR/kept.png"),
        (["export-bench", "--out", "FILE"], "error: --out FILE is an existing file; give a folder"),
        (["export-bench", "--out", "FILE/sub"], "error: --out FILE/sub: FILE is a file, not a folder"),
        (["export-bench", "--n", "0", "--out", "OUT"], "error: --n must be >= 1, got 0"),
        (["bench", "--shape", "tiny", "--device", "bogus"], "error: unknown device 'bogus': use cpu, cuda or cuda:N"),
        (["bench", "--shape", "tiny", "--device", "cuda:99"], "error: --device cuda:99: "),
    ],
)
def test_bad_invocations_get_one_line_and_exit_code_2(args, message, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "dir").mkdir()
    names = {"FILE": tmp_path / "file", "EMPTY": tmp_path / "empty.jsonl", "DIR": tmp_path / "dir", "OUT": tmp_path / "out"}

    def fill(text: str) -> str:
        for key, path in names.items():
            text = text.replace(key, str(path))
        return text

    result = runner.invoke(app, [fill(a) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith(fill(message)), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # nothing written


def test_bench_on_cuda_without_a_gpu_is_one_line(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["bench", "--shape", "tiny", "--device", "cuda"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --device cuda: no CUDA GPU is available on this machine; use --device cpu"


def test_small_images_keep_through_the_cli():
    args = ["run", "--plan", "divprune", "--avg-tokens", "100000", "--max-new-tokens", "1", "--json"]
    strict = runner.invoke(app, args)
    assert strict.exit_code == 2
    assert strict.stderr.startswith("error: sample 0 of the batch (") and "out of reach" in strict.stderr
    kept = runner.invoke(app, [*args, "--small-images", "keep"])
    assert kept.exit_code == 0, kept.output
    result = json.loads(kept.stdout)
    assert result["pruned"]["kept_per_stage"] == [result["unpruned"]["visual_tokens"]]
