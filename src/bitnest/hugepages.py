"""Packed weights on transparent huge pages (Linux): 2 MiB pages for the tensors the kernels stream.

Decoding one token reads every packed weight once, straight from memory. On 4 KiB pages each page of a weight
costs a TLB walk and the hardware prefetchers stop at every page boundary, so a kernel that decodes faster than
memory delivers spends its time waiting on misses. Most distributions leave THP at `madvise` (only regions that
ask get huge pages), and torch's allocator does not ask unless THP_MEM_ALLOC_ENABLE=1 was set before its first
allocation. So bitnest places its own packed codes: `place(t)` copies a tensor of ≥ 2 MiB into an anonymous
mapping aligned to 2 MiB and advised MADV_HUGEPAGE (the mapping ends at the tensor's last 4 KiB page, so a
partial last huge page stays 4 KiB pages: no memory beyond the tensor's own is touched).

Measured in one process, huge pages against torch's 4 KiB-page allocations of the same weights (Zen 4 VM, THP =
madvise, 2 threads; `THP_MEM_ALLOC_ENABLE=0 python bench/kernel_ab.py --variant this= --pages both --cold --rows 1
--act fp32`, 5 runs): time ratio, geometric mean [range] — int8 0.90 [0.76, 1.04], int4 0.95 [0.89, 1.09],
int3 g128 0.87 [0.68, 1.09] (4 runs), int2 1.01 [0.94, 1.14], OneBit 0.98 [0.86, 1.04], fp32 F.linear 1.00
[0.94, 1.03]. The formats that read the most bytes gain; the compute-bound ones (int2, OneBit) do not; this VM's
run-to-run noise is ±10 %.

The r-bit working copies of nested layers (kernels.slice_pack: built by a switch, or at the first forward of a
model loaded with `bits=r`) stay on ordinary pages: on this Firecracker VM a fresh huge page costs about five
times what its 512 small pages cost to fault in — `python bench/switch_cost.py
--rounds 1 --pages small|huge` (1.1B shape, int8 → int4, 462 MiB of copies, first write in a fresh process, 3
runs each, alternating): 529–736 ms on huge pages, 119–135 ms on 4 KiB pages, beside 61–138 ms of slicing —
while decoding after the switch measured the same either way (switched ÷ standalone int-r, `bench/speed.py`'s
side-by-side, two runs each: int4 1.03 and 0.99 on huge pages, 1.07 and 0.94 on small; int2 0.94 and 0.91, 0.93
and 0.97; the standalone int-r files were on huge pages).

BITNEST_HUGEPAGES=0 turns placement off. Elsewhere (not Linux, THP `never`, a failed mapping) `place` returns its
argument unchanged.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import weakref

import torch

HUGE = 2 << 20  # bytes of one huge page (x86-64, and arm64 with 4 KiB base pages)
PAGE = mmap.PAGESIZE
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_PRIVATE_ANON = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20)
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_libc = None
_ok: bool | None = None


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            s = f.read()
    except OSError:
        return "unknown"
    return s[s.index("[") + 1:s.index("]")] if "[" in s else s.strip()


def supported() -> bool:
    """Whether `place` will use huge pages here (Linux, THP not `never`, not turned off)."""
    global _ok, _libc
    if os.environ.get("BITNEST_HUGEPAGES", "1").lower() in ("0", "off", "false", "no"):
        return False
    if _ok is None:
        ok = sys.platform.startswith("linux") and _thp_mode() in ("always", "madvise")
        if ok:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.mmap.restype = ctypes.c_void_p
                libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_long]
                libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _libc = libc
            except (OSError, AttributeError):
                ok = False
        _ok = ok  # last: another thread sees True only once _libc is ready
    return _ok


def _map(nbytes: int) -> tuple[int, int] | None:
    """(address, length) of a fresh mapping of ≥ nbytes starting on a 2 MiB boundary, advised huge; None on failure."""
    length = -(-nbytes // PAGE) * PAGE
    raw = _libc.mmap(None, length + HUGE, _PROT_RW, _MAP_PRIVATE_ANON, -1, 0)
    if raw in (None, ctypes.c_void_p(-1).value):
        return None
    addr = -(-raw // HUGE) * HUGE
    if addr > raw:  # trim the unaligned head and whatever lies past the tensor's last page
        _libc.munmap(raw, addr - raw)
    tail = raw + HUGE - addr  # the mapping's end minus the tensor's: what the head trim did not take
    if tail:
        _libc.munmap(addr + length, tail)
    _libc.madvise(addr, length, _MADV_HUGEPAGE)  # advice only: a refusal leaves ordinary pages
    return addr, length


def is_placed(t: torch.Tensor) -> bool:
    """Whether t's storage starts on a 2 MiB boundary (what `place` gives)."""
    return t.device.type == "cpu" and t.untyped_storage().data_ptr() % HUGE == 0


def _mapped(nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor | None:
    """A zero-filled tensor over a fresh huge-page mapping (unmapped when the tensor's storage dies)."""
    m = _map(nbytes)
    if m is None:
        return None
    addr, length = m
    buf = (ctypes.c_uint8 * nbytes).from_address(addr)
    # the tensor's storage keeps buf alive; not at interpreter exit (a daemon thread may still be decoding)
    weakref.finalize(buf, _libc.munmap, addr, length).atexit = False
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


def wanted(nbytes: int, min_bytes: int = HUGE) -> bool:
    return nbytes >= max(min_bytes, HUGE) and supported()


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) on the CPU, on huge pages when it is ≥ 2 MiB (then zero-filled)."""
    shape = torch.Size(shape)
    nbytes = shape.numel() * dtype.itemsize
    out = _mapped(nbytes, dtype, shape) if nbytes and wanted(nbytes) else None
    return torch.empty(shape, dtype=dtype) if out is None else out


def place(t: torch.Tensor, min_bytes: int = HUGE) -> torch.Tensor:
    """A copy of t (same shape, dtype, values; contiguous) on huge pages, or t itself when it is smaller than
    min_bytes, not on the CPU, already placed, or huge pages are not available."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or t.requires_grad or not wanted(nbytes, min_bytes) or is_placed(t):
        return t
    out = _mapped(nbytes, t.dtype, t.shape)
    if out is None:
        return t
    out.copy_(t)
    return out


def place_module(model: torch.nn.Module, min_bytes: int = HUGE) -> int:
    """Move every integer buffer of ≥ min_bytes (packed codes) onto huge pages, in place; returns the bytes moved."""
    moved = 0
    if not supported():
        return 0
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is None or b.is_floating_point() or b.is_complex() or b.dtype == torch.bool:
                continue
            p = place(b, min_bytes)
            if p is not b:
                mod._buffers[name] = p
                moved += p.numel() * p.element_size()
                if hasattr(mod, "drop_view"):  # a cached packed view would keep the old copy alive
                    mod.drop_view()
    return moved
