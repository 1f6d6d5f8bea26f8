#!/usr/bin/env bash
# Run here (the development machine), from the repository root, after bash ../shared/gpu/prepare-device.sh:
# puts the pure-Python packages the sidecar's stages import and the GPU machine lacks (OpenTelemetry API/SDK,
# semantic conventions, OTLP protos, googleapis-common-protos) into .gpu/py, at the versions of this checkout's
# .venv. bench/gpu/run.sh puts .gpu/py on PYTHONPATH when it exists. Without it the GPU run's consumer is the
# pipeline alone (if otel_cuda.pipeline imports without OpenTelemetry), and the table says so.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
pip="$root/.venv/bin/pip"
ver() { "$pip" show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
pkgs=()
for p in opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto \
         googleapis-common-protos cxxfilt; do
  v=$(ver "$p"); [ -n "$v" ] && pkgs+=("$p==$v") || pkgs+=("$p")
done
target=${TARGET:-.gpu/py}
mkdir -p "$target"
"$pip" install --quiet --disable-pip-version-check --no-deps --only-binary=:all: --target "$target" "${pkgs[@]}"
du -sh "$target" | awk -v p="${pkgs[*]}" '{print "prepared " $2 " (" $1 "): " p}'
