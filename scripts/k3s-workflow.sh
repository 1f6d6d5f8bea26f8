#!/usr/bin/env bash
# k3s-workflow.sh — otel-cuda on a K3s GPU node in one command: build the image, import it into K3s, install the
# chart self-contained (vLLM + otel-cuda sidecar + Collector + Jaeger + Prometheus + Grafana), wait for vLLM, send
# one prompt and a batch, verify that every request became a trace with its CUDA children (and was archived), and
# print where to look. docs/workflow.md describes each step and setting.
#
#   bash scripts/k3s-workflow.sh all                 # everything, in order
#   bash scripts/k3s-workflow.sh --dry-run all       # print every command it would run (`+ ...`), run none
#   bash scripts/k3s-workflow.sh status|logs|destroy
#
# Settings come from the environment (`help` lists them), including the seed's S3_BUCKET, S3_PREFIX,
# UPLOAD_ENABLED, TRACE_INTERVAL, TRACE_DIR and TARGET_PROCESS, which become the chart's values.
# Every failure names its remedy.
set -euo pipefail

PROG=k3s-workflow
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART=./helm/otel-cuda
CHART_NAME=otel-cuda
OTEL_CUDA=.venv/bin/otel-cuda

usage() {
  cat <<'EOF'
usage: scripts/k3s-workflow.sh [--dry-run] COMMAND

commands:
  all       build, import, install, wait, prompt, batch, verify, then print where to look
  build     build the otel-cuda image (docker; nerdctl or buildah when docker is absent)
  import    import the image into K3s's containerd (docker save | sudo k3s ctr images import -)
  install   helm upgrade --install the chart, self-contained (mode=sidecar, Collector, Jaeger, Prometheus, Grafana)
  wait      wait for the rollouts, the sidecar's /readyz and vLLM's /health
  prompt    one request through otel-cuda loadgen (OUT_DIR/single.json)
  batch     BATCH_N requests, BATCH_WORKERS in parallel (BATCH_MODE=sequential: one at a time) (OUT_DIR/batch.json)
  verify    otel-cuda verify the prompt and the batch against Jaeger (and the archive: S3 or the pod's volume)
  where     print where to look (Jaeger, Grafana, Prometheus, S3 / the archive)
  status    the release, its pods, services and recent events
  logs      the otel-cuda sidecar's and vLLM's logs (or one: logs otel-cuda|vllm|collector|jaeger|prometheus|grafana)
  destroy   helm uninstall and delete the namespace (KEEP_NAMESPACE=1 keeps it, and the model cache in it)
  help      this text

options:
  --dry-run, -n   print every command it would run, one per line prefixed "+ ", and run none (also DRY_RUN=1)

settings (environment; defaults in brackets):
  NAMESPACE          [llm]  Kubernetes namespace
  RELEASE            [otel-cuda]  Helm release name
  MODEL              [Qwen/Qwen2.5-0.5B-Instruct]  vllm.model, and the model loadgen asks for
  IMAGE_REPO         [otel-cuda]  image.repository of the sidecar image built here
  IMAGE_TAG          [chart appVersion-git commit]  image.tag; change it after editing the code, so pods restart
  IMAGE_PULL_POLICY  [Never]  image.pullPolicy (Never: the image imported into K3s; IfNotPresent for a registry)
  BUILDER            [auto]  docker, nerdctl or buildah
  VLLM_IMAGE         [the chart's]  vLLM image REPO:TAG (one with the OpenTelemetry packages, docs/troubleshooting.md)
  VLLM_GPUS          [1]  vllm.gpus
  VLLM_ARGS          []  extra `vllm serve` arguments, space-separated (vllm.extraArgs), e.g. "--max-model-len 4096"
  HF_TOKEN_SECRET    []  existing Secret with HF_TOKEN (vllm.hfToken.secretName)
  HF_TOKEN           []  without HF_TOKEN_SECRET: stored in Secret RELEASE-hf-token (through stdin, never argv)
  RUNTIME_CLASS      [nvidia]  runtimeClassName (K3s + NVIDIA Container Toolkit); empty for the default runtime
  MODEL_CACHE        [pvc]  pvc (vllm.modelCache on a claim of STORAGE_CLASS) or emptyDir
  STORAGE_CLASS      [local-path]  storage class of the model cache claim
  S3_BUCKET          []  seed: with UPLOAD_ENABLED, agent.archive.destination=s3://S3_BUCKET/S3_PREFIX
  S3_PREFIX          []  seed: key prefix in S3_BUCKET
  UPLOAD_ENABLED     [true]  seed: false keeps the archive on the pod's volume even with S3_BUCKET
  S3_SECRET          []  existing Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (agent.s3.existingSecret)
  AWS_ACCESS_KEY_ID  []  with AWS_SECRET_ACCESS_KEY and no S3_SECRET: stored in Secret RELEASE-s3 (stdin, never argv)
  S3_ENDPOINT        []  S3-compatible endpoint, e.g. MinIO (agent.s3.endpoint)
  S3_REGION          [$AWS_REGION]  agent.s3.region
  TRACE_INTERVAL     [chart: 60]  seed: seconds per archive file (agent.archive.rotateSeconds)
  TRACE_DIR          []  seed: a node directory for the archive and the S3 staging buffer
                            (agent.archive.volume hostPath), or s3://bucket/prefix (agent.archive.destination)
  TARGET_PROCESS     [chart: vllm|VLLM]  seed: regex of the command lines to trace (agent.match)
  HELM_VALUES        []  an extra values file (-f), for anything else in helm/otel-cuda/values.yaml
  WAIT_TIMEOUT       [30m]  how long vLLM may take to download and load the model
  PROMPT             [The GPU is]  the prompt of every request
  MAX_TOKENS         [64]  tokens per request
  BATCH_N            [32]  requests in the batch
  BATCH_WORKERS      [8]  requests in flight at once in the batch
  BATCH_MODE         [parallel]  parallel, or sequential (one at a time)
  STREAM             [0]  1: stream the responses (loadgen measures time to first token)
  VERIFY_TIMEOUT     [180]  seconds verify keeps looking for late spans and archive files
  VERIFY_ARCHIVE     [1]  0: check the traces only, not the archive
  VERIFY_S3_ENDPOINT [$S3_ENDPOINT]  S3 endpoint as reachable from this machine (verify runs here)
  VLLM_LOCAL_PORT    [8000]  local port of the vLLM port-forward
  JAEGER_LOCAL_PORT  [16686]  local port of the Jaeger port-forward
  OUT_DIR            [${TMPDIR:-/tmp}/otel-cuda-workflow/NAMESPACE-RELEASE]  loadgen results, copied archive, logs
  LOGS_TAIL          [200]  lines per container for `logs`
  KEEP_NAMESPACE     [0]  1: `destroy` uninstalls the release but keeps the namespace
EOF
}

say() { echo "$PROG: $*"; }
done_say() { [ "$DRY_RUN" = 1 ] || say "$@"; }  # a claim of success: not in a dry run
warn() { echo "$PROG: WARNING: $*" >&2; }
die() {
  echo "$PROG: FAILED: $1" >&2
  echo "$PROG: remedy: $2" >&2
  exit 1
}

# --- the command wrapper: everything external goes through these --------------------------------------------------
DRY_RUN=${DRY_RUN:-0}
case "$DRY_RUN" in 1|true|yes|on) DRY_RUN=1 ;; *) DRY_RUN=0 ;; esac

