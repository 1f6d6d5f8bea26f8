"""Kernel names as people read them: demangled where they are mangled, the mangled one kept beside it."""

import io
import json

from otel_cuda.analyze import analyze
from otel_cuda.demangle import readable
from otel_cuda.events import EV_LAUNCH, Event
from otel_cuda.records import launch_line
from otel_cuda.spans import call_attributes
from otel_cuda.timeline import write_trace
from tests.support.trace_samples import call

MANGLED = "_ZN4vllm15rms_norm_kernelEPfPKfS2_fii"
READABLE = "vllm::rms_norm_kernel(float*, float const*, float const*, float, int, int)"


def test_readable_names():
    assert readable(MANGLED) == READABLE
    assert readable("_ZN2at6native29vectorized_elementwise_kernelILi4ENS0_11FillFunctorIfEENS_6detail5ArrayIPcLi1EEEEEviT0_T1_") == (
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
        "at::detail::Array<char*, 1> >(int, at::native::FillFunctor<float>, at::detail::Array<char*, 1>)")
    assert readable("triton_poi_fused_add_0") == "triton_poi_fused_add_0"  # not mangled: as it is
    assert readable("_Zbroken") == "_Zbroken"  # the demangler refuses it: never an invented name
    assert readable(None) is None and readable("unknown") == "unknown"


def test_spans_analyze_and_timeline_show_the_readable_name():
    ev = Event(EV_LAUNCH, 0, 0, 1, 7, 7, 1000, 0, -1, (0x10, 1, 1, 1, 1, 1, 1, 0, 0))
    attrs = call_attributes(ev, MANGLED)
    assert attrs["cuda.kernel.name"] == READABLE and attrs["cuda.kernel.mangled_name"] == MANGLED
    assert "cuda.kernel.mangled_name" not in call_attributes(ev, "flash_fwd_kernel")
    records = [call(1000 + i, "cuLaunchKernel", kernel=MANGLED, function="0x10") for i in range(3)]
    assert analyze(records)["kernels"]["rows"][0]["kernel"] == READABLE
    out = io.StringIO()
    write_trace(records, out)
    events = [e for e in json.loads(out.getvalue())["traceEvents"] if e.get("args", {}).get("kernel")]
    assert {e["name"] for e in events} == {READABLE} and {e["args"]["kernel"] for e in events} == {MANGLED}


def test_the_archive_keeps_both_names():
    ev = Event(EV_LAUNCH, 0, 0, 1, 7, 7, 1000, 0, -1, (0x10, 5, 1, 1, 1, 1, 1, 1, 0))
    line = json.loads(launch_line(ev, 0, MANGLED, 3))
    assert (line["kernel"], line["kernel_demangled"]) == (MANGLED, READABLE)
    assert "kernel_demangled" not in json.loads(launch_line(ev, 0, "flash_fwd_kernel", 3))
