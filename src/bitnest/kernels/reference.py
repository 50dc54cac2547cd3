"""Pure-torch reference matmul on packed affine weights: unpack → (slice) → dequantize → F.linear.

Every fast path added later is tested against this function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.packing import unpack
from ..grids.affine import AffineSpec, dequantize
from ..grids.nested import slice_codes


def codes_of(qweight: torch.Tensor, bits: int, in_features: int, serve_bits: int) -> torch.Tensor:
    """Packed (out, bytes) -> codes (out, in) at `serve_bits`, slicing nested codes when serving fewer bits."""
    q = unpack(qweight, bits, in_features)  # (out, in)
    return q if serve_bits == bits else slice_codes(q, bits, serve_bits)


def dequant_weight(qweight, scale, zero, *, bits, parent_bits, serve_bits, group_size, symmetric,
                   in_features, dtype=torch.float32) -> torch.Tensor:
    """The weight a packed layer computes with, (out, in) in `dtype`."""
    t = codes_of(qweight, bits, in_features, serve_bits)  # (out, in), serve_bits-bit codes
    spec = AffineSpec(parent_bits, group_size, symmetric)
    return dequantize(t, spec, scale, zero, shift=parent_bits - serve_bits, dtype=dtype)


def linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))