# An argument as the shell would need it typed: bare when safe, else single-quoted.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
quote_all() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(quote "$a")"; done
  printf '%s' "$out"
}
# `+ command`: on stdout in a dry run (the plan), on stderr otherwise (a trace that leaves captured output clean).
# fd 3 is the script's stdout, also inside $(...), where capture's own line must not be captured.
exec 3>&1
show() {
  if [ "$DRY_RUN" = 1 ]; then echo "+ $*" >&3; else echo "+ $*" >&2; fi
}
run() {
  show "$(quote_all "$@")"
  [ "$DRY_RUN" = 1 ] && return 0
  "$@"
}
# run, and on failure stop with a remedy: try REMEDY CMD...
try() {
  local remedy=$1 rc=0
  shift
  run "$@" || rc=$?
  [ "$rc" = 0 ] || die "$(quote_all "$@") exited $rc" "$remedy"
}
# A pipeline, given as the exact text it runs (built with quote_all): try_shell REMEDY TEXT.
try_shell() {
  local rc=0
  show "$2"
  [ "$DRY_RUN" = 1 ] && return 0
  bash -o pipefail -c "$2" || rc=$?
  [ "$rc" = 0 ] || die "$2 exited $rc" "$1"
}
# The output of a command; in a dry run the command is printed and PLACEHOLDER stands for its output.
capture() {
  local placeholder=$1
  shift
  show "$(quote_all "$@")"
  if [ "$DRY_RUN" = 1 ]; then printf '%s\n' "$placeholder"; return 0; fi
  "$@"
}

