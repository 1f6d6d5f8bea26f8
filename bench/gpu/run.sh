#!/usr/bin/env bash
# The whole GPU measurement in one go (bench/gpu/decode_bench.py): per-call cost next to the floor, eager and
# CUDA-graph decode traced/untraced inside one process, captured launches against an independent count, the share
# of named launches. Full results in $OUT/gpu_results.json (or bench/gpu/out/); the short table is printed last.
#
# On the GPU machine, from the repository root (prepare .gpu/ here first: bash ../shared/gpu/prepare-device.sh):
#   source .gpu/activate.sh; bash bench/gpu/run.sh [--proposed] [--pairs 7] [...decode_bench.py options]
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
py=${PYTHON:-python3}
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
exec "$py" "$root/bench/gpu/decode_bench.py" --out "$out" "$@"
