"""End-to-end fixtures: a real vLLM (the CPU build in .venv-vllm) serving a tiny locally built Llama.

`bash scripts/setup-vllm.sh` makes .venv-vllm (OTEL_CUDA_VLLM_VENV names another). Without it these tests are
skipped, with the reason, unless OTEL_CUDA_REQUIRE_VLLM is set (CI sets it): then a missing or broken vLLM fails
them. The model is built into .cache/tiny-llama (OTEL_CUDA_TINY_LLAMA names another place).

    def test_x(start_vllm):
        with start_vllm("http://127.0.0.1:4317") as base_url:   # waits for /health (up to 180 s)
            ...                                                 # stopped on exit: SIGINT, then SIGKILL
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("OTEL_CUDA_VLLM_VENV", ROOT / ".venv-vllm"))  # setup-vllm.sh: VLLM_VENV=…
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
MODEL_DIR = Path(os.environ.get("OTEL_CUDA_TINY_LLAMA", ROOT / ".cache" / "tiny-llama"))
MODEL_NAME = "tiny-llama"
READY_TIMEOUT_S = 180  # measured: 65–86 s on a 2-core machine
STOP_TIMEOUT_S = 30


def _skip_or_fail(reason: str):
    if os.environ.get("OTEL_CUDA_REQUIRE_VLLM"):
        pytest.fail(f"{reason} (OTEL_CUDA_REQUIRE_VLLM is set, so this is a failure)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        _skip_or_fail(f"{VLLM_VENV} is missing: run bash scripts/setup-vllm.sh")
    check = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm; from transformers import LlamaConfig"],
                           capture_output=True, text=True, timeout=300)
    if check.returncode != 0:
        tail = (check.stderr.strip().splitlines() or ["?"])[-1]
        _skip_or_fail(f"{VLLM_VENV} cannot import vllm ({tail}): remove it and run bash scripts/setup-vllm.sh")
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def vllm_model(vllm_python) -> Path:
    """The tiny Llama, built once into the cache (testbed/make_model.py is idempotent)."""
    proc = subprocess.run([str(vllm_python), str(ROOT / "testbed" / "make_model.py"), str(MODEL_DIR)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        pytest.fail(f"testbed/make_model.py failed:\n{proc.stderr[-3000:]}", pytrace=False)
    return MODEL_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGINT to vLLM's whole process group (API server, EngineCore, workers), then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived their parent, or a hung shutdown
    proc.wait()


@pytest.fixture(scope="session")
def start_vllm(vllm_python, vllm_model, tmp_path_factory):
    """Factory: start_vllm(otlp_endpoint, port=None, env=None, args=()) → a context manager yielding the base URL."""
    logs = tmp_path_factory.mktemp("vllm-logs")

    @contextlib.contextmanager
    def start(otlp_endpoint: str | None, port: int | None = None, env: dict | None = None, args=()):
        port = port or free_port()
        cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_model),
               "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", "256", "--dtype", "float32", "--enforce-eager", *args]
        if otlp_endpoint:
            cmd += ["--otlp-traces-endpoint", otlp_endpoint]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                    "OTEL_BSP_SCHEDULE_DELAY": "200", **(env or {})}
        log_path = logs / f"vllm-{port}.log"
        url = f"http://127.0.0.1:{port}"
        with open(log_path, "w") as log:
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT),
                                    start_new_session=True)  # its own group: stop it and its children together
            try:
                while not _healthy(url):
                    if proc.poll() is not None:
                        pytest.fail(f"vLLM exited with {proc.returncode} before /health:\n"
                                    f"{log_path.read_text()[-4000:]}", pytrace=False)
                    if time.monotonic() - t0 > READY_TIMEOUT_S:
                        pytest.fail(f"vLLM not healthy after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}",
                                    pytrace=False)
                    time.sleep(1)
                print(f"vLLM ready at {url} after {time.monotonic() - t0:.0f} s (log {log_path})")
                yield url
            finally:
                _stop_group(proc)

    return start