# Background port-forwards, stopped (by their pids) when the script exits.
PF_PIDS=()
declare -A PF_STARTED=()
cleanup() {
  local pid
  for pid in "${PF_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PF_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- settings ---------------------------------------------------------------------------------------------------
NAMESPACE=${NAMESPACE:-llm}
RELEASE=${RELEASE:-otel-cuda}
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
APP_VERSION=$(sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"]*\)"\{0,1\}[[:space:]]*$/\1/p' "$REPO/helm/otel-cuda/Chart.yaml")
APP_VERSION=${APP_VERSION:-0.1.0}
if [ -z "${IMAGE_TAG:-}" ]; then
  commit=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || true)
  IMAGE_TAG=$APP_VERSION${commit:+-$commit}
fi
IMAGE_REPO=${IMAGE_REPO:-otel-cuda}
IMAGE_PULL_POLICY=${IMAGE_PULL_POLICY:-Never}
IMAGE=$IMAGE_REPO:$IMAGE_TAG
BUILDER=${BUILDER:-auto}
VLLM_IMAGE=${VLLM_IMAGE:-}
VLLM_GPUS=${VLLM_GPUS:-1}
VLLM_ARGS=${VLLM_ARGS:-}
HF_TOKEN_SECRET=${HF_TOKEN_SECRET:-}
RUNTIME_CLASS=${RUNTIME_CLASS-nvidia}
MODEL_CACHE=${MODEL_CACHE:-pvc}
STORAGE_CLASS=${STORAGE_CLASS:-local-path}
S3_BUCKET=${S3_BUCKET:-}
S3_PREFIX=${S3_PREFIX:-}
UPLOAD_ENABLED=${UPLOAD_ENABLED:-true}
S3_SECRET=${S3_SECRET:-}
S3_ENDPOINT=${S3_ENDPOINT:-}
S3_REGION=${S3_REGION:-${AWS_REGION:-}}
TRACE_INTERVAL=${TRACE_INTERVAL:-}
TRACE_DIR=${TRACE_DIR:-}
TARGET_PROCESS=${TARGET_PROCESS:-}
HELM_VALUES=${HELM_VALUES:-}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-30m}
PROMPT=${PROMPT:-The GPU is}
MAX_TOKENS=${MAX_TOKENS:-64}
BATCH_N=${BATCH_N:-32}
BATCH_WORKERS=${BATCH_WORKERS:-8}
BATCH_MODE=${BATCH_MODE:-parallel}
STREAM=${STREAM:-0}
VERIFY_TIMEOUT=${VERIFY_TIMEOUT:-180}
VERIFY_ARCHIVE=${VERIFY_ARCHIVE:-1}
VERIFY_S3_ENDPOINT=${VERIFY_S3_ENDPOINT:-$S3_ENDPOINT}
VLLM_LOCAL_PORT=${VLLM_LOCAL_PORT:-8000}
JAEGER_LOCAL_PORT=${JAEGER_LOCAL_PORT:-16686}
OUT_DIR=${OUT_DIR:-${TMPDIR:-/tmp}/otel-cuda-workflow/$NAMESPACE-$RELEASE}
[[ "$OUT_DIR" == /* ]] || OUT_DIR=$PWD/$OUT_DIR
LOGS_TAIL=${LOGS_TAIL:-200}
KEEP_NAMESPACE=${KEEP_NAMESPACE:-0}

is_true() {  # is_true NAME VALUE — the sidecar's own reading of a boolean (otel_cuda/config.py)
  case "${2,,}" in
    1|true|yes|on) return 0 ;;
    0|false|no|off|"") return 1 ;;
    *) die "$1=$2 is not a boolean" "set $1 to true or false" ;;
  esac
}
positive_int() {
  if [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge 1 ]; then return 0; fi
  die "$1=$2 is not a whole number of at least 1" "set $1 to an integer, e.g. $1=$3"
}

# The chart's object names: <fullname>-<component>, fullname as in helm/otel-cuda/templates/_helpers.tpl.
if [[ "$RELEASE" == *"$CHART_NAME"* ]]; then FULLNAME=$RELEASE; else FULLNAME=$RELEASE-$CHART_NAME; fi
FULLNAME=${FULLNAME:0:63}
FULLNAME=${FULLNAME%-}
VLLM_DEPLOY=$FULLNAME-vllm
VLLM_SVC=$FULLNAME-vllm
VLLM_SVC_PORT=8000
JAEGER_SVC=$FULLNAME-jaeger
GRAFANA_SVC=$FULLNAME-grafana
PROMETHEUS_SVC=$FULLNAME-prometheus
AGENT_CONTAINER=otel-cuda
VLLM_CONTAINER=vllm
AGENT_HEALTH_PORT=8081
POD_ARCHIVE=/var/lib/otel-cuda/archive
INFERENCE_SELECTOR=app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=inference
HF_SECRET_CREATED=$RELEASE-hf-token
S3_SECRET_CREATED=$RELEASE-s3

SUDO=()
[ "$(id -u)" = 0 ] || SUDO=(sudo)

# Where the raw-event archive goes: the seed's S3_BUCKET/S3_PREFIX/UPLOAD_ENABLED first (as the sidecar reads
# them), then an s3:// TRACE_DIR; otherwise the pod's volume.
ARCHIVE_DEST=""
ARCHIVE_NODE_DIR=""
ROTATE_SECONDS=60
derive_archive() {
  local prefix
  if [ -n "$S3_BUCKET" ] && is_true UPLOAD_ENABLED "$UPLOAD_ENABLED"; then
    prefix=${S3_PREFIX#/}
    prefix=${prefix%/}
    ARCHIVE_DEST=s3://$S3_BUCKET${prefix:+/$prefix}
  elif [[ "$TRACE_DIR" == s3://* ]]; then
    ARCHIVE_DEST=$TRACE_DIR
  fi
  if [ -n "$TRACE_DIR" ] && [[ "$TRACE_DIR" != s3://* ]]; then
    [[ "$TRACE_DIR" == /* ]] || die "TRACE_DIR=$TRACE_DIR is not an absolute path" \
      "set TRACE_DIR to a directory of the node (e.g. /var/lib/otel-cuda) or to s3://bucket/prefix"
    ARCHIVE_NODE_DIR=$TRACE_DIR
  fi
  if [ -n "$TRACE_INTERVAL" ]; then
    positive_int TRACE_INTERVAL "$TRACE_INTERVAL" 60
    ROTATE_SECONDS=$TRACE_INTERVAL
  fi
}

# --set takes comma-separated key=value pairs: a comma or backslash in a value must be escaped.
set_escape() {
  local v=${1//\\/\\\\}
  printf '%s' "${v//,/\\,}"
}

# The chart's values, as helm arguments (HELM_ARGS).
helm_args() {
  HELM_ARGS=(
    # Self-contained: otel-cuda beside vLLM, and the Collector, Jaeger, Prometheus and Grafana of the chart.
    --set mode=sidecar
    --set vllm.enabled=true
    --set collector.enabled=true --set jaeger.enabled=true --set prometheus.enabled=true --set grafana.enabled=true
    --set-string "image.repository=$(set_escape "$IMAGE_REPO")"
    --set-string "image.tag=$(set_escape "$IMAGE_TAG")"
    --set-string "image.pullPolicy=$IMAGE_PULL_POLICY"
    --set-string "vllm.model=$(set_escape "$MODEL")"
    --set "vllm.gpus=$VLLM_GPUS"
  )
  [ -z "$RUNTIME_CLASS" ] || HELM_ARGS+=(--set-string "runtimeClassName=$(set_escape "$RUNTIME_CLASS")")
  case "$MODEL_CACHE" in
    pvc) HELM_ARGS+=(--set vllm.modelCache.type=persistentVolumeClaim
                     --set-string "vllm.modelCache.storageClassName=$(set_escape "$STORAGE_CLASS")") ;;
    emptyDir) HELM_ARGS+=(--set vllm.modelCache.type=emptyDir) ;;
  esac
  if [ -n "$VLLM_IMAGE" ]; then
    local repo=$VLLM_IMAGE tag=latest
    if [[ "${VLLM_IMAGE##*/}" == *:* ]]; then repo=${VLLM_IMAGE%:*}; tag=${VLLM_IMAGE##*:}; fi
    HELM_ARGS+=(--set-string "vllm.image.repository=$(set_escape "$repo")" --set-string "vllm.image.tag=$(set_escape "$tag")")
  fi
  if [ -n "$VLLM_ARGS" ]; then
    local i=0 arg args
    read -r -a args <<<"$VLLM_ARGS"
    for arg in "${args[@]}"; do
      HELM_ARGS+=(--set-string "vllm.extraArgs[$i]=$(set_escape "$arg")")
      i=$((i + 1))
    done
  fi
  if [ -n "$HF_TOKEN_SECRET" ]; then
    HELM_ARGS+=(--set-string "vllm.hfToken.secretName=$(set_escape "$HF_TOKEN_SECRET")")
  elif [ -n "${HF_TOKEN:-}" ]; then
    HELM_ARGS+=(--set-string "vllm.hfToken.secretName=$HF_SECRET_CREATED")
  fi
  # The seed's settings, where the chart has them.
  [ -z "$TARGET_PROCESS" ] || HELM_ARGS+=(--set-string "agent.match=$(set_escape "$TARGET_PROCESS")")
  [ -z "$TRACE_INTERVAL" ] || HELM_ARGS+=(--set "agent.archive.rotateSeconds=$TRACE_INTERVAL")
  [ -z "$ARCHIVE_DEST" ] || HELM_ARGS+=(--set-string "agent.archive.destination=$(set_escape "$ARCHIVE_DEST")")
  [ -z "$ARCHIVE_NODE_DIR" ] || HELM_ARGS+=(--set agent.archive.volume.type=hostPath
                                            --set-string "agent.archive.volume.hostPath=$(set_escape "$ARCHIVE_NODE_DIR")")
  if [ -n "$ARCHIVE_DEST" ]; then
    if [ -n "$S3_SECRET" ]; then
      HELM_ARGS+=(--set-string "agent.s3.existingSecret=$(set_escape "$S3_SECRET")")
    elif [ -n "${AWS_ACCESS_KEY_ID:-}" ] && [ -n "${AWS_SECRET_ACCESS_KEY:-}" ]; then
      HELM_ARGS+=(--set-string "agent.s3.existingSecret=$S3_SECRET_CREATED")
    fi
    [ -z "$S3_ENDPOINT" ] || HELM_ARGS+=(--set-string "agent.s3.endpoint=$(set_escape "$S3_ENDPOINT")")
    [ -z "$S3_REGION" ] || HELM_ARGS+=(--set-string "agent.s3.region=$(set_escape "$S3_REGION")")
  fi
  [ -z "$HELM_VALUES" ] || HELM_ARGS+=(-f "$HELM_VALUES")
}

