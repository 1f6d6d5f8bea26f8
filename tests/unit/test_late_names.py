"""Names for handles loaded before attach, read from the driver's objects (otel_cuda/late_names.py), no root.

The memory is a dict of address -> bytes; the first tests use objects dumped from NVIDIA 580.159.04 on an H200
(bench/gpu/late_attach.py), so the layouts are checked against the real driver's bytes, not only the fake's."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from otel_cuda import events, probes
from otel_cuda.events import Event
from otel_cuda.late_names import DRIVER_LAYOUTS, Check, Layout, LateNames, ProcessMemory, valid_name
from otel_cuda.names import KernelNames

F = {p.symbol: p.func_id for p in probes.PROBES}
PID = 4242

# (kind, handle, name pointer, name, the object's first 64 bytes) as read on the H200 (late-attach-h200.json)
H200 = [
    ("CUkernel", 0x360AB190, 0x3609F651, "nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT",
     "020000000000000051f609360000000010a00b3600000000a8000000a8000000"
     "0000000000000000000000000000000000000000000000000000000000000000"),
    ("CUkernel", 0x30373250, 0x7F019C81194E,
     "_ZN2at6native18elementwise_kernelILi128ELi4EZNS0_22gpu_kernel_impl_nocastINS0_13BinaryFunctorIN3c108BFloat16ES5_"
     "S5_NS0_15binary_internal10MulFunctorIfEEEEEEvRNS_18TensorIteratorBaseERKT_EUliE_EEviT1_",
     "02000000000000004e19819c017f0000e02a1a30000000001200000012000000"
     "8000000001000000010000000000000000000000000000000000000000000000"),
    ("CUfunction", 0x34C7B750, 0x34EDB0F8, "rmsnorm_kernel",  # Triton
     "0100000001000000f8b0ed34000000000d000000000000000100000000000000"
     "f0b2d23400000000800000000000000000000000000000008008000080080000"),
    ("CUfunction", 0x3BFE8240, 0x3C6A47E3, "oc_probe_short",  # cuModuleGetFunction
     "0100000001000000e3476a3c000000000c000000000000000300000000000000"
     "b0cffd3b00000000800000000000000000000000000000000001000000010000"),
    ("CUkernel", 0x3C6674D0, 0x3BE57F95, "oc_lib_kernel_a",  # cuLibraryGetKernel
     "0200000000000000957fe53b000000006056d63b000000000400000010000000"
     "0000000000000000000000000000000000000000000000000000000000000000"),
    ("CUfunction", 0x3BFD8B40, 0x3BE57F95, "oc_lib_kernel_a",  # its cuKernelGetFunction: the same string
     "0100000001000000957fe53b000000000a000000000000000200000000000000"
     "e053063c00000000800000000000000000000000000000000001000000010000"),
]


class Memory:
    """address -> bytes; reads outside any block fail like /proc/PID/mem (EIO); counts reads."""

    def __init__(self):
        self.blocks: dict[int, bytes] = {}
        self.reads = 0

    def put(self, addr: int, data: bytes) -> None:
        self.blocks[addr] = data

    def __call__(self, pid: int, addr: int, size: int) -> bytes:
        self.reads += 1
        for base, data in self.blocks.items():
            if base <= addr < base + len(data):
                return data[addr - base:addr - base + size]
        raise OSError(5, "Input/output error")


def h200_memory() -> Memory:
    mem = Memory()
    for _, handle, ptr, name, obj in H200:
        mem.put(handle, bytes.fromhex(obj) + bytes(64))
        mem.put(ptr, name.encode() + b"\0")
    return mem


def obj(type_word: int, name_ptr: int, size: int = 64, at: int = 8) -> bytes:
    b = bytearray(size)
    struct.pack_into("<Q", b, 0, type_word)
    struct.pack_into("<Q", b, at, name_ptr)
    return bytes(b)


FUNCTION, KERNEL = 0x1_0000_0001, 0x2


# ---- the measured layouts on the real driver's bytes ---------------------------------------------------------------

def test_the_measured_layouts_name_every_object_dumped_from_the_real_driver():
    late = LateNames(h200_memory())
    for kind, handle, _, name, _ in H200:
        assert late.resolve(PID, handle) == name, kind
    assert late.counters == {"read": len(H200)}


def test_each_real_object_passes_exactly_the_layout_of_its_kind():
    mem = h200_memory()
    for kind, handle, _, name, _ in H200:
        passed = [lay.kind for lay in DRIVER_LAYOUTS
                  if all(struct.unpack_from("<I" if c.size == 4 else "<Q", mem(PID, handle, 64), c.offset)[0] == c.value
                         for c in lay.checks)]
        assert passed == [kind]


# ---- what is read, what is refused ---------------------------------------------------------------------------------

def test_a_name_is_read_once_per_handle_and_cached():
    mem = Memory()
    mem.put(0x50000, obj(FUNCTION, 0x60000))
    mem.put(0x60000, b"triton_poi_fused_add_0\0")
    late = LateNames(mem)
    assert late.resolve(PID, 0x50000) == "triton_poi_fused_add_0"
    reads = mem.reads
    assert late.resolve(PID, 0x50000) == "triton_poi_fused_add_0"
    assert mem.reads == reads, "the second launch of a handle costs no read"


def test_a_long_name_is_read_across_chunks_and_an_endless_one_is_refused():
    mem = Memory()
    long_name = "_ZN7cutlass6KernelI" + "x" * 5000 + "E"
    mem.put(0x50000, obj(KERNEL, 0x100000))
    mem.put(0x100000, long_name.encode() + b"\0")
    mem.put(0x51000, obj(KERNEL, 0x200000))
    mem.put(0x200000, b"a" * (70 << 10))  # no NUL within MAX_NAME
    late = LateNames(mem)
    assert late.resolve(PID, 0x50000) == long_name
    assert late.resolve(PID, 0x51000) is None


@pytest.mark.parametrize("raw", [b"\0", b"has space\0", b"\x01\x02\x03\0", b"caf\xc3\xa9\0", b"9starts_with_digit\0",
                                 b"name-with-dash\0"])
def test_a_string_that_is_not_a_ptx_identifier_is_not_a_name(raw):
    mem = Memory()
    mem.put(0x50000, obj(FUNCTION, 0x60000))
    mem.put(0x60000, raw)
    late = LateNames(mem)
    assert late.resolve(PID, 0x50000) is None
    assert late.counters["unreadable"] == 1


def test_valid_names():
    assert valid_name(b"_Z3fooPf\0junk") == "_Z3fooPf"
    assert valid_name(b"$tmp_kernel\0") == "$tmp_kernel"
    assert valid_name(b"no_terminator") is None


def test_garbage_handles_are_not_read():
    mem = Memory()
    late = LateNames(mem)
    for handle in (0, 0x40, 0x50001, 1 << 48, 0xFFFF_FFFF_FFFF_FFF0):
        assert late.resolve(PID, handle) is None
    assert mem.reads == 0


def test_an_unreadable_object_or_name_is_unknown():
    mem = Memory()
    mem.put(0x50000, obj(FUNCTION, 0xDEAD0000))  # the name pointer leads nowhere
    late = LateNames(mem)
    assert late.resolve(PID, 0x50000) is None
    assert late.resolve(PID, 0x70000) is None  # no object there at all
    assert late.counters["unreadable"] == 2


# ---- a driver whose layout is not the measured one -----------------------------------------------------------------

def test_objects_with_other_type_words_are_not_read_as_names():
    """A new driver that renumbers its object types: every read fails its checks -> unknown, counted."""
    mem = Memory()
    mem.put(0x50000, obj(0x7, 0x60000))
    mem.put(0x60000, b"looks_like_a_name\0")
    late = LateNames(mem)
    assert late.resolve(PID, 0x50000) is None
    assert late.counters["unreadable"] == 1


def test_a_moved_name_pointer_is_found_out_by_the_first_exact_name_and_turned_off():
    """The type word still matches but the name moved to offset 16, and offset 8 now points at another identifier
    (the worst case: a plausible wrong name). The first name-giving call seen contradicts the layout: it goes off
    for the process and what it read is dropped."""
    mem = Memory()
    for i, handle in enumerate((0x50000, 0x51000)):
        b = bytearray(obj(FUNCTION, 0x60000))  # offset 8: the module's name, the same for every function
        struct.pack_into("<Q", b, 16, 0x70000 + i * 0x100)
        mem.put(handle, bytes(b))
        mem.put(0x70000 + i * 0x100, f"kernel_{i}\0".encode())
    mem.put(0x60000, b"module_name\0")
    names = KernelNames(read_memory=mem)
    wrong = names.late.resolve(PID, 0x50000)
    assert wrong == "module_name"  # before any exact name, a plausible identifier cannot be told apart...
    names.observe(Event(events.EV_NAME, 0, 1, F["cuModuleGetFunction"], PID, 1, 0, 0, 0, (0x51000, 0x1, 0), "kernel_1"))
    assert names.late.counters["contradicted"] == 1
    assert names.name_of_launch(launch(0x50000)) == "unknown", "...after it, the layout is off and its reads dropped"
    assert names.name_of_launch(launch(0x51000)) == "kernel_1"


def test_the_layouts_are_confirmed_by_exact_names():
    mem = Memory()
    mem.put(0x50000, obj(KERNEL, 0x60000))
    mem.put(0x60000, b"flash_fwd_kernel\0")
    names = KernelNames(read_memory=mem)
    names.observe(Event(events.EV_NAME, 0, 1, F["cuLibraryGetKernel"], PID, 1, 0, 0, 0, (0x50000, 0x1, 0),
                        "flash_fwd_kernel"))
    assert names.late.counters == {"confirmed": 1}


def test_two_layouts_that_read_different_names_name_nothing():
    mem = Memory()
    b = bytearray(obj(FUNCTION, 0x60000))
    struct.pack_into("<Q", b, 24, 0x61000)
    mem.put(0x50000, bytes(b))
    mem.put(0x60000, b"one_name\0")
    mem.put(0x61000, b"another_name\0")
    layouts = (Layout("CUfunction", (8,), (Check(0, 1, 4),)), Layout("CUfunction", (24,), (Check(0, 1, 4),)))
    late = LateNames(mem, layouts=layouts)
    assert late.resolve(PID, 0x50000) is None
    assert late.counters["ambiguous"] == 1


def test_a_pointer_chain_layout():
    mem = Memory()
    b = bytearray(obj(FUNCTION, 0x60000))
    mem.put(0x50000, bytes(b))
    mem.put(0x60000, struct.pack("<QQ", 0, 0x61000))
    mem.put(0x61000, b"behind_a_pointer\0")
    late = LateNames(mem, layouts=(Layout("CUfunction", (8, 8), (Check(0, 1, 4),)),))
    assert late.resolve(PID, 0x50000) == "behind_a_pointer"


# ---- bounded cost --------------------------------------------------------------------------------------------------

def test_reads_beyond_the_budget_are_deferred_not_cached():
    mem = Memory()
    for i in range(4):
        mem.put(0x50000 + i * 64, obj(FUNCTION, 0x60000 + i * 32))
        mem.put(0x60000 + i * 32, f"k{i}\0".encode())
    now = [0.0]
    late = LateNames(mem, rate=1.0, burst=2.0, clock=lambda: now[0])
    got = [late.resolve(PID, 0x50000 + i * 64) for i in range(4)]
    assert got == ["k0", "k1", None, None] and late.counters["deferred"] == 2
    now[0] += 2.0  # two more reads' worth of budget
    assert [late.resolve(PID, 0x50000 + i * 64) for i in (2, 3)] == ["k2", "k3"]


def test_a_process_whose_objects_never_read_is_given_up():
    mem = Memory()
    late = LateNames(mem)
    for i in range(late.GIVE_UP_AFTER):
        assert late.resolve(PID, 0x50000 + i * 8) is None
    reads = mem.reads
    assert late.resolve(PID, 0x90000) is None
    assert mem.reads == reads and late.counters["gave_up"] == 1


def test_a_module_load_drops_the_late_names_of_that_process():
    mem = Memory()
    mem.put(0x50000, obj(FUNCTION, 0x60000))
    mem.put(0x60000, b"old_kernel\0")
    names = KernelNames(read_memory=mem)
    assert names.name_of_launch(launch(0x50000)) == "old_kernel"
    mem.put(0x60000, b"new_kernel\0")  # the object's address was reused after an unload
    names.observe(Event(events.EV_CALL, 0, 1, F["cuModuleLoadData"], PID, 1, 0, 0, 0, (0x9, 0, 0, 0, 0, 0)))
    assert names.name_of_launch(launch(0x50000)) == "new_kernel"


# ---- through KernelNames -------------------------------------------------------------------------------------------

def launch(handle: int, pid: int = PID) -> Event:
    return Event(events.EV_LAUNCH, 0, 0, F["cuLaunchKernel"], pid, 1, 0, 0, 0, (handle, 0, 1, 1, 1, 32, 1, 1, 0))


def test_exact_names_win_and_late_names_are_counted():
    mem = h200_memory()
    names = KernelNames(read_memory=mem)
    kind, handle, _, name, _ = H200[0]
    names.observe(Event(events.EV_NAME, 0, 1, F["cuLibraryGetKernel"], PID, 1, 0, 0, 0, (0x80000, 0x1, 0),
                        "named_while_attached"))
    assert names.name_of_launch(launch(handle)) == name  # loaded before attach: from the driver's object
    assert names.name_of_launch(launch(0x80000)) == "named_while_attached"  # no read: the exact table first
    assert names.name_of_launch(launch(0x70000)) == "unknown"
    c = names.counters()
    assert (c["launches_named"], c["launches_named_late"], c["launches_unknown"]) == (2, 1, 1)
    assert c["late_read"] == 1 and c["late_unreadable"] == 1 and "late_contradicted" not in c


def test_lookup_sees_late_names_once_a_launch_was_named_and_never_reads():
    mem = h200_memory()
    names = KernelNames(read_memory=mem)
    handle, name = H200[0][1], H200[0][3]
    assert names.lookup(PID, handle) is None and mem.reads == 0
    assert names.name_of_launch(launch(handle)) == name
    assert names.lookup(PID, handle) == name  # the kernel maps' per-handle counts get the name too


def test_a_kernels_function_gets_the_kernels_late_name():
    mem = h200_memory()
    names = KernelNames(read_memory=mem)
    _, kernel, _, name, _ = H200[4]
    function = H200[5][1]
    names.observe(Event(events.EV_CALL, 0, 1, F["cuKernelGetFunction"], PID, 1, 0, 0, 0,
                        (function, kernel, 0, 0, 0, 0)))
    assert names.name_of_launch(launch(function)) == name


def test_forget_drops_a_process():
    mem = h200_memory()
    names = KernelNames(read_memory=mem)
    assert names.name_of_launch(launch(H200[0][1])) == H200[0][3]
    names.forget(PID)
    mem.blocks.clear()
    assert names.name_of_launch(launch(H200[0][1])) == "unknown"


def test_process_memory_reads_this_process():
    buf = ctypes.create_string_buffer(b"_Z10own_kernelv\0")
    mem = ProcessMemory()
    try:
        assert mem(os.getpid(), ctypes.addressof(buf), 16) == b"_Z10own_kernelv\0"
    finally:
        mem.forget(os.getpid())
