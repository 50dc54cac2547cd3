"""The canonical packed weight of each layer kind: what `kernels.linear(x, packed, bias)` computes with.

A packed weight is a view of a layer's own buffers (no copy, no dequantized weight): the layer builds it in
its `packed` property and every path — the pure-torch reference, the C++ CPU kernels, the Triton GPU kernels —
reads these same tensors. Codes are always in the checkpoint's layout (formats/packing.py: b-bit codes,
LSB-first bit stream per row, rows padded to whole bytes).

  Affine     ŵ = α · (t · 2^(c−b) − z)      b-bit codes t of a c-bit grid (c = parent_bits; b < c for a
                                            Matryoshka slice), α/z (R, G) float16; z None = symmetric,
                                            z = 2^(c−1). Optional Extra Precision bucket (CSR of positions
                                            whose slice code is 2^b, stored as 2^b − 1: ŵ gains one step
                                            there) and optional int-b activation fake quantization (ActQuant).
  Sign       y = [(x ⊙ g) · Sᵀ] ⊙ h, then a parameter-free LayerNorm when post_ln (OneBit / BitNet)
  Codebook   ŵ = s · T[q]                  T (Rt, Gt, 2^b) float16 per row/group or shared; s (R, G) or None
  Int8       integer-only: int8 W, per-channel fixed-point requantization (nn/intlinear.py)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def groups(in_features: int, group_size: int | None) -> tuple[int, int]:
    """(group length along in, groups per row) for a group size (None: per channel, -1: per tensor)."""
    g = in_features if group_size in (None, -1) else group_size
    return g, in_features // g


class _View:
    """kernels.linear memoises the path it chose on a view (`_path`); a pickled or copied view leaves it behind
    (paths hold functions, and another process may have other paths)."""

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_path", None)
        return state


@dataclass(frozen=True, eq=False)
class Affine(_View):
    qweight: torch.Tensor            # (out, ⌈in·bits/8⌉) uint8
    bits: int                        # width of the stored codes t
    in_features: int
    scale: torch.Tensor              # (R, G) float16: α on the parent grid
    zero: torch.Tensor | None        # (R, G) float16: z on the parent grid; None = symmetric
    group_size: int | None           # None per channel, -1 per tensor, g per group
    parent_bits: int                 # c
    extra_rowptr: torch.Tensor | None = None  # (out + 1,) int32: Extra Precision bucket, CSR over rows
    extra_cols: torch.Tensor | None = None    # (k,) int32
    act_bits: int | None = None      # ActQuant: int-b fake quantization of x before the matmul
    act_scale: torch.Tensor | None = None     # (1,) static per-tensor scale; None with act_bits = dynamic per token
    kind = "affine"

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def shift(self) -> int:
        return self.parent_bits - self.bits

    @property
    def implicit_zero(self) -> float:
        """z of a symmetric grid, on the parent scale."""
        return float(1 << (self.parent_bits - 1))

    def key(self) -> tuple:
        """What a path's choice may depend on (with the device and shape)."""
        return (self.kind, self.bits, self.group_size, self.scale.dtype, None if self.zero is None else self.zero.dtype)


@dataclass(frozen=True, eq=False)
class Sign(_View):
    qweight: torch.Tensor            # (out, ⌈in/8⌉) uint8, bit 1 = negative
    in_features: int
    g: torch.Tensor | None           # (in,) float16
    h: torch.Tensor | None           # (out,) or (1,) float16
    post_ln: bool
    kind = "sign"
    bits = 1
    group_size = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def key(self) -> tuple:
        return (self.kind, 1, None)


@dataclass(frozen=True, eq=False)
class Codebook(_View):
    qweight: torch.Tensor            # (out, ⌈in·bits/8⌉) uint8 indices
    bits: int
    in_features: int
    table: torch.Tensor              # (Rt, Gt, 2^bits) float16
    scale: torch.Tensor | None       # (R, G) float16 or None
    group_size: int | None
    kind = "codebook"

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def key(self) -> tuple:
        return (self.kind, self.bits, self.group_size, self.table.dtype, None if self.scale is None else self.scale.dtype)


@dataclass(frozen=True, eq=False)
class Int8(_View):
    qweight: torch.Tensor            # (out, in) int8
    M0: torch.Tensor                 # (out,) int32: requantization multiplier M ≈ M0 · 2^−k
    k: torch.Tensor                  # (out,) int8
    bias_q: torch.Tensor | None      # (out,) int32
    x_scale: torch.Tensor            # (1,) float32
    y_scale: torch.Tensor            # (out,) or (1,) float32
    kind = "int8"
    bits = 8
    group_size = None

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def key(self) -> tuple:
        return (self.kind, 8, None)


Packed = Affine | Sign | Codebook | Int8
