"""`vllm serve` with the plugin, started and stopped by the test, queried over the OpenAI API by
concurrent clients: answers equal the offline engine's, usage and metrics show the pruned prompt
lengths, bad input gets a clear error and the server keeps serving, bad plans are refused."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from pruneware.evals.synthetic import make_split
from pruneware.evals.synthetic.accuracy import normalize
from pruneware.integrations.vllm.offline import model_folder
from tests.integrations.serving.conftest import (
    ROOT,
    Server,
    chat_body,
    free_port,
    png_data_url,
    post_json,
    run_driver,
    serve_command,
)

MODEL, PLAN = "tiny-llava", "divprune@pre:64"
N, CLIENTS = 24, 8
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def offline(vllm_python):
    return run_driver(vllm_python, "tests.integrations.serving.drive_offline", {"model": MODEL, "plans": [PLAN], "n": N})[PLAN]


@pytest.fixture(scope="module")
def server(vllm_python):
    with Server(model_folder(MODEL), PLAN) as running:
        yield running
    assert running.proc.poll() is not None, "the server is still running after the test stopped it"


def prompt_tokens_total(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    values = re.findall(r"^vllm:prompt_tokens_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, flags=re.M)
    assert values, "the server's /metrics has no vllm:prompt_tokens_total"
    return sum(float(v) for v in values)


def test_concurrent_clients_get_the_offline_answers(server, offline):
    items = make_split("eval", N, seed=0)
    before = prompt_tokens_total(server.url)

    def ask(item):
        status, body = post_json(server.url + "/v1/chat/completions", chat_body(item.question, png_data_url(item.image)))
        assert status == 200, body
        return body

    with ThreadPoolExecutor(CLIENTS) as pool:
        replies = list(pool.map(ask, items))
    answers = [normalize(r["choices"][0]["message"]["content"]) for r in replies]
    assert answers == offline["answers"]
    assert [r["usage"]["prompt_tokens"] for r in replies] == offline["prompt_lengths"]
    assert prompt_tokens_total(server.url) - before == sum(offline["prompt_lengths"])


def test_broken_image_gets_a_clear_error_and_the_server_keeps_serving(server, offline):
    status, body = post_json(server.url + "/v1/chat/completions",
                             chat_body("what shape is red?", "data:image/png;base64,bm90IGFuIGltYWdl"))
    assert status == 400, body
    assert "image" in str(body).lower()
    item = make_split("eval", 1, seed=0)[0]
    status, body = post_json(server.url + "/v1/chat/completions", chat_body(item.question, png_data_url(item.image)))
    assert status == 200
    assert normalize(body["choices"][0]["message"]["content"]) == offline["answers"][0]


@pytest.mark.parametrize("plan, message", [
    ("adaptinfer@2:64", "other in-LLM stages"),
    ("fastv@2:64", "(pass enable_"),  # served, but only with the engine settings it needs (docs/vllm.md)
    ("random@pre:0", "at least one placeholder token"),
    ("nosuchpolicy@pre:64", "nosuchpolicy"),
])
def test_a_plan_vllm_cannot_serve_is_refused_at_startup(vllm_python, plan, message):
    command = serve_command(model_folder(MODEL), plan, free_port())
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


def test_qwen_server_solves_avg_tokens_per_image_and_refuses_an_unreachable_one(vllm_python):
    """tiny-qwen2.5-vl under `divprune` with avg_tokens=64: a 336-px image (576 tokens) keeps 64,
    answering as the offline engine does with `divprune@pre:64`; an image the request asks to
    process at 56 x 56 px (4 x 4 tokens) cannot reach 64 and gets a clear error; the server keeps
    serving."""
    name = "tiny-qwen2.5-vl"
    offline = run_driver(vllm_python, "tests.integrations.serving.drive_offline",
                         {"model": name, "plans": ["divprune@pre:64"], "n": 4})["divprune@pre:64"]
    items = make_split("eval", 4, seed=0)
    with Server(model_folder(name), "divprune", avg_tokens=64, extra=("--trust-request-mm-kwargs",)) as server:
        small = chat_body(items[0].question, png_data_url(items[0].image))
        small["mm_processor_kwargs"] = {"size": {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}}
        status, body = post_json(server.url + "/v1/chat/completions", small)
        assert status == 400, body
        assert "avg_tokens=64" in str(body) and "out of reach" in str(body)
        for item, answer, length in zip(items, offline["answers"], offline["prompt_lengths"], strict=True):
            status, body = post_json(server.url + "/v1/chat/completions", chat_body(item.question, png_data_url(item.image)))
            assert status == 200, body
            assert normalize(body["choices"][0]["message"]["content"]) == answer
            assert body["usage"]["prompt_tokens"] == length
