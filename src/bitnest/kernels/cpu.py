"""The C++ CPU kernels (csrc/cpu_kernels.cpp): compiled on first use by torch's cpp_extension, cached.

The build is keyed by a hash of the source, the flags, torch's version and this CPU's instruction-set flags, so
a cache is never reused on a machine it was not built for. `-march=native` turns on what the CPU has
(AVX-512 with VBMI/VNNI/BF16, or AVX2 + FMA + F16C); the kernels carry a portable path for the rest.
Without a compiler (or with BITNEST_KERNELS=reference) `ext()` returns None after one notice on stderr, and
every layer computes through the pure-torch reference.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from pathlib import Path

import torch

from .reference import LN_EPS, affine_input, int8_quantize_input, sign_epilogue

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        return next(l for l in open("/proc/cpuinfo") if l.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def _name() -> str:
    h = hashlib.sha1()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), torch.__version__.encode(), _cpu_flags().encode()):
        h.update(part)
    return f"bitnest_cpu_{h.hexdigest()[:12]}"


def disabled() -> bool:
    return os.environ.get("BITNEST_KERNELS", "").lower() in ("reference", "ref", "off", "0")


def ext():
    """The compiled module, or None (reference path) when it cannot be built here."""
    if disabled():
        return None
    if "mod" in _state:
        return _state["mod"]
    with _lock:
        if "mod" not in _state:
            _state["mod"] = _build()
    return _state["mod"]


@contextlib.contextmanager
def _exclusive(where: Path):
    """One bitnest process at a time in the build directory, under an flock the kernel releases when its holder
    dies. torch's own lock (FileBaton: a file `lock` created there and deleted when done, taken by every process
    that loads the extension) stays behind when a process is killed while holding it, and every later process then
    waits for it forever (seen: a test run SIGKILLed during collection hung the next one). Under our flock no other
    bitnest process can hold torch's, so a `lock` file found here is stale and is removed."""
    import fcntl

    with open(where / "bitnest.flock", "a") as f:  # closing the file releases the flock
        fcntl.flock(f, fcntl.LOCK_EX)
        (where / "lock").unlink(missing_ok=True)
        yield


def _build():
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        name = _name()
        build_dir = os.environ.get("BITNEST_BUILD_DIR")
        where = Path(build_dir or _get_build_directory(name, False))
        where.mkdir(parents=True, exist_ok=True)
        with _exclusive(where):
            return load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                        build_directory=build_dir, verbose=False)
    except Exception as e:  # no compiler, no ninja, unsupported flags: fall back, say so once
        lines = str(e).strip().splitlines() or [type(e).__name__]
        msg = next((l.strip() for l in lines if "error" in l.lower() and "ninja" not in l), lines[-1])[:200]
        print(f"bitnest: C++ CPU kernels unavailable ({msg}); using the pure-torch reference path (slower)",
              file=sys.stderr)
        _state["error"] = msg
        return None


def available() -> bool:
    return ext() is not None


def has_avx512() -> bool:
    m = ext()
    return bool(m is not None and m.has_avx512())


def isa() -> str:
    """The vector path the kernels run here: "avx512", "avx2", "portable" (plain C++) or "reference" (no extension)."""
    m = ext()
    return "reference" if m is None else m.isa()


# ------------------------------------------------------------------------------------------ paths
# Batches of up to GEMV_MAX_ROWS rows run the packed GEMV/GEMM kernels (they read the packed weight once per
# call and are memory-bound); larger batches (prefill, evaluation) dequantize the weight tile by tile in the
# activations' dtype and multiply with torch.mm, which is compute-bound and fastest in oneDNN. A tile of
# TILE_BYTES stays in the last-level cache between its dequantization and its use; nothing outlives the call.
# 16 MB, not 4: a 512-token bf16 prefill through 4 MB tiles (512 weight rows at K = 4096) ran 1.26–1.28× the bf16
# F.linear time, through 16 MB tiles 1.08–1.13× (Zen 4, int4/int2, 4096² and 11008×4096, interleaved): oneDNN is
# less efficient on narrow right-hand sides; the dequantization itself is ~3 % of the time.
GEMV_MAX_ROWS = 16
TILE_BYTES = 1 << 24


@contextlib.contextmanager
def lut_max_batch(m: int, force: bool = False):
    """Within the block, the look-up-table kernel (AVX-512; sign and 1-bit layers, any batch) serves batches of up
    to `m` rows (0: never; the spread kernels then). For tests and benchmarks that compare the two. `force`: also
    where it is not the faster kernel (b = 2, 4), so tests check it on every width it computes."""
    mod = ext()
    old = mod.set_lut_max_batch(m, force) if mod is not None else None  # (limit, force) before
    try:
        yield
    finally:
        if mod is not None:
            mod.set_lut_max_batch(*old)


def _simd() -> bool:
    return os.environ.get("BITNEST_CPU_SIMD", "1") != "0"


# The per-call Python around a kernel is part of every decoded token (154 Linears in a 1.1B Llama), so the paths
# below skip what a decode step does not need: the module is taken from _state (a registered cpu path was chosen
# only where it was built), and no reshape or cast is issued where x already has the shape or dtype.
def _mod():
    return _state.get("mod") or ext()


def _rows2d(x: torch.Tensor, n_in: int) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, n_in)


