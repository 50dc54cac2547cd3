"""Triton kernels for CUDA devices: the same packed layouts the CPU kernels read (formats/packing.py: b-bit codes,
LSB-first per row), dequantized in registers tile by tile and multiplied with tl.dot (fp32 accumulation).

One GEMM kernel per kind, for every batch size (rows of x padded to the 16-row tile tl.dot needs):

  affine     ŵ = α·2^s·(t − z·2^−s) per group; any width 1–8 (a code may straddle two bytes: two loads),
             per channel / tensor / group, symmetric or not, Matryoshka slices; the Extra Precision list and
             activation quantization are applied around the kernel with torch ops
  sign       S = 1 − 2·bit; x ⊙ g before, ⊙ h and the LayerNorm after (torch)
  codebook   ŵ = s · T[q] (table gathered per element)
  int8       torch._int_mm (cuBLASLt int8 GEMM) + the fixed-point requantization

Why our own kernels and not a library: gemlite (Triton, A16W8/4/2/1 with group scales) and Marlin-class kernels
(torchao, vLLM; int4/int8 symmetric, Ampere+) take their own packed layouts and a subset of our grids (no 3-bit,
no real-valued zero points, no Matryoshka slice shift, no codebooks); BitBLAS needs a TVM build. Reading the
checkpoint layout directly keeps one format for every device. The choice is revisited when a GPU is available
to measure against gemlite (the natural drop-in for the 1/2/4/8-bit rows).

Tested on CPU under TRITON_INTERPRET=1 (tests/test_triton.py); not yet measured on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import Affine, Codebook, Sign, groups
from .reference import affine_input, sign_epilogue


@triton.jit
def _codes(QW, rn, rk, N, K, ROW_BYTES, BITS: tl.constexpr):
    """(BK, BN) int32 codes of rows rn at columns rk from the LSB-first packed rows."""
    off = rk * BITS
    byte = off >> 3
    sh = off & 7
    mask = (rk[:, None] < K) & (rn[None, :] < N)
    ptr = QW + rn[None, :] * ROW_BYTES + byte[:, None]
    v = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    if (8 % BITS) != 0:  # a code may straddle into the next byte
        nxt = mask & ((sh[:, None] + BITS) > 8)
        v = v | (tl.load(ptr + 1, mask=nxt, other=0).to(tl.int32) << 8)
    return (v >> sh[:, None]) & ((1 << BITS) - 1)


@triton.jit
def _affine_gemm(X, QW, SC, ZE, Y, M, N, K, ROW_BYTES, SX, SY, SROW, GS, ZC, MULT,
                 BITS: tl.constexpr, HAS_ZERO: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * SX + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        t = _codes(QW, rn, rk, N, K, ROW_BYTES, BITS).to(tl.float32)  # (BK, BN)
        smask = (rk[:, None] < K) & (rn[None, :] < N)
        sidx = rn[None, :] * SROW + (rk // GS)[:, None]
        a = tl.load(SC + sidx, mask=smask, other=0.0).to(tl.float32) * MULT
        if HAS_ZERO:
            z = tl.load(ZE + sidx, mask=smask, other=0.0).to(tl.float32) / MULT
        else:
            z = ZC / MULT
        w = a * (t - z)  # (BK, BN), the reference's values
        acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
    tl.store(Y + rm[:, None] * SY + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _codebook_gemm(X, QW, TB, SC, Y, M, N, K, ROW_BYTES, SX, SY, TROW, TGRP, SROW, GS,
                   BITS: tl.constexpr, HAS_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * SX + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        q = _codes(QW, rn, rk, N, K, ROW_BYTES, BITS)
        m2 = (rk[:, None] < K) & (rn[None, :] < N)
        g = (rk // GS)[:, None]
        w = tl.load(TB + (rn[None, :] * TROW + g * TGRP) * (1 << BITS) + q, mask=m2, other=0.0).to(tl.float32)
        if HAS_SCALE:
            w = w * tl.load(SC + rn[None, :] * SROW + g, mask=m2, other=0.0).to(tl.float32)
        acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
    tl.store(Y + rm[:, None] * SY + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _tiles(M: int, N: int) -> tuple[int, int, int]:
    return 16 if M <= 16 else 64, 64, 32


def affine(x: torch.Tensor, p: Affine) -> torch.Tensor:
    x = affine_input(x, p)
    x2 = x.reshape(-1, p.in_features).float().contiguous()
    M, K, N = x2.shape[0], p.in_features, p.out_features
    gs, _ = groups(K, p.group_size)
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    BM, BN, BK = _tiles(M, N)
    srow = 0 if p.scale.numel() == 1 else p.scale.shape[1]
    _affine_gemm[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x2, p.qweight, p.scale, p.zero if p.zero is not None else p.scale, y, M, N, K, p.qweight.shape[1],
        x2.stride(0), y.stride(0), srow, gs, p.implicit_zero, float(1 << p.shift),
        BITS=p.bits, HAS_ZERO=p.zero is not None, BM=BM, BN=BN, BK=BK)
    if p.extra_rowptr is not None and p.extra_cols.numel():  # the Extra Precision bucket: one more step α'
        counts = (p.extra_rowptr[1:] - p.extra_rowptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(N, device=x.device), counts)  # (k,)
        cols = p.extra_cols.long()
        a = p.scale.float().reshape(-1)[rows * srow + cols // gs if srow else torch.zeros_like(rows)] * float(1 << p.shift)
        y.index_add_(1, rows, x2[:, cols] * a)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def sign(x: torch.Tensor, p: Sign) -> torch.Tensor:
    u = x.reshape(-1, p.in_features).float()
    if p.g is not None:
        u = u * p.g.float()
    scale = torch.full((1, 1), -2.0, dtype=torch.float16, device=x.device)  # S = −2·(bit − ½)
    zero = torch.full((1, 1), 0.5, dtype=torch.float16, device=x.device)
    y = affine(u, Affine(p.qweight, 1, p.in_features, scale, zero, -1, 1))
    if p.h is not None:
        y = y * p.h.float()
    return sign_epilogue(y.to(x.dtype).reshape(*x.shape[:-1], p.out_features), p.post_ln, None)


def codebook(x: torch.Tensor, p: Codebook) -> torch.Tensor:
    x2 = x.reshape(-1, p.in_features).float().contiguous()
    M, K, N = x2.shape[0], p.in_features, p.out_features
    gs, G = groups(K, p.group_size)
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    BM, BN, BK = _tiles(M, N)
    Rt, Gt = p.table.shape[:2]
    srow = 0 if p.scale is None or p.scale.numel() == 1 else p.scale.shape[1]
    _codebook_gemm[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x2, p.qweight, p.table, p.scale if p.scale is not None else p.table, y, M, N, K, p.qweight.shape[1],
        x2.stride(0), y.stride(0), 0 if Rt == 1 else Gt, 0 if Gt == 1 else 1, srow, gs,
        BITS=p.bits, HAS_SCALE=p.scale is not None, BM=BM, BN=BN, BK=BK)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def int8(x: torch.Tensor, p) -> torch.Tensor:
    from .integer import int8_matmul
    from .reference import int8_output, int8_quantize_input
    x_q = int8_quantize_input(x, p).reshape(-1, p.in_features)
    return int8_output(int8_matmul(x_q, p.qweight), x, p)
