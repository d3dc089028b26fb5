"""Every command through Typer's CliRunner on tiny local models, and once as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pruneware.cli import app
from pruneware.models import build_tiny

runner = CliRunner()


@pytest.fixture(scope="module", params=["llava", "qwen2.5-vl"])
def model_dir(request, tmp_path_factory):
    """A random-weight tiny model saved as a local folder, with its processor."""
    model, processor = build_tiny(request.param, seed=0)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result


def test_plans_and_models_list_everything():
    result = invoke("plans", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert {p["name"] for p in payload["policies"]} >= {"random", "divprune", "fastv", "adaptinfer", "crosslmm"}
    assert {p["name"] for p in payload["presets"]} >= {"fastv", "adaptinfer", "info-horizon", "crosslmm"}
    assert payload["model_types"] == ["llava", "llava_next", "qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
    result = invoke("models", "--json")
    assert result.exit_code == 0
    assert {m["name"] for m in json.loads(result.stdout)["models"]} == {"tiny-llava", "tiny-qwen2.5-vl"}
    assert "presets" in invoke("plans").stdout


@pytest.mark.parametrize("plan", ["fastv@2:0.25", "crosslmm"])
def test_run_compares_pruned_and_unpruned(model_dir, plan):
    result = invoke("run", "--model", model_dir, "--plan", plan, "--max-new-tokens", "2", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["pruned"]["avg_visual_tokens"] < payload["unpruned"]["visual_tokens"]
    assert payload["pruned"]["prefill_ms"] > 0 and payload["unpruned"]["prefill_ms"] > 0
    assert isinstance(payload["pruned"]["answer"], str)


def test_eval_writes_results_plots_and_resumes(model_dir, tmp_path):
    out = tmp_path / "ev"
    args = ["eval", "--model", model_dir, "--limit", "4", "--batch-size", "2", "--plans", "none,fastv,divprune@pre:0.5",
            "--avg-tokens", "128", "--out", str(out), "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [r["plan"] for r in payload["results"]] == ["none", "fastv", "divprune@pre:0.5"]
    for row in payload["results"]:
        assert {"plan", "avg_tokens", "accuracy", "relative_accuracy", "avg_visual_tokens", "flops", "vision_flops",
                "prefill_ms", "per_task"} <= set(row)
    # LLaVA's tower always sees the full image: every plan costs the unpruned tower's vision FLOPs
    assert len({r["vision_flops"] for r in payload["results"]}) == 1 and payload["results"][0]["vision_flops"] > 0
    fastv, explicit = payload["results"][1], payload["results"][2]
    assert abs(fastv["avg_visual_tokens"] - 128) <= 1
    assert explicit["avg_tokens"] is None and explicit["plans_run"] == ["divprune@pre:0.5"]  # once, as written
    assert payload["results"][0]["avg_visual_tokens"] > fastv["avg_visual_tokens"]
    for png in payload["plots"]:
        with Image.open(png) as image:
            assert image.size[0] > 0 and image.size[1] > 0
    lines = (out / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 4
    written = [json.loads(x) for x in lines]
    assert {r["plan"] for r in written if r["requested"] == "divprune@pre:0.5"} == {"divprune@pre:0.5"}
    assert all(r["plan"].startswith("fastv@") for r in written if r["requested"] == "fastv")  # the solved plan that ran
    (out / "rows.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # interrupted mid-write
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()[:5]]
    again = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines() if x.startswith("{") and x.endswith("}")]
    assert rows == [json.loads(x) for x in lines[:5]]  # finished rows are kept, not redone
    assert len({(r["variant"], r["id"]) for r in again}) == len(again) == 12
    other = invoke(*[a if a != model_dir else "tiny-llava" for a in args])  # another model, same folder
    assert other.exit_code == 2 and "holds rows of another run" in other.output, other.output


def test_eval_refuses_to_resume_rows_of_other_weights(tmp_path):
    """New weights saved under the same folder name are another run: their rows must not mix."""
    folder, out = tmp_path / "model", tmp_path / "ev"
    args = ["eval", "--model", str(folder), "--limit", "2", "--batch-size", "2", "--plans", "none", "--out", str(out), "--json"]
    for seed, code in ((0, 0), (0, 0), (1, 2)):  # first run, resume on the same weights, then retrained weights
        model, processor = build_tiny("llava", seed=seed)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        result = invoke(*args)
        assert result.exit_code == code, result.output
    assert "holds rows of another run" in result.output and "weights=" in result.output
    assert json.loads((out / "results.json").read_text())["weights"] == json.loads((out / "run.json").read_text())["weights"]


def test_weights_fingerprint_tracks_content_not_identity():
    from pruneware.models.loading import weights_fingerprint

    model, _ = build_tiny("llava", seed=0)
    twin, _ = build_tiny("llava", seed=0)
    assert weights_fingerprint(model) == weights_fingerprint(twin)
    with torch.no_grad():
        twin.lm_head.weight[-1, -1] += 1.0  # one value, in the last 64 of its tensor
    assert weights_fingerprint(model) != weights_fingerprint(twin)


def test_viz_draws_one_panel_per_stage(model_dir, tmp_path):
    out = tmp_path / "viz.png"
    result = invoke("viz", "--model", model_dir, "--plan", "divprune@pre:0.25,fastv@3:0.1", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["stages"]) == 2
    with Image.open(out) as image:
        assert image.width > 2 * image.height  # original + two panels side by side


def test_bench_on_a_tiny_shape():
    result = invoke("bench", "--shape", "tiny", "--plans", "none,divprune", "--batch-sizes", "1", "--repeats", "1",
                    "--avg-tokens", "64", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [r["plan"] for r in rows] == ["none", "divprune"]
    assert rows[1]["ran"].startswith("divprune@pre:")
    assert rows[1]["avg_visual_tokens"] == 64 and rows[1]["kv_cache_mb"] < rows[0]["kv_cache_mb"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--image", "/no/such.png", "--prompt", "hi"], "error: image not found: /no/such.png"),
        (["run", "--plan", "nosuch@2:0.5"], "error: unknown policy 'nosuch'; valid policies:"),
        (["run", "--model", "no-such-model"], "error: unknown model 'no-such-model'"),
        (["bench", "--shape", "gpt-5"], "error: unknown shape 'gpt-5'; valid shapes:"),
        (["bench", "--shape", "tiny", "--batch-sizes", "0"], "error: --batch-sizes must be >= 1, got 0"),
        (["eval", "--avg-tokens", "0"], "error: --avg-tokens must be >= 1, got 0"),
        (["eval", "--bench", "jsonl", "--data", "BAD_JSONL"], "error: "),
        (["eval", "--bench", "nosuch"], "error: unknown benchmark 'nosuch'; valid benchmarks:"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_code_2(model_dir, args, message, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "question": "q", "answer": "a"}\n{not json\n')
    args = [str(bad) if a == "BAD_JSONL" else a for a in args]
    if "--model" not in args and args[0] == "run":
        args = [*args, "--model", model_dir]
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_real_subprocess(model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "pruneware.cli", "run", "--model", model_dir, "--max-new-tokens", "2", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["plan"] == "divprune@pre:0.25"


def test_train_adapter_command_trains_and_saves(model_dir, tmp_path):
    if "qwen" in model_dir:
        pytest.skip("one architecture is enough for the pass-through command")
    result = invoke("train-adapter", "--model", model_dir, "--budget", "16", "--steps", "2", "--batch", "2",
                    "--out", str(tmp_path / "adapter"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapter" / "crosslmm_adapter.safetensors").stat().st_size > 0


def test_eval_skips_budgets_a_preset_cannot_reach(model_dir, tmp_path):
    if "qwen" in model_dir:
        pytest.skip("one architecture is enough")
    result = invoke("eval", "--model", model_dir, "--limit", "2", "--plans", "none,random,divprune,sparsevlm",
                    "--avg-tokens", "64", "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [r["plan"] for r in payload["results"]] == ["none", "divprune"]
    assert "out of reach for preset 'random'" in payload["skipped"]["random|64.0"]
    # SparseVLM's first stage sits at layer 1 of 8 and recycles tokens: 64 is out of reach, 128 runs
    assert "out of reach for preset 'sparsevlm'" in payload["skipped"]["sparsevlm|64.0"]
    result = invoke("eval", "--model", model_dir, "--limit", "2", "--plans", "sparsevlm", "--avg-tokens", "128",
                    "--out", str(tmp_path / "128"), "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["results"]
    assert row["plans_run"] == ["sparsevlm@1:117:compact,sparsevlm@2:66:compact,sparsevlm@4:44:compact"]
    assert abs(row["avg_visual_tokens"] - 128) < 1
