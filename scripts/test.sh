#!/usr/bin/env bash
# test.sh — install everything the tests need (scripts/setup.sh --vllm) and run the whole suite as CI does.
# Unit tests need nothing; integration tests need root and real BPF; e2e tests run real servers (vLLM on the CPU,
# Prometheus, an S3 server). Here nothing is skipped: a test that cannot run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --vllm
export OTEL_CUDA_REQUIRE_ROOT=1 OTEL_CUDA_REQUIRE_VLLM=1
exec .venv/bin/python -m pytest -p no:cacheprovider -q -W ignore::DeprecationWarning "$@" tests
