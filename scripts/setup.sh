#!/usr/bin/env bash
# setup.sh — make this machine able to run otel-cuda (Debian 12, as root). Idempotent.
#   bash scripts/setup.sh            BCC, kernel headers, tracefs, .venv with otel-cuda
#   bash scripts/setup.sh --test     the above, plus test tools (Prometheus, bpftrace, shellcheck, moto, helm engine)
#   bash scripts/setup.sh --vllm     the above, plus a CPU build of vLLM in .venv-vllm for the end-to-end tests
# Every failure names its remedy.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
want_vllm=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --vllm) want_test=1; want_vllm=1 ;;
    *) echo "setup: unknown option $arg (use --test or --vllm)" >&2; exit 2 ;;
  esac
done

say() { echo "setup: $*"; }
die() { echo "setup: FAILED: $1" >&2; echo "setup: remedy: $2" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "not root" "run as root (sudo bash scripts/setup.sh): BPF and apt need it"
command -v apt-get >/dev/null || die "apt-get not found" "this script supports Debian/Ubuntu; install BCC (python3-bpfcc) by hand"

# --- Debian packages -------------------------------------------------------------------------------
packages=(bpfcc-tools python3-bpfcc python3-venv gcc make libc6-dev)
[ "$want_test" = 1 ] && packages+=(prometheus bpftrace shellcheck)
missing=()
for p in "${packages[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done

kernel=$(uname -r)
if [ ! -e "/lib/modules/$kernel/source/include/linux/kconfig.h" ]; then
  # The running kernel ships no headers here; BCC needs some to compile uprobe programs. Debian's own serve.
  if apt-cache policy "linux-headers-$kernel" 2>/dev/null | grep -q Candidate: && \
     ! apt-cache policy "linux-headers-$kernel" | grep -q "Candidate: (none)"; then
    missing+=("linux-headers-$kernel")
  else
    dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "ok installed" || missing+=(linux-headers-amd64)
  fi
fi

if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed" "check network access to the Debian mirror"
  apt-get install -y -q "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed" "run it by hand to see why"
fi

# --- kernel headers for BCC ------------------------------------------------------------------------
if [ ! -e "/lib/modules/$kernel/source/include/linux/kconfig.h" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$hdr" ] || die "no kernel headers for $kernel" "apt-get install linux-headers-amd64"
  # Debian splits the headers: the arch-specific tree (generated files) and the -common tree (the sources).
  common="${hdr%-*}-common"
  [ -d "$common" ] || common="$hdr"
  mkdir -p "/lib/modules/$kernel"
  ln -sfn "$hdr" "/lib/modules/$kernel/build"
  ln -sfn "$common" "/lib/modules/$kernel/source"
  say "the running kernel $kernel ships no headers: linked /lib/modules/$kernel/build -> $hdr and source -> $common (Debian's serve uprobe programs)"
fi

# --- tracefs / debugfs ------------------------------------------------------------------------------
if [ ! -e /sys/kernel/tracing/uprobe_events ] && [ ! -e /sys/kernel/debug/tracing/uprobe_events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
  mountpoint -q /sys/kernel/debug || mount -t debugfs nodev /sys/kernel/debug 2>/dev/null || true
  [ -e /sys/kernel/tracing/uprobe_events ] || [ -e /sys/kernel/debug/tracing/uprobe_events ] || \
    die "tracefs has no uprobe_events" "the kernel needs CONFIG_UPROBE_EVENTS=y; mount tracefs on /sys/kernel/tracing"
  say "mounted tracefs"
fi

# --- the virtual environment ------------------------------------------------------------------------
# BCC's Python binding lives in Debian's python3; the venv sees it through --system-site-packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv || die "cannot create .venv" "apt-get install python3-venv"
  say "created .venv (with Debian's python3 and its bcc module)"
fi
extras=""
[ "$want_test" = 1 ] && extras="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras" \
  || die "pip install of otel-cuda failed" "check access to PyPI; the log above says which package"
if [ "$want_test" = 1 ] && ! .venv/bin/python -c 'import helm_sdkpy' 2>/dev/null; then
  # helm-sdkpy declares Python >= 3.12 but loads on 3.11; it is only the Helm engine for the chart's lint tests.
  .venv/bin/python -m pip install -q --disable-pip-version-check --ignore-requires-python helm-sdkpy \
    || die "pip install helm-sdkpy failed" "check access to PyPI"
fi
.venv/bin/python -c 'import bcc' || die "the venv cannot import bcc" "apt-get install python3-bpfcc"

if [ "$want_vllm" = 1 ]; then
  bash scripts/setup-vllm.sh
fi
say "ready: .venv/bin/otel-cuda"