validate_settings() {
  derive_archive
  case "$MODEL_CACHE" in pvc|emptyDir) ;; *) die "MODEL_CACHE=$MODEL_CACHE" "set MODEL_CACHE to pvc or emptyDir" ;; esac
  case "$BATCH_MODE" in parallel|sequential) ;; *) die "BATCH_MODE=$BATCH_MODE" "set BATCH_MODE to parallel or sequential" ;; esac
  case "$IMAGE_PULL_POLICY" in Never|IfNotPresent|Always) ;;
    *) die "IMAGE_PULL_POLICY=$IMAGE_PULL_POLICY" "set IMAGE_PULL_POLICY to Never, IfNotPresent or Always" ;; esac
  positive_int VLLM_GPUS "$VLLM_GPUS" 1
  positive_int BATCH_N "$BATCH_N" 32
  positive_int BATCH_WORKERS "$BATCH_WORKERS" 8
  positive_int MAX_TOKENS "$MAX_TOKENS" 64
  positive_int VERIFY_TIMEOUT "$VERIFY_TIMEOUT" 180
  [ -z "$HELM_VALUES" ] || [ -f "$HELM_VALUES" ] || [ "$DRY_RUN" = 1 ] || \
    die "HELM_VALUES=$HELM_VALUES does not exist" "point HELM_VALUES at a values file, or unset it"
}

# --- what the steps need on this machine --------------------------------------------------------------------------
need() {  # need TOOL REMEDY — only when commands really run
  [ "$DRY_RUN" = 1 ] || command -v "$1" >/dev/null 2>&1 || die "$1 not found" "$2"
}

pick_builder() {
  if [ "$BUILDER" = auto ]; then
    local b
    for b in docker nerdctl buildah; do
      if command -v "$b" >/dev/null 2>&1; then BUILDER=$b; return; fi
    done
    [ "$DRY_RUN" = 1 ] && { BUILDER=docker; return; }
    die "no image builder (docker, nerdctl, buildah) found" \
      "install Docker (apt-get install docker.io, or https://docs.docker.com/engine/install/), or buildah (apt-get install buildah)"
  fi
  case "$BUILDER" in docker|nerdctl|buildah) ;; *) die "BUILDER=$BUILDER" "set BUILDER to docker, nerdctl or buildah" ;; esac
  need "$BUILDER" "install $BUILDER, or set BUILDER to one that is installed (docker, nerdctl, buildah)"
}

need_helm() { need helm "install Helm 3.14+: curl -fsSL https://raw.githubusercontent.com/helm/helm/main/scripts/get-helm-3 | bash"; }

cluster_env() {  # K3s keeps its kubeconfig in /etc/rancher/k3s/k3s.yaml; kubectl finds it, helm does not.
  need kubectl "K3s installs kubectl (curl -sfL https://get.k3s.io | sh -); or ln -s \"\$(command -v k3s)\" /usr/local/bin/kubectl"
  if [ "$DRY_RUN" = 0 ] && [ -z "${KUBECONFIG:-}" ] && [ ! -e "${HOME:-/root}/.kube/config" ] && [ -e /etc/rancher/k3s/k3s.yaml ]; then
    [ -r /etc/rancher/k3s/k3s.yaml ] || die "/etc/rancher/k3s/k3s.yaml is not readable" \
      "run as root (sudo -E bash scripts/k3s-workflow.sh ...), or copy it: sudo install -m 600 -o \$USER /etc/rancher/k3s/k3s.yaml ~/.kube/config"
    export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
    say "KUBECONFIG=$KUBECONFIG (K3s)"
  fi
}

