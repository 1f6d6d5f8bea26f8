import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/support importable as `support`


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("OTEL_CUDA_REQUIRE_ROOT"):
            pytest.fail("integration tests need root (OTEL_CUDA_REQUIRE_ROOT is set)")
        pytest.skip("needs root for BPF")


@pytest.fixture(scope="session")
def testbed():
    from support.harness import build_testbed

    build_testbed()


@pytest.fixture(scope="session")
def probes(testbed):
    """One loaded BPF program for the session: compiling costs seconds and each uprobe's release waits for an
    RCU grace period (~0.1 s here), so tests share it; its kernel maps are read per pid."""
    _need_root()
    from otel_cuda.bpf import BpfConfig, Probes

    p = Probes(BpfConfig(runtime_layer=True))  # tests attach runtime probes on it too
    yield p
    p.close()