def _out(y: torch.Tensor, x: torch.Tensor, n_out: int) -> torch.Tensor:
    """y (M, out) in x's dtype and leading shape."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX). Without it oneDNN's bf16 GEMM is emulated:
    measured on an AVX2 Zen VM, a 512×4096·4096×4096 bf16 matmul took 842 ms against fp32's 165 ms."""
    if "bf16" not in _state:
        try:
            _state["bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _state["bf16"] = any(f in _cpu_flags().split() for f in ("avx512_bf16", "amx_bf16"))
    return _state["bf16"]


def _mm_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMM dtype of the tiled path: fp32, and bf16 where the CPU multiplies bf16 natively; anything else
    (fp16, bf16 without native support) in fp32 — more exact, and several times faster there."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 and native_bf16() else torch.float32


def tiled_mm(x2: torch.Tensor, n_out: int, tile_fn, dtype: torch.dtype) -> torch.Tensor:
    """y (M, n_out) = x2 · Ŵᵀ with Ŵ produced tile by tile: tile_fn(r0, r1) -> (r1 − r0, in) in `dtype`.
    The result is contiguous (the layers after a linear run much slower on a transposed view)."""
    xm = x2.to(dtype)
    rows = max(16, min(n_out, TILE_BYTES // (x2.shape[1] * torch.finfo(dtype).bits // 8)))
    if rows >= n_out:
        return torch.mm(xm, tile_fn(0, n_out).t())
    y = torch.empty(x2.shape[0], n_out, dtype=dtype)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        y[:, r0:r1] = torch.mm(xm, tile_fn(r0, r1).t())
    return y


def _affine_args(p):
    return (p.qweight, p.bits, p.in_features, p.scale, p.zero, p.implicit_zero,
            -1 if p.group_size in (None, -1) else p.group_size, p.shift, p.extra_rowptr, p.extra_cols)


def _check_affine(p) -> None:
    if p.scale.dtype != torch.float16 or (p.zero is not None and p.zero.dtype != torch.float16):
        raise TypeError("packed scales must be float16")


def affine(x: torch.Tensor, p) -> torch.Tensor:
    x = affine_input(x, p)
    x2 = _rows2d(x, p.in_features)
    m = _mod()
    args = _affine_args(p)
    if x2.shape[0] <= GEMV_MAX_ROWS:
        y = m.affine_linear(x2, *args, _simd())
    else:
        y = tiled_mm(x2, p.out_features, lambda r0, r1: m.affine_dequant(*args, r0, r1, _mm_dtype(x), _simd()), _mm_dtype(x))
    return _out(y, x, p.out_features)


def sign(x: torch.Tensor, p) -> torch.Tensor:
    x2 = _rows2d(x, p.in_features)
    m = _mod()
    if x2.shape[0] <= GEMV_MAX_ROWS:  # the 1-bit affine kernels; g, h and the LayerNorm applied in the same call
        y = m.sign_affine_linear(x2, p.qweight, p.in_features, p.g, p.h, p.post_ln, LN_EPS, _simd())
        return _out(y, x, p.out_features)
    else:
        dt = _mm_dtype(x)
        u = x2.to(dt) if p.g is None else x2.to(dt) * p.g.to(dt)  # (M, in)
        y = tiled_mm(u, p.out_features, lambda r0, r1: m.sign_dequant(p.qweight, p.in_features, r0, r1, dt, _simd()), dt)
        if p.h is not None:
            y = y * p.h.to(dt)
        y = y.to(x.dtype)
    return sign_epilogue(y.reshape(*x.shape[:-1], p.out_features), p.post_ln, None)


def codebook(x: torch.Tensor, p) -> torch.Tensor:
    x2 = _rows2d(x, p.in_features)
    m = _mod()
    g = -1 if p.group_size in (None, -1) else p.group_size
    if x2.shape[0] <= GEMV_MAX_ROWS:
        y = m.codebook_linear(x2, p.qweight, p.bits, p.in_features, p.table, p.scale, g, _simd())
    else:
        dt = _mm_dtype(x)
        y = tiled_mm(x2, p.out_features, lambda r0, r1: m.codebook_dequant(p.qweight, p.bits, p.in_features, p.table,
                                                                            p.scale, g, r0, r1, dt, _simd()), dt)
    return _out(y, x, p.out_features)


def int8(x: torch.Tensor, p) -> torch.Tensor:
    x_q = int8_quantize_input(x, p).reshape(-1, p.in_features)  # (N, in) int8
    m = ext()
    if x_q.shape[0] > GEMV_MAX_ROWS and p.in_features % 64 == 0 and p.out_features % 8 == 0:
        acc = torch._int_mm(x_q, p.qweight.t())  # torch's int8 GEMM (oneDNN) on a transposed view, never a copy
    else:  # (and any shape _int_mm mishandles: it returns garbage for tiny K on the transposed view)
        acc = m.int8_linear(x_q, p.qweight, _simd())
    y = m.int8_requantize(acc.contiguous(), p.bias_q, p.M0, p.k, p.y_scale, x.dtype)
    return y.reshape(*x.shape[:-1], p.out_features)


def slice_pack(qweight: torch.Tensor, c: int, r: int, in_features: int, clamp: bool = True) -> torch.Tensor:
    """The r-bit slice, on ordinary pages: a switch writes it into fresh memory, and fresh huge pages cost several
    times more to fault in than the kernels gain from them (bitnest/hugepages.py)."""
    return ext().slice_pack(qweight, c, r, in_features, clamp, None)
