#!/usr/bin/env bash
# The whole GPU measurement in one go:
#   1. per-call cost next to the floors on this machine's kernel: bench/cpu on copies of the real libcuda, called
#      uninitialised (the probes' cost does not depend on what the function does), variants interleaved; and the
#      launch handler's BPF time with one part taken out at a time (bench/ablate.py);
#   2. eager and CUDA-graph decode traced/untraced inside one process, captured launches against an independent
#      count, the share of named launches (bench/gpu/decode_bench.py);
#   3. ingest capacity with the real libcuda's entry point as the producer (bench/ingest);
#   4. a launch storm: 8 processes x 2 threads on the real libcuda, one sidecar (bench/storm.py).
# Results: $OUT (or bench/gpu/out/): cpu.json, gpu_results.json, ingest.json and a log each; tables printed last.
#
# On the GPU machine, from the repository root (prepare .gpu/ here first: bash ../shared/gpu/prepare-device.sh and
# bash bench/gpu/prepare.sh; build testbed/ here and carry testbed/build, the GPU machine has no compiler):
#   source .gpu/activate.sh; bash bench/gpu/run.sh [--budget-s 540] [...decode_bench.py options]
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 2
py=${PYTHON:-python3}
budget=540  # seconds for the three parts together (the device tool allows 600 a command)
parts=percall,ablate,decode,ingest,storm
while [ $# -gt 0 ]; do
    case $1 in
        --budget-s) budget=$2; shift 2 ;;
        --parts) parts=$2; shift 2 ;;  # a subset, e.g. ablate,decode
        *) break ;;
    esac
done
want() { [[ ",$parts," == *",$1,"* ]]; }
# pure-Python packages brought along by bench/gpu/prepare.sh (OpenTelemetry SDK & co.), when there
[ -d "$root/.gpu/py" ] && export PYTHONPATH="$root/.gpu/py${PYTHONPATH:+:$PYTHONPATH}"
echo "== $(date -Is) $(uname -srm), $(nproc) CPUs; python: $($py -c 'import sys; print(sys.version.split()[0])')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$py - <<'PY' || { echo "run.sh: the bench needs bcc (source .gpu/activate.sh), torch and transformers" >&2; exit 2; }
import importlib.util
missing = [m for m in ("bcc", "torch", "transformers") if importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit(f"missing: {', '.join(missing)}")
# what the sidecar's stages import here (opentelemetry is optional: without it the consumer is the pipeline alone)
import otel_cuda.bpf, otel_cuda.events, otel_cuda.probes, otel_cuda.archive  # noqa: F401
try:
    import otel_cuda.pipeline  # noqa: F401
except ImportError as exc:
    raise SystemExit(f"otel_cuda.pipeline does not import here ({exc}): run bash bench/gpu/prepare.sh on the "
                     "development machine and bring .gpu/ along")
PY
out=${OUT:-$root/bench/gpu/out}
mkdir -p "$out"
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
libcuda=${LIBCUDA:-}  # default: the libcuda.so.1 the loader finds
[ -n "$libcuda" ] || libcuda=$($py -c 'import ctypes, re
ctypes.CDLL("libcuda.so.1")
print(next(l.split()[-1] for l in open("/proc/self/maps") if re.search(r"/libcuda\.so[.0-9]*$", l)))')
echo "libcuda: $libcuda"
export PYTHON=$py

if want percall; then
    echo "== 1. per-call cost (bench/cpu on copies of $libcuda)"
    timeout 100 "$py" bench/percall.py --no-ingest --no-seed --rounds 7 --libcuda "$libcuda" --out "$out/cpu.json" \
        >"$out/cpu.log" 2>&1 || echo "per-call suite: exit $?"
fi
if want ablate; then
    echo "== 1b. the launch handler's parts (bench/ablate.py on copies of $libcuda)"
    timeout 60 "$py" bench/ablate.py --libcuda "$libcuda" --out "$out/ablate.json" >"$out/ablate.log" 2>&1 \
        || echo "ablate: exit $?"
fi
if want decode; then
    reserve=0; want ingest && reserve=90; want storm && reserve=$((reserve + 40))  # kept for the later parts
    echo "== 2. decode pairs ($(left) s left)"
    "$py" bench/gpu/decode_bench.py --out "$out" --libcuda "$libcuda" \
        --deadline-s $(($(left) - reserve - 15)) "$@" >"$out/gpu.log" 2>&1 || echo "decode bench: exit $?"
fi
if want ingest; then
    echo "== 3. ingest ($(left) s left)"
    after=5; want storm && after=45  # seconds kept for the storm
    timeout "$(($(left) > after + 25 ? $(left) - after : 25))" "$py" bench/ingest.py --no-seed --contended-calls 0 --seconds 2 \
        --keep-going --rates 100000,200000,300000,400000,0 --libcuda "$libcuda" --out "$out/ingest.json" \
        >"$out/ingest.log" 2>&1 || echo "ingest suite: exit $?"
fi
if want storm; then
    echo "== 4. launch storm ($(left) s left)"
    timeout "$(($(left) > 30 ? $(left) - 3 : 25))" "$py" bench/storm.py --processes 8 --threads 2 --calls 200000 \
        --libcuda "$libcuda" --out "$out/storm.json" >"$out/storm.log" 2>&1 || echo "storm: exit $?"
fi
echo; echo "== tables"
for part in cpu:14 ablate:8 gpu:16 ingest:30 storm:1; do
    f="$out/${part%%:*}.log"; [ -f "$f" ] && { tail -n "${part##*:}" "$f"; echo; }
done