ensure_out_dir() {
  [ -n "${OUT_DIR_MADE:-}" ] && return 0
  run mkdir -p "$OUT_DIR"
  OUT_DIR_MADE=1
}

ensure_venv() {  # loadgen and verify run from the repository's venv
  [ -x "$REPO/$OTEL_CUDA" ] && return 0
  say "$OTEL_CUDA is missing: installing it with scripts/setup.sh"
  try "run it by hand to see why: sudo bash scripts/setup.sh (Debian/Ubuntu, as root)" bash scripts/setup.sh
  [ "$DRY_RUN" = 1 ] || [ -x "$REPO/$OTEL_CUDA" ] || die "$OTEL_CUDA still missing after scripts/setup.sh" \
    "read scripts/setup.sh's output; python3 -m venv .venv && .venv/bin/pip install -e . is enough for loadgen and verify"
}

# port_forward NAME SERVICE LOCAL REMOTE URL — forward, then wait until URL answers.
port_forward() {
  local name=$1 svc=$2 local_port=$3 remote_port=$4 url=$5
  [ -n "${PF_STARTED[$name]:-}" ] && return 0
  ensure_out_dir
  local pf=(kubectl -n "$NAMESPACE" port-forward "svc/$svc" "$local_port:$remote_port")
  show "$(quote_all "${pf[@]}") >$(quote "$OUT_DIR/port-forward-$name.log") 2>&1 &"
  if [ "$DRY_RUN" = 0 ]; then
    "${pf[@]}" >"$OUT_DIR/port-forward-$name.log" 2>&1 &
    PF_PIDS+=("$!")
  fi
  PF_STARTED[$name]=1
  try "kubectl -n $NAMESPACE get pods; see $OUT_DIR/port-forward-$name.log (local port $local_port taken? set ${name^^}_LOCAL_PORT)" \
    curl -fsS -o /dev/null --retry 30 --retry-delay 2 --retry-all-errors --max-time 10 "$url"
  if [ "$DRY_RUN" = 0 ] && ! kill -0 "${PF_PIDS[-1]}" 2>/dev/null; then
    warn "the port-forward to svc/$svc exited ($(tail -n 1 "$OUT_DIR/port-forward-$name.log" 2>/dev/null)); $url answers from another process." \
      "If that is not this release, set ${name^^}_LOCAL_PORT to a free port."
  fi
}
VLLM_URL=http://127.0.0.1:$VLLM_LOCAL_PORT
JAEGER_URL=http://127.0.0.1:$JAEGER_LOCAL_PORT
forward_vllm() { port_forward vllm "$VLLM_SVC" "$VLLM_LOCAL_PORT" "$VLLM_SVC_PORT" "$VLLM_URL/health"; }
forward_jaeger() { port_forward jaeger "$JAEGER_SVC" "$JAEGER_LOCAL_PORT" 16686 "$JAEGER_URL/"; }

# kubectl create secret, the data on stdin (never on a command line): apply_secret NAME KEY=ENVVAR...
apply_secret() {
  local name=$1 kv
  shift
  local create=(kubectl -n "$NAMESPACE" create secret generic "$name" --from-env-file=/dev/stdin --dry-run=client -o yaml)
  local apply=(kubectl -n "$NAMESPACE" apply -f -)
  local from=()
  for kv in "$@"; do from+=("${kv%%=*}=\$${kv#*=}"); done
  show "$(quote_all "${create[@]}") | $(quote_all "${apply[@]}")    # stdin: ${from[*]}"
  [ "$DRY_RUN" = 1 ] && return 0
  local rc=0
  {
    for kv in "$@"; do
      local var=${kv#*=}
      printf '%s=%s\n' "${kv%%=*}" "${!var}"
    done
  } | "${create[@]}" | "${apply[@]}" || rc=$?
  [ "$rc" = 0 ] || die "creating Secret $name exited $rc" "kubectl -n $NAMESPACE get secret $name; check the cluster is reachable (kubectl get nodes)"
}

# --- the steps ----------------------------------------------------------------------------------------------------
step_build() {
  pick_builder
  local remedy="the builder's message says why; the Docker daemon running? (systemctl start docker); or BUILDER=nerdctl|buildah"
  case "$BUILDER" in
    docker) try "$remedy" docker build --build-arg "VERSION=$APP_VERSION" -t "$IMAGE" . ;;
    nerdctl) try "$remedy (nerdctl build needs buildkitd running)" \
               nerdctl build --build-arg "VERSION=$APP_VERSION" -t "$IMAGE" . ;;
    buildah) try "$remedy" buildah bud --build-arg "VERSION=$APP_VERSION" -t "$IMAGE" . ;;
  esac
  done_say "built $IMAGE with $BUILDER"
}

step_import() {
  pick_builder
  need k3s "run this on the K3s node (curl -sfL https://get.k3s.io | sh -); on other clusters push the image to a registry and set IMAGE_REPO=REGISTRY/otel-cuda IMAGE_PULL_POLICY=IfNotPresent"
  local remedy="build first (scripts/k3s-workflow.sh build); k3s ctr needs root (sudo) on the K3s node; is K3s running? (systemctl status k3s)"
  local import=("${SUDO[@]}" k3s ctr images import)
  case "$BUILDER" in
    docker|nerdctl) try_shell "$remedy" "$(quote_all "$BUILDER" save "$IMAGE") | $(quote_all "${import[@]}" -)" ;;
    buildah)
      ensure_out_dir
      local tar=$OUT_DIR/otel-cuda-image.tar
      try "$remedy" buildah push "$IMAGE" "docker-archive:$tar:$IMAGE"
      try "$remedy" "${import[@]}" "$tar"
      ;;
  esac
  done_say "imported $IMAGE into K3s (as docker.io/library/$IMAGE when IMAGE_REPO has no registry)"
}

