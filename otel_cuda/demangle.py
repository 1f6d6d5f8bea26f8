"""Mangled C++ kernel names -> the names people read, as CUPTI and torch.profiler show them.

Kernel names reach us mangled (`_ZN4vllm15rms_norm_kernelEPfPKfS2_fii`): readable() gives
`vllm::rms_norm_kernel(float*, float const*, float const*, float, int, int)` through the C++ runtime's own
demangler (abi::__cxa_demangle, via the cxxfilt package). Names that are not mangled (`flash_fwd_kernel`, Triton's)
and names the demangler refuses come back unchanged: never an invented name. Spans, metrics, analyze and the
timeline show readable names; the archive keeps the mangled one too.
"""

from __future__ import annotations

from functools import lru_cache

import cxxfilt


@lru_cache(maxsize=1 << 16)  # a process has a few thousand kernels; each is demangled once
def readable(name: str | None) -> str | None:
    if not name or not name.startswith("_Z"):
        return name
    try:
        return cxxfilt.demangle(name)
    except (cxxfilt.InvalidName, UnicodeDecodeError):
        return name
