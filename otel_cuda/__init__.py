"""otel-cuda: CUDA driver calls caught by eBPF uprobes, as OpenTelemetry joined to the server's request traces."""

__version__ = "0.1.0"