step_install() {
  cluster_env
  need_helm
  try "is K3s running? (sudo systemctl status k3s); export KUBECONFIG=/etc/rancher/k3s/k3s.yaml (as root, or a readable copy)" \
    kubectl get nodes -o wide
  local gpus total=0 n
  gpus=$(capture "$VLLM_GPUS" kubectl get nodes -o 'jsonpath={range .items[*]}{.status.allocatable.nvidia\.com/gpu}{" "}{end}') || \
    die "kubectl get nodes failed" "is K3s running? (sudo systemctl status k3s)"
  for n in $gpus; do [[ "$n" =~ ^[0-9]+$ ]] && total=$((total + n)); done
  [ "$total" -ge "$VLLM_GPUS" ] || die "the cluster offers $total allocatable nvidia.com/gpu, vLLM asks for $VLLM_GPUS" \
    "install the NVIDIA driver, the NVIDIA Container Toolkit and the device plugin (docs/kubernetes.md, steps 2-5); kubectl describe node | grep nvidia.com/gpu"
  if [ -n "$RUNTIME_CLASS" ]; then
    try "create the RuntimeClass (docs/kubernetes.md, step 4: kind RuntimeClass, name $RUNTIME_CLASS, handler nvidia), or RUNTIME_CLASS= when nvidia is containerd's default runtime" \
      kubectl get runtimeclass "$RUNTIME_CLASS"
  fi
  local ns_remedy="kubectl get nodes: is the cluster reachable?"
  try_shell "$ns_remedy" "$(quote_all kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml) | $(quote_all kubectl apply -f -)"
  if [ -z "$HF_TOKEN_SECRET" ] && [ -n "${HF_TOKEN:-}" ]; then
    apply_secret "$HF_SECRET_CREATED" HF_TOKEN=HF_TOKEN
  fi
  if [ -n "$ARCHIVE_DEST" ] && [ -z "$S3_SECRET" ] && [ -n "${AWS_ACCESS_KEY_ID:-}" ] && [ -n "${AWS_SECRET_ACCESS_KEY:-}" ]; then
    apply_secret "$S3_SECRET_CREATED" AWS_ACCESS_KEY_ID=AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=AWS_SECRET_ACCESS_KEY
  fi
  if [ -n "$ARCHIVE_DEST" ] && [ -z "$S3_SECRET" ] && [ -z "${AWS_ACCESS_KEY_ID:-}" ]; then
    warn "the archive goes to $ARCHIVE_DEST with no keys given (S3_SECRET, or AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY): the sidecar will try the node's instance profile / pod identity"
  fi
  helm_args
  try "helm's message names the value at fault (helm/otel-cuda/values.yaml documents each); render it here: helm template $RELEASE $CHART with the same --set arguments" \
    helm upgrade --install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --create-namespace "${HELM_ARGS[@]}"
}

step_wait() {
  cluster_env
  local c
  for c in collector jaeger prometheus grafana; do
    try "kubectl -n $NAMESPACE describe deploy/$FULLNAME-$c; kubectl -n $NAMESPACE logs deploy/$FULLNAME-$c (image pulls need the internet)" \
      kubectl -n "$NAMESPACE" rollout status "deploy/$FULLNAME-$c" --timeout=10m
  done
  try "kubectl -n $NAMESPACE describe pod -l $INFERENCE_SELECTOR (Pending: no free nvidia.com/gpu or wrong RuntimeClass; Init: the otel-cuda sidecar failing, see logs otel-cuda); scripts/k3s-workflow.sh logs vllm (model download, HF_TOKEN for gated models, out of GPU memory: VLLM_ARGS=\"--max-model-len 4096\"; 'OpenTelemetry is not available': VLLM_IMAGE with the OpenTelemetry packages, docs/troubleshooting.md); a slow download: WAIT_TIMEOUT=60m" \
    kubectl -n "$NAMESPACE" rollout status "deploy/$VLLM_DEPLOY" "--timeout=$WAIT_TIMEOUT"
  # The sidecar is ready when its BPF program is loaded (/readyz); in sidecar mode that is not the pod's readiness.
  try "the sidecar has not loaded its probes: scripts/k3s-workflow.sh logs otel-cuda; kubectl -n $NAMESPACE exec deploy/$VLLM_DEPLOY -c $AGENT_CONTAINER -- otel-cuda doctor; docs/troubleshooting.md (kernel headers, capabilities)" \
    kubectl -n "$NAMESPACE" exec "deploy/$VLLM_DEPLOY" -c "$AGENT_CONTAINER" -- python3 -c \
    "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:$AGENT_HEALTH_PORT/readyz', timeout=10).status != 200)"
  forward_vllm
  done_say "vLLM is serving $MODEL at $VLLM_URL (port-forward) with otel-cuda tracing it"
}

loadgen_args() {
  LOADGEN=("$OTEL_CUDA" loadgen --url "$VLLM_URL" --model "$MODEL" --prompt "$PROMPT" --max-tokens "$MAX_TOKENS")
  [ "$STREAM" != 1 ] || LOADGEN+=(--stream)
}

step_prompt() {
  cluster_env
  ensure_venv
  ensure_out_dir
  forward_vllm
  loadgen_args
  try "scripts/k3s-workflow.sh wait (is vLLM up?); the error above is the server's answer; MODEL must be the served model" \
    "${LOADGEN[@]}" -n 1 --workers 1 --out "$OUT_DIR/single.json"
}

step_batch() {
  cluster_env
  ensure_venv
  ensure_out_dir
  forward_vllm
  loadgen_args
  local workers=$BATCH_WORKERS
  [ "$BATCH_MODE" = parallel ] || workers=1
  try "scripts/k3s-workflow.sh logs vllm (overloaded or out of memory? fewer BATCH_WORKERS); failed requests are listed in $OUT_DIR/batch.json" \
    "${LOADGEN[@]}" -n "$BATCH_N" --workers "$workers" --out "$OUT_DIR/batch.json"
}

