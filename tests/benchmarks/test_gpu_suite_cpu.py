"""benchmarks/gpu_suite.py --cpu: the GPU suite's code runs end to end on tiny models.

Speed is not asserted (see STYLE.md); only that every expected number is there and sane.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the whole GPU suite, interpreted, in a subprocess
ROOT = Path(__file__).resolve().parents[2]
MODELS = {"llava-1.5-7b", "llava-next-7b-len", "qwen2.5-vl-7b"}
RUN_KEYS = {"ttft_ms", "prefill_ms", "ttft_all_ms", "peak_mem_bytes", "kv_cache_bytes"}
PLAN_KEYS = RUN_KEYS | {"preset", "avg_tokens", "plan", "kept_per_stage", "avg_visual_tokens", "tokens_per_layer",
                        "lower_bound", "overhead_ttft", "overhead_prefill", "speedup_vs_unpruned"}
META_KEYS = {"date", "mode", "gpu", "torch", "transformers", "triton", "cuda", "pruneware", "iters", "vision",
             "dtype", "seconds"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("suite") / "cpu.json"
    env = dict(os.environ, TRITON_INTERPRET="1")  # the kernel microbenchmarks run interpreted
    env.pop("PRUNEWARE_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--cpu", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "TTFT ms" in proc.stdout.splitlines()[-1] or "unpruned" in proc.stdout  # the table comes last
    return json.loads(out.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_meta_and_no_failures(suite) -> None:
    assert META_KEYS <= suite["meta"].keys() and suite["meta"]["mode"] == "cpu"
    assert not [s for s in suite["skipped"] if ": error:" in s], suite["skipped"]
    assert all("time budget" not in s for s in suite["skipped"]), "the CPU run should finish every config"
    assert set(suite["missing_presets"]) <= {"fastv", "adaptinfer", "info-horizon", "crosslmm", "random", "divprune"}


def test_every_model_batch_and_plan_has_sane_numbers(suite) -> None:
    assert {m["name"] for m in suite["models"]} == MODELS
    for model in suite["models"]:
        assert positive(model["n_visual"]) and model["seq_len"] > model["n_visual"]
        assert [b["batch"] for b in model["batches"]] == [1, 2]
        for row in model["batches"]:
            assert RUN_KEYS <= row["unpruned"].keys()
            assert all(positive(row["unpruned"][k]) for k in RUN_KEYS - {"ttft_all_ms"})
            assert row["plans"], f"{model['name']} B={row['batch']}: no plan ran"
            for plan in row["plans"]:
                assert PLAN_KEYS <= plan.keys(), PLAN_KEYS - plan.keys()
                for key in ("ttft_ms", "prefill_ms", "overhead_ttft", "overhead_prefill", "speedup_vs_unpruned",
                            "peak_mem_bytes", "kv_cache_bytes"):
                    assert positive(plan[key]), (model["name"], plan["preset"], key, plan[key])
                assert all(positive(plan["lower_bound"][k]) for k in ("ttft_ms", "prefill_ms", "kv_cache_bytes"))
                assert plan["kv_cache_bytes"] < row["unpruned"]["kv_cache_bytes"]  # pruning shrinks the cache
                assert plan["kv_cache_bytes"] == plan["lower_bound"]["kv_cache_bytes"]  # the bound keeps as much
                assert 0 < plan["avg_visual_tokens"] < model["n_visual"]
            for peer in row["peer"]:
                assert positive(peer["ttft_ms"]) and positive(peer["peer_over_pruneware_ttft"])
        assert any(row["peer"] for row in model["batches"]), f"{model['name']}: the FastV-style peer never ran"


def test_kernel_microbenchmarks_are_recorded(suite) -> None:
    kernels = {k["name"]: k for k in suite["kernels"]}
    gather, scores = kernels["gather"], kernels["scores"]
    for key in ("copy_tbps", "torch_gather_tbps", "torch_index_tbps", "set4_torch_us", "triton_tbps", "set4_triton_us"):
        assert positive(gather[key]), key
    assert positive(scores["reference_ms"]) and positive(scores["triton_ms"])


def test_vision_side_plans_are_timed_and_summarised(suite) -> None:
    """The CPU run times `random@vit1:0.25` on the tiny LLaVA and Qwen2.5-VL towers (on a GPU the
    -tower entries time vitK plans on the released towers, what device_check.sh summarises)."""
    import importlib.util

    timed = {m["name"]: [row.get("vision_plans", []) for row in m["batches"]] for m in suite["models"]}
    for name in ("llava-1.5-7b", "qwen2.5-vl-7b"):
        n_visual = next(m["n_visual"] for m in suite["models"] if m["name"] == name)
        for plans in timed[name]:
            (plan,) = plans
            assert plan["plan"] == "random@vit1:0.25" and 0 < plan["kept"] < n_visual
            assert positive(plan["ttft_ms"]) and positive(plan["speedup_vs_unpruned"])
    spec = importlib.util.spec_from_file_location("vit_ttft_summary", ROOT / "benchmarks" / "vit_ttft_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    table = summary.table(suite).splitlines()
    assert len(table) == 2 + 2 * 2  # header, rule, two models x two batches
    assert all("`random@vit1:0.25`" in line for line in table[2:])
