"""The lmms-eval plugin against the real lmms-eval package (CPU, offline).

Install lmms-eval with `.ci/install_lmms.sh`; without it these tests are skipped.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not importable: run .ci/install_lmms.sh to install it")
pytest.importorskip("datasets", reason="the synthetic task export needs datasets")

from PIL import Image  # noqa: E402

from pruneware.integrations.lmms_eval import CHAT_CLASS, MODEL_ID, SIMPLE_CLASS  # noqa: E402
from pruneware.integrations.lmms_eval.args import ModelArgs, ModelArgsError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PLAN = "divprune@pre:0.25"
N = 20


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    """PYTHONPATH for subprocesses: this checkout, plus an entry-point shim when the installed
    pruneware's metadata predates the `lmms_eval.models` entry point (a stale editable install).
    The shim declares exactly what pyproject.toml declares."""
    paths = [str(ROOT)]
    if not any(ep.name == MODEL_ID for ep in entry_points(group="lmms_eval.models")):
        shim = tmp_path_factory.mktemp("ep") / "pruneware_lmms_shim-0.0.dist-info"
        shim.mkdir()
        (shim / "METADATA").write_text("Metadata-Version: 2.1\nName: pruneware-lmms-shim\nVersion: 0.0\n")
        (shim / "entry_points.txt").write_text(f"[lmms_eval.models]\n{MODEL_ID} = pruneware.integrations.lmms_eval:manifest\n")
        paths.append(str(shim.parent))
    return os.pathsep.join(paths)


def _run(args: list[str], pythonpath: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_pyproject_declares_the_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points."lmms_eval.models"]' in text
    assert 'pruneware = "pruneware.integrations.lmms_eval:manifest"' in text


def test_lmms_eval_registry_resolves_pruneware(plugin_path):
    code = (
        "from lmms_eval.models import get_model, get_model_manifest, list_available_models\n"
        "m = get_model_manifest('pruneware')\n"
        "print(m.chat_class_path, m.simple_class_path)\n"
        "print(get_model('pruneware').__name__, get_model('pruneware', force_simple=True).__name__)\n"
        "print(get_model_manifest('llava_hf').chat_class_path, 'pruneware' in list_available_models())\n"
    )
    proc = _run(["-c", code], plugin_path)
    assert proc.returncode == 0, proc.stderr
    manifest, classes, builtin = proc.stdout.strip().splitlines()[-3:]
    assert manifest.split() == [CHAT_CLASS, SIMPLE_CLASS]
    assert classes.split() == ["PrunewareChat", "PrunewareSimple"]
    assert builtin.split() == ["lmms_eval.models.chat.llava_hf.LlavaHf", "True"]  # built-ins untouched


def test_model_args_are_checked():
    with pytest.raises(ModelArgsError, match=r"unknown model_args foo.*valid: pretrained, plan"):
        ModelArgs.parse(pretrained="tiny-llava", foo=1)
    with pytest.raises(ModelArgsError, match="dtype 'float8'"):
        ModelArgs.parse(dtype="float8")
    with pytest.raises(ModelArgsError, match="batch_size"):
        ModelArgs.parse(batch_size="auto")
    args = ModelArgs.parse(plan="divprune@pre+random@20", avg_tokens=64, batch_size="4", max_batch_size=None)
    assert (args.plan, args.avg_tokens, args.batch_size) == ("divprune@pre,random@20", 64.0, 4)
    args = ModelArgs.parse(plan="divprune@pre:0.5+random@20:0.2", batch_size="4", max_batch_size=None)
    assert (args.plan, args.avg_tokens, args.batch_size) == ("divprune@pre:0.5,random@20:0.2", None, 4)
    # a budget you write is what runs: written budgets (or a paper's exact schedule) refuse avg_tokens
    for plan in ("divprune@pre:0.5+random@20:0.2", "adaptinfer-llava-64"):
        with pytest.raises(ModelArgsError, match="conflict with avg_tokens"):
            ModelArgs.parse(plan=plan, avg_tokens=64)
    assert ModelArgs.parse(plan='"fastv@2:64,random@4:8"').plan == "fastv@2:64,random@4:8"


def test_unknown_argument_fails_through_lmms_eval_parser():
    from pruneware.integrations.lmms_eval.model import PrunewareChat

    with pytest.raises(ModelArgsError, match="unknown model_args conv_template"):
        PrunewareChat.create_from_arg_string("pretrained=tiny-llava,conv_template=vicuna", {"batch_size": 1})


def test_images_are_passed_as_given():
    from pruneware.integrations.lmms_eval.prompting import from_context, from_messages

    image = Image.new("RGB", (32, 32), (200, 10, 10))
    chat = from_messages([{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": "q?"}]}])
    assert chat.images[0] is image  # the same object: no JPEG round trip, no copy
    simple = from_context("<image>\nq?", [image])
    assert simple.images[0] is image and simple.messages[0]["content"][-1]["text"] == "q?"


def test_lmms_eval_end_to_end_equals_pruneware_eval(plugin_path, tmp_path):
    """`python -m lmms_eval --model pruneware` on the exported synthetic task gives, question for
    question, the answers `pruneware eval` gives with the same plan."""
    bench, out = tmp_path / "bench", tmp_path / "lmms"
    proc = _run(["-m", "pruneware.cli", "export-bench", "--out", str(bench), "--n", str(N), "--json"], plugin_path)
    assert proc.returncode == 0, proc.stderr
    proc = _run(["-m", "lmms_eval", "--model", "pruneware", "--model_args", f"pretrained=tiny-llava,plan={PLAN}",
                 "--tasks", "pruneware_synthetic", "--include_path", str(bench), "--limit", str(N),
                 "--batch_size", "4", "--device", "cpu", "--output_path", str(out), "--log_samples"], plugin_path)  # fmt: skip
    folder = out / "tiny-llava"
    samples = glob.glob(str(folder / "*_samples_pruneware_synthetic.jsonl"))
    assert samples, f"lmms-eval wrote no samples\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    by_doc = {r["doc_id"]: r for r in map(json.loads, Path(samples[0]).read_text().splitlines())}
    assert sorted(by_doc) == list(range(N))

    from typer.testing import CliRunner

    from pruneware.cli import app
    from pruneware.evals.datasets import load_benchmark

    evaluated = CliRunner().invoke(app, ["eval", "--plans", PLAN, "--avg-tokens", "", "--limit", str(N), "--seed", "0",
                                         "--batch-size", "8", "--out", str(tmp_path / "eval"), "--json"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    rows = [r for r in map(json.loads, (tmp_path / "eval" / "rows.jsonl").read_text().splitlines()) if r["plan"] == PLAN]
    assert len(rows) == N
    items = load_benchmark("synthetic", limit=N, seed=0)  # doc i of the export is item i
    expected = {r["id"]: r["prediction"] for r in rows}
    got = {items[d].id: r["filtered_resps"] for d, r in by_doc.items()}
    assert got == expected
    scores = {r["id"]: float(r["score"]) for r in rows}
    assert {items[d].id: r["exact_match"] for d, r in by_doc.items()} == scores

    results = json.loads(Path(glob.glob(str(folder / "*_results.json"))[0]).read_text())
    assert 0 < results["throughput"]["avg_pruneware_flops_ratio"] < 1
    cost = json.loads(Path(glob.glob(str(folder / "pruneware_cost_*.json"))[0]).read_text())
    summary = cost["summary"]
    assert summary["requests"] == N and len(cost["requests"]) == N
    assert summary["avg_visual_tokens"] == pytest.approx(0.25 * summary["avg_visual_tokens_unpruned"], abs=1)
    assert summary["flops_ratio"] == pytest.approx(results["throughput"]["avg_pruneware_flops_ratio"], abs=1e-6)
    assert {r["stages"][0]["policy"] for r in cost["requests"]} == {"divprune"}