VERIFY_FAILED_REMEDY="traces incomplete: scripts/k3s-workflow.sh logs otel-cuda (probes attached to the EngineCore? spans received and joined?) and logs vllm (its --otlp-traces-endpoint, OpenTelemetry available?); docs/troubleshooting.md \"Traced, but nothing in Jaeger\"; late spans: run verify again, or VERIFY_TIMEOUT=600"

# Returns non-zero (after saying what is missing and the remedy) rather than stopping, so that `all` still prints
# where to look.
step_verify() {
  cluster_env
  ensure_venv
  local f
  if [ "$DRY_RUN" = 0 ]; then
    for f in single batch; do
      [ -f "$OUT_DIR/$f.json" ] || die "$OUT_DIR/$f.json is missing" "run scripts/k3s-workflow.sh prompt and batch first (same OUT_DIR, NAMESPACE, RELEASE)"
    done
  fi
  forward_jaeger
  local failed=0 s3_archive=()
  if [ -n "$ARCHIVE_DEST" ] && [ "$VERIFY_ARCHIVE" = 1 ]; then
    if [[ "$VERIFY_S3_ENDPOINT" == *.svc* ]] || [[ "$VERIFY_S3_ENDPOINT" == *.cluster.local* ]]; then
      warn "not checking $ARCHIVE_DEST from here: $VERIFY_S3_ENDPOINT is a cluster address; set VERIFY_S3_ENDPOINT to one this machine reaches (or VERIFY_ARCHIVE=0)"
    else
      # verify reads S3 here, with this machine's AWS credentials (AWS_* variables, ~/.aws); files appear there
      # once rotated (every $ROTATE_SECONDS s) and uploaded.
      s3_archive=(--archive "$ARCHIVE_DEST")
      [ -z "$VERIFY_S3_ENDPOINT" ] || s3_archive+=(--endpoint-url "$VERIFY_S3_ENDPOINT")
    fi
  fi
  local timeout=$VERIFY_TIMEOUT
  [ "${#s3_archive[@]}" = 0 ] || [ "$timeout" -ge $((ROTATE_SECONDS + 90)) ] || timeout=$((ROTATE_SECONDS + 90))
  run "$OTEL_CUDA" verify "$OUT_DIR/single.json" --jaeger "$JAEGER_URL" --timeout "$VERIFY_TIMEOUT" || failed=1
  run "$OTEL_CUDA" verify "$OUT_DIR/batch.json" --jaeger "$JAEGER_URL" --timeout "$timeout" "${s3_archive[@]}" || failed=1
  if [ -z "$ARCHIVE_DEST" ] && [ "$VERIFY_ARCHIVE" = 1 ] && [ "$failed" = 0 ]; then
    # The archive is on the pod's volume: a file is complete once rotated; wait for that, copy, check.
    say "waiting $((ROTATE_SECONDS + 15)) s for the archive file of the batch to rotate (TRACE_INTERVAL=$ROTATE_SECONDS)"
    run sleep $((ROTATE_SECONDS + 15))
    local pod
    pod=$(capture '<vllm-pod>' kubectl -n "$NAMESPACE" get pod -l "$INFERENCE_SELECTOR" \
      --field-selector=status.phase=Running -o 'jsonpath={.items[0].metadata.name}') || pod=""
    [ -n "$pod" ] || die "no running vLLM pod" "scripts/k3s-workflow.sh status"
    run rm -rf "$OUT_DIR/archive"
    try "kubectl cp needs tar in the otel-cuda image (Debian has it); scripts/k3s-workflow.sh logs otel-cuda (archive errors?)" \
      kubectl -n "$NAMESPACE" cp -c "$AGENT_CONTAINER" "$pod:$POD_ARCHIVE" "$OUT_DIR/archive"
    run "$OTEL_CUDA" verify "$OUT_DIR/batch.json" --jaeger "$JAEGER_URL" --timeout 30 --archive "$OUT_DIR/archive" || failed=1
  fi
  if [ "$failed" = 1 ]; then
    echo "$PROG: FAILED: otel-cuda verify found incomplete traces or no archive (lines above)" >&2
    echo "$PROG: remedy: $VERIFY_FAILED_REMEDY" >&2
    return 1
  fi
  done_say "verified: every request of the prompt and the batch is a trace with its CUDA children${ARCHIVE_DEST:+, archived to $ARCHIVE_DEST}"
}

