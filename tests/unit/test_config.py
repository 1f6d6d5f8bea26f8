"""Settings: flag > OTEL_CUDA_* > the seeds' aliases > default; bad values are one clear error."""

import argparse

import pytest

from otel_cuda import config as cfg
from otel_cuda.metrics import OTHER, TopK


def args(**kw):
    ns = argparse.Namespace(**{o.name: None for o in cfg.OPTIONS})
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_flag_beats_env_beats_default():
    env = {"OTEL_CUDA_MATCH": "from-env", "OTEL_CUDA_TOP_K": "5"}
    s = cfg.resolve(args(match="from-flag"), env=env)
    assert s.selector.match == "from-flag" and s.options["top_k"] == 5
    s = cfg.resolve(args(), env=env)
    assert s.selector.match == "from-env" and s.options["metrics_address"] == "0.0.0.0:9464"


def test_seed_environment_names_are_aliases():
    env = {"TARGET_PROCESS": "python.*vllm", "S3_BUCKET": "traces", "S3_PREFIX": "/gpu-traces/", "TRACE_INTERVAL": "120"}
    s = cfg.resolve(args(), env=env)
    assert s.selector.match == "python.*vllm"
    assert s.archive == "s3://traces/gpu-traces" and s.options["archive_rotate_seconds"] == 120.0
    assert cfg.resolve(args(), env={**env, "UPLOAD_ENABLED": "false"}).archive == "otel-cuda-archive"
    assert cfg.resolve(args(), env={"TARGET_PROCESS": "x", "TRACE_DIR": "/traces"}).archive == "/traces"
    assert cfg.resolve(args(archive="/mine"), env=env).archive == "/mine", "a flag beats the seeds' variables"


@pytest.mark.parametrize("kw, env, message", [
    ({}, {}, "no target"),
    ({"match": "("}, {}, "invalid --match regex"),
    ({"match": "x", "ringbuf_pages": "3"}, {}, "power of two"),
    ({"match": "x"}, {"OTEL_CUDA_TOP_K": "many"}, "OTEL_CUDA_TOP_K"),
    ({"pid": "12,abc"}, {}, "not a list of process ids"),
])
def test_bad_settings_are_one_clear_error(kw, env, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.resolve(args(**kw), env=env)


def test_top_k_names_keep_every_series_monotonic():
    top = TopK(2)
    for name, n in (("a", 5), ("b", 3), ("c", 1)):
        for _ in range(n):
            top.add((1, "kernel", name))
    first = dict(top.observe())
    assert first == {(1, "kernel", "a"): 5, (1, "kernel", "b"): 3, (1, "kernel", OTHER): 1}
    for _ in range(10):
        top.add((1, "kernel", "c"))  # c overtakes, but the places are taken: it stays in `other`
    top.add((1, "kernel", "a"))
    for _ in range(4):
        top.add((2, "kernel", "a"))  # a second process: its `other` was never exported, a counts whole
    second = dict(top.observe())
    assert second[(1, "kernel", "a")] == 6 and second[(1, "kernel", OTHER)] == 11
    assert second[(2, "kernel", "a")] == 4
    assert all(second[k] >= v for k, v in first.items()), "no counter falls"
    assert sum(second.values()) == 24
