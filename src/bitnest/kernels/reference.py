"""The pure-torch reference of every packed kind: unpack → (slice) → dequantize → F.linear.

It runs on any device and dtype and is what every fast path is tested against (tests/test_kernels.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.packing import unpack
from ..grids.affine import AffineSpec, dequantize, grouped
from ..grids.nested import slice_codes
from .integer import multiplier_value, requantize, simulate_requantize
from .packed import Affine, Codebook, Int8, Sign

LN_EPS = 1e-5  # OneBit's parameter-free LayerNorm


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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


# ------------------------------------------------------------------------------------------ activations


def fake_quant_sym(x: torch.Tensor, s, bits: int = 8) -> torch.Tensor:
    """Symmetric b-bit quantize-dequantize with scale s (broadcastable): s · clamp(round(x/s), −qmax, qmax)."""
    qmax = (1 << (bits - 1)) - 1
    return torch.round(x / s).clamp_(-qmax, qmax) * s


def quant_act(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x̂ (…, in): per-token dynamic (scale None) or per-tensor static symmetric fake quantization."""
    if scale is None:
        qmax = (1 << (bits - 1)) - 1
        scale = (x.detach().abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-8)  # (…, 1) per token
    return fake_quant_sym(x, scale.to(x.dtype), bits)


# ------------------------------------------------------------------------------------------ affine


def affine_codes(p: Affine) -> torch.Tensor:
    """The served codes t (out, in) int16, the Extra Precision bucket's positions raised to 2^bits."""
    t = unpack(p.qweight, p.bits, p.in_features).to(torch.int16)  # (out, in)
    if p.extra_rowptr is not None and p.extra_cols.numel():
        counts = (p.extra_rowptr[1:] - p.extra_rowptr[:-1]).long()  # (out,)
        rows = torch.repeat_interleave(torch.arange(p.out_features, device=t.device), counts)  # (k,)
        t[rows, p.extra_cols.long()] += 1
    return t


def affine_weight(p: Affine, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = α · (t · 2^(c−b) − z), (out, in) in `dtype`."""
    spec = AffineSpec(p.parent_bits, p.group_size, p.zero is None)
    return dequantize(affine_codes(p), spec, p.scale, p.zero, shift=p.shift, dtype=dtype)


def affine_input(x: torch.Tensor, p: Affine) -> torch.Tensor:
    return x if p.act_bits is None else quant_act(x, p.act_bits, p.act_scale)


def affine_linear(x: torch.Tensor, p: Affine) -> torch.Tensor:
    return F.linear(affine_input(x, p), affine_weight(p, compute_dtype(x)))


# ------------------------------------------------------------------------------------------ sign


def unpack_signs(qweight: torch.Tensor, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """(out, ⌈in/8⌉) uint8, bit 1 = negative -> (out, in) ±1 in `dtype`."""
    return (1 - 2 * unpack(qweight, 1, in_features).to(torch.int8)).to(dtype)


def sign_linear(x: torch.Tensor, S: torch.Tensor, g: torch.Tensor | None, h: torch.Tensor | None,
                bias: torch.Tensor | None, post_ln: bool) -> torch.Tensor:
    """[(x ⊙ g) · Sᵀ] ⊙ h, then a parameter-free LayerNorm over the output features, then the bias
    (methods.md §2). x: (..., in), S: (out, in) ±1, g: (in,), h: (out,) or (1,)."""
    dt = x.dtype
    if g is not None:
        x = x * g.to(dt)  # (..., in)
    y = F.linear(x, S.to(dt))  # (..., out)
    if h is not None:
        y = y * h.to(dt)
    return sign_epilogue(y, post_ln, bias)


def sign_epilogue(y: torch.Tensor, post_ln: bool, bias: torch.Tensor | None) -> torch.Tensor:
    if post_ln:
        y = F.layer_norm(y, (y.shape[-1],), eps=LN_EPS)
    return y if bias is None else y + bias.to(y.dtype)


def sign_packed_linear(x: torch.Tensor, p: Sign) -> torch.Tensor:
    """Without the bias (linear() adds it after the LayerNorm)."""
    return sign_linear(x, unpack_signs(p.qweight, p.in_features, x.dtype), p.g, p.h, None, p.post_ln)


# ------------------------------------------------------------------------------------------ codebook


def codebook_weight(p: Codebook, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = s · T[q], (out, in)."""
    q = grouped(unpack(p.qweight, p.bits, p.in_features), p.group_size)  # (R, G, g)
    R, G, g = q.shape
    T = p.table.float().expand(R, G, -1)  # (R, G, 2^b)
    w = torch.gather(T, 2, q.long())  # (R, G, g)
    if p.scale is not None:
        w = w * p.scale.float().unsqueeze(-1)
    return w.reshape(p.out_features, p.in_features).to(dtype)


def codebook_linear(x: torch.Tensor, p: Codebook) -> torch.Tensor:
    return F.linear(x, codebook_weight(p, compute_dtype(x)))


# ------------------------------------------------------------------------------------------ integer-only


def int8_quantize_input(x: torch.Tensor, p: Int8) -> torch.Tensor:
    from .integer import QMAX
    return torch.round(x.float() / p.x_scale).clamp_(-QMAX, QMAX).to(torch.int8)


def int8_output(acc: torch.Tensor, x: torch.Tensor, p: Int8, exact: bool = True) -> torch.Tensor:
    """int32 (N, out) accumulators -> requantized int8 -> float y (…, out) in x's dtype."""
    if p.bias_q is not None:
        acc = acc + (p.bias_q if exact else p.bias_q.double())
    y_q = requantize(acc, p.M0.long(), p.k.long()) if exact else simulate_requantize(acc, p.M0.long(), p.k.long())
    y = y_q.float() * p.y_scale  # (N, out)
    return y.reshape(*x.shape[:-1], p.out_features).to(x.dtype)


def int8_linear(x: torch.Tensor, p: Int8) -> torch.Tensor:
    """Integer-only layer by float64 simulation (exact: every value an integer below 2^53)."""
    x_q = int8_quantize_input(x, p).reshape(-1, p.in_features)  # (N, in) int8
    acc = x_q.double() @ p.qweight.double().T  # (N, out)
    return int8_output(acc, x, p, exact=False)


def int8_weight(p: Int8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The effective float weight W_q · s_w with s_w = M · s_y / s_x (for inspection)."""
    s_w = multiplier_value(p.M0.long(), p.k.long()) * p.y_scale.double() / p.x_scale.double()
    return (p.qweight.double() * s_w[:, None]).to(dtype)


LINEAR = {"affine": affine_linear, "sign": sign_packed_linear, "codebook": codebook_linear, "int8": int8_linear}
WEIGHT = {"affine": affine_weight, "codebook": codebook_weight, "int8": int8_weight}