step_where() {
  local trace="<trace id in $OUT_DIR/single.json>"
  if [ "$DRY_RUN" = 0 ] && [ -f "$OUT_DIR/single.json" ] && [ -x "$REPO/.venv/bin/python" ]; then
    trace=$("$REPO/.venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["requests"][0]["trace_id"])' \
      "$OUT_DIR/single.json" 2>/dev/null || echo "$trace")
  fi
  local ns=$NAMESPACE
  cat <<EOF
$PROG: where to look
  Jaeger:     kubectl -n $ns port-forward svc/$JAEGER_SVC 16686:16686, then http://127.0.0.1:16686
              service vllm, operation llm_request: children cuda.prefill and cuda.decode, links to cuda.step
              the prompt's trace: http://127.0.0.1:16686/trace/$trace
  Grafana:    kubectl -n $ns port-forward svc/$GRAFANA_SVC 3000:3000, then http://127.0.0.1:3000
              dashboard "otel-cuda: CUDA inside vLLM"; admin password:
              kubectl -n $ns get secret $GRAFANA_SVC -o jsonpath='{.data.admin-password}' | base64 -d
  Prometheus: kubectl -n $ns port-forward svc/$PROMETHEUS_SVC 9090:9090, then http://127.0.0.1:9090 (cuda_api_calls_total)
EOF
  if [ -n "$ARCHIVE_DEST" ]; then
    cat <<EOF
  S3:         $ARCHIVE_DEST (raw events, one JSONL.gz per $ROTATE_SECONDS s)
              aws s3 ls --recursive $ARCHIVE_DEST/${S3_ENDPOINT:+ --endpoint-url $S3_ENDPOINT}
              $OTEL_CUDA analyze $ARCHIVE_DEST
EOF
  else
    cat <<EOF
  S3:         not configured (S3_BUCKET unset or UPLOAD_ENABLED=false); raw events stay on the pod's volume:
              kubectl -n $ns exec deploy/$VLLM_DEPLOY -c $AGENT_CONTAINER -- otel-cuda analyze $POD_ARCHIVE
              copied here by verify: $OTEL_CUDA analyze $OUT_DIR/archive
EOF
  fi
  cat <<EOF
  Results:    $OUT_DIR/single.json, $OUT_DIR/batch.json (latencies, tokens/s, trace ids)
  Logs:       scripts/k3s-workflow.sh logs; status: scripts/k3s-workflow.sh status
EOF
}

step_status() {
  cluster_env
  need_helm
  try "is the release installed? helm -n $NAMESPACE list; install it: scripts/k3s-workflow.sh install" \
    helm -n "$NAMESPACE" status "$RELEASE"
  try "kubectl get nodes: is the cluster reachable?" \
    kubectl -n "$NAMESPACE" get deploy,pods,svc,pvc -l "app.kubernetes.io/instance=$RELEASE" -o wide
  try "kubectl get nodes: is the cluster reachable?" \
    kubectl -n "$NAMESPACE" get events --sort-by=.lastTimestamp
}

step_logs() {
  cluster_env
  local which=${1:-}
  local remedy="scripts/k3s-workflow.sh status (is the pod running?); a crashed container: add --previous to the kubectl logs command above"
  case "$which" in
    "")
      try "$remedy" kubectl -n "$NAMESPACE" logs "deploy/$VLLM_DEPLOY" -c "$AGENT_CONTAINER" "--tail=$LOGS_TAIL"
      try "$remedy" kubectl -n "$NAMESPACE" logs "deploy/$VLLM_DEPLOY" -c "$VLLM_CONTAINER" "--tail=$LOGS_TAIL"
      ;;
    otel-cuda|sidecar) try "$remedy" kubectl -n "$NAMESPACE" logs "deploy/$VLLM_DEPLOY" -c "$AGENT_CONTAINER" "--tail=$LOGS_TAIL" ;;
    vllm) try "$remedy" kubectl -n "$NAMESPACE" logs "deploy/$VLLM_DEPLOY" -c "$VLLM_CONTAINER" "--tail=$LOGS_TAIL" ;;
    collector|jaeger|prometheus|grafana) try "$remedy" kubectl -n "$NAMESPACE" logs "deploy/$FULLNAME-$which" "--tail=$LOGS_TAIL" ;;
    *) die "logs $which: no such component" "logs [otel-cuda|vllm|collector|jaeger|prometheus|grafana]" ;;
  esac
}

step_destroy() {
  cluster_env
  need_helm
  try "helm -n $NAMESPACE list; a stuck release: helm -n $NAMESPACE uninstall $RELEASE --no-hooks" \
    helm -n "$NAMESPACE" uninstall "$RELEASE" --ignore-not-found --wait
  if is_true KEEP_NAMESPACE "$KEEP_NAMESPACE"; then
    say "kept namespace $NAMESPACE (the model cache claim $FULLNAME-model-cache and Secrets stay)"
  else
    try "kubectl get namespace $NAMESPACE -o yaml (finalizers?)" \
      kubectl delete namespace "$NAMESPACE" --ignore-not-found --wait=true --timeout=5m
  fi
  say "the image stays in K3s: ${SUDO[*]:+${SUDO[*]} }k3s ctr images rm docker.io/library/$IMAGE"
}

step_all() {
  step_build
  step_import
  step_install
  step_wait
  step_prompt
  step_batch
  local ok=1
  step_verify || ok=0
  step_where
  [ "$ok" = 1 ] || exit 1
  [ "$DRY_RUN" = 0 ] || say "dry run: done; nothing was run"
  done_say "OK: built, deployed, traced and verified"
}

# --- main ---------------------------------------------------------------------------------------------------------
main() {
  local sub="" extra=() a
  for a in "$@"; do
    case "$a" in
      --dry-run|-n) DRY_RUN=1 ;;
      -h|--help) usage; exit 0 ;;
      -*) echo "$PROG: unknown option $a" >&2; usage >&2; exit 2 ;;
      *) if [ -z "$sub" ]; then sub=$a; else extra+=("$a"); fi ;;
    esac
  done
  [ -n "$sub" ] || { usage >&2; exit 2; }
  case "$sub" in
    logs) [ "${#extra[@]}" -le 1 ] || { usage >&2; exit 2; } ;;
    *) [ "${#extra[@]}" = 0 ] || { echo "$PROG: $sub takes no arguments (${extra[*]})" >&2; usage >&2; exit 2; } ;;
  esac
  [ "$DRY_RUN" = 0 ] || say "dry run: printing the commands, running none"
  cd "$REPO"
  case "$sub" in
    help) usage; exit 0 ;;
    all|build|import|install|wait|prompt|batch|verify|where|status|logs|destroy) ;;
    *) echo "$PROG: unknown command $sub" >&2; usage >&2; exit 2 ;;
  esac
  validate_settings
  case "$sub" in
    all) step_all ;;
    build) step_build ;;
    import) step_import ;;
    install) step_install ;;
    wait) step_wait ;;
    prompt) step_prompt ;;
    batch) step_batch ;;
    verify) step_verify || exit 1 ;;
    where) step_where ;;
    status) step_status ;;
    logs) step_logs "${extra[@]}" ;;
    destroy) step_destroy ;;
  esac
}

main "$@"
