#!/usr/bin/env python3
"""Does the system view cost CUDA calls anything? (issue 6/6: its probes are on other events.)

One run, one process (testbed/build/bench_driver --serve on a private copy of the fake libcuda), our CUDA probes
attached to that copy all along; the system view's BPF program (syscall and sched_switch tracepoints) loaded in a
second program whose pid filter is switched on and off between rounds — so each round measures the same calls
with the system view tracing this process and without, interleaved, and drift cancels out of the ratio.

    sudo .venv/bin/python bench/sysview_cost.py [--rounds 8] [--n 3000] [--json]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otel_cuda.bpf import BPF_DIR, BpfConfig, Probes  # noqa: E402
from otel_cuda.probes import DRIVER_PROBES  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "testbed")], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="sysview-cost-"))
    lib = tmp / "libcuda.so.1"
    shutil.copy(ROOT / "testbed" / "build" / "libcuda.so.1", lib)  # a private inode: nobody else's probes fire
    driver = subprocess.Popen([str(ROOT / "testbed" / "build" / "bench_driver"), "--lib", str(lib), "--serve"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "FAKE_CUDA_SYNC_US": "0"})
    cuda = Probes(BpfConfig(extra_sources=()))  # our CUDA probes, no system view
    system = Probes(BpfConfig(extra_sources=(str(BPF_DIR / "sys_probes.bpf.c"),)))  # + the system view
    st = os.stat(lib)
    cuda.attach_library((st.st_dev, st.st_ino), str(lib), DRIVER_PROBES)
    cuda.select(driver.pid)
    # the second program's tracepoints attach when it loads (BCC attaches TRACEPOINT_PROBEs itself); its uprobes
    # are not attached, so on CUDA calls only its pid filter decides whether the system view does any work
    results = {"with": {"launch": [], "sync": []}, "without": {"launch": [], "sync": []}}

    def run(func: str) -> float:
        driver.stdin.write(f"run {func} {args.n}\n")
        driver.stdin.flush()
        ns = None
        while True:
            line = json.loads(driver.stdout.readline())
            if line.get("done"):
                return ns
            ns = line.get("median_ns_per_call", line.get("ns_per_call"))

    try:
        for r in range(args.rounds):
            for mode in (("with", "without") if r % 2 == 0 else ("without", "with")):
                (system.select if mode == "with" else system.deselect)(driver.pid)
                for func in ("launch", "sync"):
                    results[mode][func].append(run(func))
    finally:
        driver.stdin.write("quit\n")
        driver.stdin.flush()
        driver.wait(10)
        system.close()
        cuda.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out = {f: {"with_system_view_ns": statistics.median(results["with"][f]),
               "without_ns": statistics.median(results["without"][f]),
               "ratio": statistics.median(results["with"][f]) / statistics.median(results["without"][f])}
           for f in ("launch", "sync")}
    out["rounds"] = args.rounds
    out["calls_per_round"] = args.n
    print(json.dumps(out, indent=1) if args.json else
          "\n".join(f"{f}: {v['without_ns']:.0f} ns without the system view, {v['with_system_view_ns']:.0f} ns with "
                    f"(ratio {v['ratio']:.3f})" for f, v in out.items() if isinstance(v, dict)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
