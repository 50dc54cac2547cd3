"""Bit-packing of unsigned codes, every width 1–8, one layout.

Layout (pinned by tests/test_packing.py::test_golden_bytes): along the last dimension, element i of a
row occupies bits [i·b, (i+1)·b) of a little-endian bit stream, where stream bit k is bit (k mod 8) of
byte k // 8 (LSB first). Each row is padded with zero bits to a whole byte, so a packed (out, in) weight is
(out, ceil(in·b / 8)) bytes and rows stay independently addressable. For b = 8 this is the identity; for
b = 4 it is the common "low nibble first" order; b = 1 is numpy's `packbits(bitorder="little")`.

Vectorized: codes are exploded to bits (b per element), the stream is cut into bytes and the bits are
weighted and summed — no Python loop over elements, and the same code path for every width.
"""
from __future__ import annotations

import torch

from ..errors import BitnestError


def packed_len(n: int, bits: int) -> int:
    """Bytes for a row of n codes of `bits` bits."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise BitnestError(f"bits must be an integer in 1..8, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) integer codes in [0, 2^bits) -> (..., ceil(n·bits/8)) uint8."""
    _check_bits(bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise BitnestError(f"codes out of range for {bits}-bit packing")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.clone()
    *lead, n = codes.shape
    if codes.numel() == 0:
        return _pack_rows(codes, bits)
    rows = codes.reshape(-1, n)
    step = max(1, (1 << 22) // max(n, 1))  # rows per slab: the bit stream below is 4·b bytes per code
    if rows.shape[0] > step:  # rows are independent: pack them in slabs, so memory stays at a few MB of codes
        return torch.cat([_pack_rows(r, bits) for r in rows.split(step)]).reshape(*lead, packed_len(n, bits))
    return _pack_rows(rows, bits).reshape(*lead, packed_len(n, bits))


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) uint8 codes -> (rows, ceil(n·bits/8)) uint8."""
    *lead, n = codes.shape
    if 8 % bits == 0 and n % (8 // bits) == 0:  # 1, 2, 4 bits, whole bytes: shift-and-OR, same layout
        k = 8 // bits
        c = codes.reshape(*lead, n // k, k)  # (rows, bytes, k): code j of a byte sits at bits [j·b, (j+1)·b)
        out = c[..., 0].clone()
        for j in range(1, k):
            out |= c[..., j] << (j * bits)
        return out
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits)  # (..., n·b) bits
    pad = packed_len(n, bits) * 8 - n * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(*lead, -1, 8)  # (..., bytes, 8)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)  # (..., bytes)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(..., ceil(n·bits/8)) uint8 -> (..., n) uint8 codes; inverse of `pack`."""
    _check_bits(bits)
    if packed.shape[-1] != packed_len(n, bits):
        raise BitnestError(f"packed row has {packed.shape[-1]} bytes, expected {packed_len(n, bits)} for {n}×{bits} bits")
    if bits == 8:
        return packed.clone()
    *lead, nbytes = packed.shape
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*lead, nbytes * 8)[..., : n * bits]  # (..., n·b)
    stream = stream.reshape(*lead, n, bits).to(torch.int32)  # (..., n, b)
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    return (stream * weights).sum(-1).to(torch.uint8)  # (..., n)
