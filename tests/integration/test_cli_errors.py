"""Bad input: one clear line on stderr, a non-zero exit, never a traceback."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otel_cuda import doctor

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]
OTEL_CUDA = [sys.executable, "-m", "otel_cuda.cli"]
QUIET = ["--metrics-address", "off", "--health-address", "off", "--receiver-grpc", "off", "--receiver-http", "off",
         "--no-archive"]


def run(*args, no_capabilities=False, timeout=120):
    cmd = [*OTEL_CUDA, *args]
    if no_capabilities:
        # uid 0 with every capability gone: what the privilege check looks at (a container whose capabilities were
        # dropped), and unlike another uid it can still read a checkout in a directory only root may enter
        cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out.returncode, out.stderr


def one_clear_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("otel-cuda:")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def test_not_root():
    code, err = run("run", "--match", "x", *QUIET, no_capabilities=True)
    assert code == 2
    assert "not root" in one_clear_line(err) and "CAP_BPF" in err


def test_invalid_regex():
    code, err = run("run", "--match", "(unclosed", *QUIET)
    assert code == 2 and "invalid --match regex" in one_clear_line(err)


def test_no_such_pid():
    code, err = run("run", "--pid", "999999", *QUIET)
    assert code == 2 and "no such process: 999999" in one_clear_line(err)


def test_target_without_libcuda():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        code, err = run("run", "--pid", str(sleeper.pid), *QUIET)
    finally:
        sleeper.kill()
    assert code == 2 and "maps no libcuda.so" in one_clear_line(err)


def test_unwritable_archive_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run("run", "--match", "x", "--archive", str(blocker / "archive"), "--metrics-address", "off",
                    "--health-address", "off", "--receiver-grpc", "off", "--receiver-http", "off")
    assert code == 2 and "not writable" in one_clear_line(err)


def test_receiver_port_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, err = run("run", "--match", "x", "--no-archive", "--metrics-address", "off", "--health-address", "off",
                        "--receiver-grpc", f"127.0.0.1:{port}", "--receiver-http", "off")
    assert code == 2 and f"127.0.0.1:{port}" in one_clear_line(err)


def test_bad_setting_value():
    code, err = run("run", "--match", "x", "--ringbuf-pages", "1000", *QUIET)
    assert code == 2 and "power of two" in one_clear_line(err)


def test_no_uprobes_is_reported_with_its_remedy(tmp_path):
    check = doctor.check_uprobes(sysfs=str(tmp_path), tracefs_dirs=(str(tmp_path / "tracing"),))
    assert not check.ok and "CONFIG_UPROBES" in check.remedy


def test_doctor_passes_here_and_checks_a_target(testbed):
    code = subprocess.run([*OTEL_CUDA, "doctor"], capture_output=True, text=True, cwd=ROOT)
    assert code.returncode == 0, code.stdout
    for name in ("privileges", "tracefs", "uprobes", "kernel headers", "bcc", "bpf"):
        assert any(line.startswith("ok") and name in line for line in code.stdout.splitlines()), (name, code.stdout)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        out = subprocess.run([*OTEL_CUDA, "doctor", "--pid", str(sleeper.pid)], capture_output=True, text=True, cwd=ROOT)
    finally:
        sleeper.kill()
    assert out.returncode == 1 and "maps no libcuda.so" in out.stdout and "remedy:" in out.stdout
