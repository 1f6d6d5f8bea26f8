# syntax=docker/dockerfile:1
# The otel-cuda sidecar: Python + BCC on Debian 12.
#   docker build -t ghcr.io/otel-cuda/otel-cuda:0.1.0 .
# BCC compiles the probes at start with its embedded clang (libbpfcc -> libclang-cpp, libllvm) against the
# node's kernel headers, which the chart mounts read-only (/lib/modules, /usr/src): no compiler and no headers
# are in the image. Debian 12's python3 (3.11) is the one BCC's python3-bpfcc binds to.

ARG DEBIAN_RELEASE=bookworm

# --- build: the package and its Python dependencies in a venv --------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# --system-site-packages: the venv sees Debian's bcc module (python3-bpfcc), which pip cannot install.
RUN python3 -m venv --system-site-packages /opt/otel-cuda/venv
WORKDIR /opt/otel-cuda/src
# README.md / LICENSE when present (a wildcard that matches nothing is skipped; pyproject.toml always matches).
COPY pyproject.toml README.m[d] LICENS[E] ./
COPY otel_cuda ./otel_cuda
COPY bpf ./bpf
# Editable, so that the BPF sources in bpf/ stay beside the package, where it finds them.
RUN /opt/otel-cuda/venv/bin/pip install --no-cache-dir --disable-pip-version-check -e . \
 && find /opt/otel-cuda -name '__pycache__' -prune -exec rm -rf {} +

# --- runtime ----------------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="otel-cuda" \
      org.opencontainers.image.description="eBPF tracing of the CUDA driver API as OpenTelemetry metrics and spans" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# python3-bpfcc pulls libbpfcc (with its clang/LLVM libraries) and nothing that compiles; bpfcc-tools is left out.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-bpfcc ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/otel-cuda /opt/otel-cuda
# A non-root user for what needs no BPF (otel-cuda analyze / timeline / replay of an archive): `--user 10001`.
# Tracing runs as uid 0 with every capability dropped but BPF, PERFMON, SYS_PTRACE and SYS_RESOURCE (the chart's
# default): Kubernetes grants added capabilities to a non-root user only through file capabilities, which
# allowPrivilegeEscalation=false (no_new_privs) disables, so "non-root + capabilities" would need privilege
# escalation allowed, a worse trade than root without capabilities.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/otel-cuda --shell /usr/sbin/nologin otel-cuda \
 && mkdir -p /var/lib/otel-cuda/archive /var/lib/otel-cuda/buffer \
 && chown -R 10001:10001 /var/lib/otel-cuda
ENV PATH=/opt/otel-cuda/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/otel-cuda
# OTLP receiver (gRPC, HTTP), Prometheus /metrics, /healthz + /readyz.
EXPOSE 4317 4318 9464 8081
ENTRYPOINT ["otel-cuda"]
CMD ["run"]
