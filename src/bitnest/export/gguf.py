"""GGUF for llama.cpp / Ollama, written through the `gguf` package (GGUFWriter, its tensor-name map and vocab).

A bitnest layer is ŵ = α'(t − z') with one fp16 scale α' and zero point z' per group of g inputs. GGML types
store, per block along a row, either w = s·k with k = t − z' an integer in a fixed range ("offset" types: Q8_0,
Q5_0, Q4_0, Q6_K, Q3_K, TQ2_0) or w = s·t − μ with a per-block min μ (Q4_1, Q5_1, Q5_K, Q4_K, Q2_K). The
32-weight types keep one fp16 s (and μ) per block; the K-quants keep one fp16 d (and dmin) per 256-weight
super-block and small integers per 16/32-weight sub-block: s = d·sc, μ = dmin·m (4-bit sc and m in Q2_K, 6-bit
in Q3_K/Q4_K/Q5_K, 8-bit sc in Q6_K). So a grid maps exactly when its groups are whole blocks — for a K-quant,
per channel or g a multiple of 256, with in_features a multiple of 256 — and z' is an integer that fits: d = α',
sc = 1, dmin = α', m = z'. Every product the decoders form (fp16 d → fp32, times a ≤ 8-bit integer, times the
code; dmin·m; their difference, = α'(t − z')) is exact in fp32, as is α'·(t − z') in bitnest's own ŵ, so
"exact" below is bit for bit (checked on every export).

  bitnest grid (r bits, group g, zero point z')        GGML type       how
  symmetric 8, g % 32 = 0                              Q8_0            exact: k = t − 128
  7 bits; asymmetric 6 — integer z', g % 32 = 0        Q8_0            exact (8.5 bits/weight): k = t − z' fits int8
  symmetric 6, g % 256 = 0                             Q6_K            exact: d = α', sc = 1, k = t − 32
  symmetric 5, g % 32 = 0                              Q5_0            exact: k = t − 16 (Q5_K would be too)
  asymmetric 5, integer z', g % 256 = 0                Q5_K            exact: d = dmin = α', sc = 1, m = z'
  asymmetric 5 otherwise, g % 32 = 0                   Q5_1            μ = −α'z' in fp16: approximate unless exact
  symmetric 4, g % 32 = 0                              Q4_0            exact: k = t − 8 (Q4_K would be too)
  asymmetric 4, integer z', g % 256 = 0                Q4_K            exact: d = dmin = α', sc = 1, m = z'
  asymmetric 4 otherwise, g % 32 = 0                   Q4_1            μ = −α'z' in fp16: approximate unless exact
  symmetric 3, g % 256 = 0                             Q3_K            exact: d = α', sc = 1, k = t − 4
  asymmetric 3, integer z', g % 32 = 0                 Q4_0            exact (4.5 bits/weight): k = t − z' ≥ −7
  2 bits, integer z' (symmetric: 2), g % 256 = 0       Q2_K            exact: d = dmin = α', sc = 1, m = z'
  1 bit, z' ∈ {0, 1}; BitNet ±β; g % 256 = 0           TQ2_0           exact: values {−d, 0, d}, d = α' or β
  real-valued z' (the paper's), g % 256 = 0            Q2_K/Q4_K/Q5_K  approximate: d = α', dmin·m fitted to α'z'
                                                       (1 / 3 bits: Q2_K / Q4_K; g % 256 ≠ 0: Q4_1 / Q5_1)
  g = 16, 32, 64, 128 at 2, symmetric 3 / 6 bits       Q2_K/Q3_K/Q6_K  approximate: the groups' α' (and α'z') are
                                                       fitted to d·sc (and dmin·m), codes kept
  in_features % 256 ≠ 0 at 1, 2, symmetric 3 / 6 bits; group sizes that split a (sub-)block; asymmetric 8 bits;
  real z' at 6 / 7 bits; OneBit (per-input g, per-output h, LayerNorm); BitNet with post_ln; codebooks; Extra
  Precision                                            a one-line error (what an exact export needs, where any)

An asymmetric grid whose zero points are all 2^(r−1) is a symmetric one. The type is chosen among those of the
grid's own width (TQ2_0 for 1 bit) that hold its kind; wider ones only where none does (asymmetric 3, 6, 7 bits):
exact first, then approximate up to fp16 rounding of the min, then fitted sub-block scales; then fewest bits per
weight, then the 32-weight types (which keeps Q8_0/Q4_0/Q4_1 where they were chosen before). Approximate grids need
`approximate=True` (--approximate) and the largest weight change is reported (measured through gguf's decoder);
without it, a one-line error says how to get an exact export. The file type names the type holding most weights
(K-quants as their all-one-type `_S` mixes).

Quantized blocks are packed here from our own codes (never re-quantized from floats) and checked against gguf's
own dequantizer before the file is written. Unquantized tensors (embeddings, norms, layers bitnest left in full
precision) are written as F32 (norms) / F16. Llama-architecture models only; q/k rows are permuted to
llama.cpp's rotary layout exactly as llama.cpp's convert_hf_to_gguf.py does (a row permutation: codes and
scales move together).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BitnestError
from . import Layer, affine_layers, unquantized_state

BLOCK = 32   # weights per block of the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
QK_K = 256   # weights per K-quant super-block (and TQ2_0 block)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise BitnestError("exporting GGUF needs the gguf package (pip install 'bitnest[export]')") from None
    return gguf


@dataclass(frozen=True)
class _Kind:
    """What a GGML type stores. offset types: w = s·k, k ∈ [lo, hi]; min types: w = s·t − μ, t < 2^width."""
    width: int                # code bits it holds (TQ2_0: 1, for ternary k ∈ {−1, 0, 1})
    block: int                # weights per block (one fp16 d per block)
    sub: int                  # weights per sub-block scale (= block for the legacy types)
    lo: int | None = None     # offset types: the range of k
    hi: int | None = None
    smax: int = 1             # largest sub-block scale integer (K-quants)
    mmax: int = 0             # largest sub-block min integer (min K-quants)
    has_min: bool = False


KINDS = {
    "TQ2_0": _Kind(1, QK_K, QK_K, -1, 1),
    "Q2_K": _Kind(2, QK_K, 16, smax=15, mmax=15, has_min=True),
    "Q3_K": _Kind(3, QK_K, 16, -4, 3, smax=31),
    "Q4_0": _Kind(4, BLOCK, BLOCK, -8, 7),
    "Q4_1": _Kind(4, BLOCK, BLOCK, has_min=True),
    "Q4_K": _Kind(4, QK_K, 32, smax=63, mmax=63, has_min=True),
    "Q5_0": _Kind(5, BLOCK, BLOCK, -16, 15),
    "Q5_1": _Kind(5, BLOCK, BLOCK, has_min=True),
    "Q5_K": _Kind(5, QK_K, 32, smax=63, mmax=63, has_min=True),
    "Q6_K": _Kind(6, QK_K, 16, -32, 31, smax=127),
    "Q8_0": _Kind(8, BLOCK, BLOCK, -128, 127),
}
EXACT, FINE, COARSE = 0, 1, 2  # by construction / up to fp16 rounding of the min (measured) / fitted sub-block scales


def _bpw(name: str, gguf) -> float:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    return size * 8 / block


def _offset_fits(layer: Layer, k: _Kind) -> bool:
    """k = t − z' is an integer in the type's range for every code t < 2^r (or ±1/2 in TQ2_0: BitNet's signs)."""
    if k.lo is None:
        return False
    z = layer.zero.float()
    if k.width == 1 and layer.bits == 1 and bool((z == 0.5).all()):
        return True
    return layer.integer_zero() and k.lo <= -float(z.max()) and (1 << layer.bits) - 1 - float(z.min()) <= k.hi


def _candidates(layer: Layer) -> list[tuple[int, str]]:
    """(class, type name) of every GGML type that can hold `layer`'s grid, exactly or approximately."""
    K, g, b = layer.in_features, layer.group_size, layer.bits
    z = layer.zero.float()
    intz, zmin, zmax = layer.integer_zero(), float(z.min()), float(z.max())
    out = []
    for name, k in KINDS.items():
        if b > k.width or K % k.block or g % k.sub:
            continue
        whole = g % k.block == 0
        if k.lo is None:  # w = s·t − μ: any codes of ≤ width bits
            if k.block == BLOCK:
                out.append((FINE, name))  # μ = −α'z' as one fp16: exact exactly when that product is
            elif whole:
                out.append((EXACT if intz and max(abs(zmin), abs(zmax)) <= k.mmax else FINE, name))
            else:
                out.append((COARSE, name))
        elif _offset_fits(layer, k):
            if whole:
                out.append((EXACT, name))
            elif k.smax > 1:
                out.append((COARSE, name))
    return out


def _native(layer: Layer) -> set[str]:
    """The types of the grid's own width (TQ2_0 for 1 bit) that hold this kind of grid, whatever its shape (an r-bit
    offset type holds k = t − z' only for z' = 2^(r−1)); empty where GGUF has none (asymmetric 3, 6, 7, 8 bits)."""
    return {n for n, k in KINDS.items() if k.width == layer.bits and (k.has_min or _offset_fits(layer, k))}


def plan(layer: Layer, gguf) -> tuple[str, int]:
    """(GGML type name, EXACT | FINE | COARSE) for `layer`, or a one-line BitnestError."""
    cands = _candidates(layer)
    native = _native(layer)
    pool = [c for c in cands if c[1] in native] if native else [c for c in cands if c[0] != COARSE]  # wider: not coarse
    if not pool:
        raise BitnestError(_why_not(layer, native))
    cls, name = min(pool, key=lambda c: (c[0], _bpw(c[1], gguf), KINDS[c[1]].block != BLOCK))
    return name, cls


def _why_not(layer: Layer, native: set[str]) -> str:
    K, g, b, n = layer.in_features, layer.group_size, layer.bits, layer.name
    grid = f"{'symmetric' if layer.symmetric else 'asymmetric'} {b}-bit grid"
    if not native and b >= 6 and (b == 8 or not layer.integer_zero()):
        return (f"{n}: no GGUF type holds an {grid}{'' if b == 8 else ' with real-valued zero points'} (Q8_0 stores "
                "t − z' as int8, no 6/7/8-bit type has a min); quantize with --symmetric"
                + ("" if b == 8 else " or -o int_zero=true") + " for an exact export")
    if not native:
        wider = sorted(t for t, k in KINDS.items() if k.width > b and (k.has_min or _offset_fits(layer, k)))
        return (f"{n}: GGUF has no {b}-bit type for this {grid}, and the wider types that hold it ({'/'.join(wider)}) "
                f"need whole blocks: a group size that is a multiple of 32 (256 for the K-quants), not {g}, and "
                f"in_features {K} a multiple of it; quantize with such a group size"
                + ("" if layer.symmetric else " or --symmetric"))
    types = sorted(native)
    blocks = sorted({KINDS[t].block for t in types})
    if all(K % bl for bl in blocks):
        return (f"{n}: in_features {K} is not a multiple of {' or '.join(map(str, blocks))}, the block size of GGUF's "
                f"{'/'.join(types)} that could hold this {grid} (only the 4-, 5- and 8-bit types have 32-weight "
                "blocks)")
    if b == 1:
        return (f"{n}: TQ2_0 holds one scale per 256 weights and values {{−d, 0, d}}; this 1-bit grid (group size "
                f"{g}, zero points {float(layer.zero.min()):g}..{float(layer.zero.max()):g}) is not that")
    subs = sorted({KINDS[t].sub for t in types})
    return (f"{n}: group size {g} does not divide into the {'/'.join(map(str, subs))}-weight (sub-)blocks of GGUF's "
            f"{'/'.join(types)} that could hold this {grid}")


def ggml_type(layer: Layer, gguf):
    """The GGML quantization type `layer` is written as (see the module docstring)."""
    return gguf.GGMLQuantizationType[plan(layer, gguf)[0]]


# ---------------------------------------------------------------------------------------------- fitting


def _fit(a: torch.Tensor, r: torch.Tensor, smax: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Super-block fp16 d and sub-block integers s ∈ [0, smax] with d·s ≈ a, a (n, nsub) float64 (signed),
    minimizing max_j r_j·|d·s_j − a_j|. Candidates d: a_max/k (k = 1..smax; k = smax bounds the error by d/2 per
    sub-block) and a_j/s_j (each sub-block exact at the a_max/smax resolution). A super-block of one value a (whole
    groups) gets d = a, s = 1 whenever a is an fp16 number, so it is exact. Returns d (n,) float64 holding fp16
    values, s (n, nsub) int64."""
    n, nsub = a.shape
    d, s = torch.zeros(n, dtype=torch.float64), torch.zeros(n, nsub, dtype=torch.int64)
    one = (a == a[:, :1]).all(1)
    if one.any():  # one value per super-block: the best of a/k, k = 1..smax (k = 1 first)
        a0 = a[one, :1]
        cand = (a0 / torch.arange(1, smax + 1, dtype=a.dtype)).half().double()  # (m, smax)
        k = torch.nan_to_num(a0 / cand, nan=0.0, posinf=0.0, neginf=0.0).round().clamp(0, smax)
        cost = torch.nan_to_num((cand * k - a0).abs(), nan=float("inf"))
        cost[~torch.isfinite(cand)] = float("inf")
        best = cost.argmin(1, keepdim=True)
        d[one] = cand.gather(1, best)[:, 0]
        s[one] = k.gather(1, best).long().expand(-1, nsub)
    rest = (~one).nonzero()[:, 0]
    for i in range(0, len(rest), chunk):
        idx = rest[i:i + chunk]
        aa, rr = a[idx], r[idx]
        amax = aa.gather(1, aa.abs().argmax(1, keepdim=True))  # (m, 1) signed
        s0 = torch.where(amax == 0, 1.0, aa / amax * smax).round().clamp(1, smax)
        cand = torch.cat([amax / torch.arange(1, smax + 1, dtype=aa.dtype), aa / s0], 1).half().double()  # (m, C)
        ss = torch.nan_to_num(aa[:, None, :] / cand[:, :, None], nan=0.0, posinf=0.0, neginf=0.0).round().clamp(0, smax)
        cost = (rr[:, None, :] * (cand[:, :, None] * ss - aa[:, None, :]).abs()).amax(-1)  # (m, C)
        cost = torch.nan_to_num(cost, nan=float("inf"))
        cost[~torch.isfinite(cand)] = float("inf")
        best = cost.argmin(1, keepdim=True)
        d[idx] = cand.gather(1, best)[:, 0]
        s[idx] = ss.gather(1, best[:, :, None].expand(-1, 1, nsub))[:, 0].long()
    return d, s


def _per_sub(layer: Layer, v: torch.Tensor, sub: int) -> torch.Tensor:
    """(R, G) per-group values → (out·K/256, 256/sub) float64: one per sub-block, by super-block."""
    x = layer.rows(v).double().repeat_interleave(layer.group_size // sub, dim=1)  # (out, K/sub)
    return x.reshape(-1, QK_K // sub)


def _f16(x: torch.Tensor) -> torch.Tensor:
    """(...) float values → (..., 2) uint8, little-endian fp16."""
    return x.half().contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _bits(q: torch.Tensor, width: int, lanes: int) -> torch.Tensor:
    """(n, W·lanes) small ints → (n, lanes) uint8: q[:, s·lanes + l] at bits width·s of byte l."""
    q = q.reshape(q.shape[0], -1, lanes).to(torch.int32)
    out = torch.zeros(q.shape[0], lanes, dtype=torch.int32)
    for s in range(q.shape[1]):
        out |= q[:, s] << (width * s)
    return out.to(torch.uint8)


def _interleaved(q: torch.Tensor, width: int, chunk: int) -> torch.Tensor:
    """K-quant layout: chunks of `chunk` bytes, each holding 8/width consecutive runs of `chunk` codes."""
    n = q.shape[0]
    per = 8 // width
    return _bits(q.reshape(n * (q.shape[1] // (chunk * per)), chunk * per), width, chunk).reshape(n, -1)


def _k_scales12(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins → 12 bytes (ggml's get_scale_min_k4 inverted)."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], 1).to(torch.uint8)


def _q3_scales12(s: torch.Tensor) -> torch.Tensor:
    """Q3_K: 16 six-bit scales (stored + 32) → 12 bytes."""
    low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    return torch.cat([low.to(torch.uint8), _bits(s >> 4, 2, 4)], 1)


def _k_blocks(layer: Layer, name: str) -> torch.Tensor:
    """(out·K/256, type size) uint8 for a K-quant / TQ2_0; sub-block scales fitted (exact for whole groups)."""
    k = KINDS[name]
    t = layer.codes.to(torch.int64).reshape(-1, QK_K)  # (n, 256)
    n = t.shape[0]
    nsub = QK_K // k.sub
    a = _per_sub(layer, layer.scale, k.sub)  # (n, nsub) α'
    z = _per_sub(layer, layer.zero, k.sub)
    tj = t.reshape(n, nsub, k.sub)
    if name == "TQ2_0":  # one d per block: α' (k = t − z') or α'/2 (k = 2(t − z'), z' = 1/2)
        s = torch.where(z.frac() == 0, 1.0, 0.5)[:, :1]  # (n, 1)
        kk = ((tj.double() - z[..., None]) / s[..., None]).round().long().reshape(n, QK_K)
        return torch.cat([_interleaved(kk + 1, 2, 32), _f16(a[:, 0] * s[:, 0])], 1)
    if not k.has_min:  # Q3_K, Q6_K: w = d·sc·k, k = t − z'
        kk = (tj.double() - z[..., None]).round().long()  # (n, nsub, sub)
        d, sc = _fit(a, kk.abs().amax(-1).double(), k.smax)
        kk = kk.reshape(n, QK_K)
        if name == "Q3_K":
            # k ∈ [−4, 3]: its two low bits, and an hmask bit set for k ≥ 0 (the decoder subtracts 4 where clear)
            hmask = _bits((kk >= 0).long(), 1, 32)
            return torch.cat([hmask, _interleaved(kk & 3, 2, 32), _q3_scales12(sc + 32), _f16(d)], 1)
        u = kk + 32  # Q6_K
        ql = _interleaved(u & 0xF, 4, 64)
        qh = _interleaved(u >> 4, 2, 32)
        return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16(d)], 1)
    # Q2_K, Q4_K, Q5_K: w = d·sc·t − dmin·m; the min absorbs the scale's error at the middle of a sub-block's codes
    lo, hi = tj.amin(-1).double(), tj.amax(-1).double()
    d, sc = _fit(a, (hi - lo) / 2, k.smax)
    mu = a * z + (d[:, None] * sc - a) * (hi + lo) / 2  # target dmin·m
    dmin, m = _fit(mu, torch.ones_like(mu), k.mmax)
    if name == "Q2_K":
        return torch.cat([(sc | (m << 4)).to(torch.uint8), _interleaved(t, 2, 32), _f16(d), _f16(dmin)], 1)
    head = torch.cat([_f16(d), _f16(dmin), _k_scales12(sc, m)], 1)
    if name == "Q4_K":
        return torch.cat([head, _interleaved(t, 4, 32)], 1)
    return torch.cat([head, _bits(t >> 4, 1, 32), _interleaved(t & 0xF, 4, 32)], 1)  # Q5_K


def _legacy_blocks(layer: Layer, name: str) -> torch.Tensor:
    """(out·K/32, type size) uint8 for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: one fp16 d (and m) per 32 weights."""
    k = KINDS[name]
    per = layer.group_size // BLOCK
    t = layer.codes.to(torch.int64).reshape(-1, BLOCK)  # (n, 32)
    a = layer.rows(layer.scale).repeat_interleave(per, dim=1).reshape(-1)  # (n,) fp16
    z = layer.rows(layer.zero).repeat_interleave(per, dim=1).reshape(-1).double()
    if name == "Q8_0":  # k = t − z' as int8
        return torch.cat([_f16(a), (t - z[:, None].round().long()).to(torch.int8).view(torch.uint8)], 1)
    if k.lo is not None:  # Q4_0: k + 8, Q5_0: k + 16
        q = t - z[:, None].round().long() - k.lo
        parts = [_f16(a)]
    else:  # Q4_1, Q5_1: the codes, and m = −α'z' rounded to fp16
        q = t
        parts = [_f16(a), _f16(-(a.double() * z))]
    if k.width == 5:
        parts.append(_qh32(q))
    parts.append(((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).to(torch.uint8))  # byte j: element j, j + 16
    return torch.cat(parts, 1)


def _qh32(q: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: bit i of a little-endian uint32 = high bit of element i."""
    h = (q >> 4) & 1  # (n, 32)
    return torch.stack([sum(h[:, 8 * j + i] << i for i in range(8)) for j in range(4)], 1).to(torch.uint8)


def blocks(layer: Layer, qtype, gguf) -> np.ndarray:
    """(out, in / block · bytes per block) uint8: the layer's codes and scales as GGML blocks of `qtype`."""
    name = gguf.GGMLQuantizationType(qtype).name
    data = _k_blocks(layer, name) if KINDS[name].block == QK_K else _legacy_blocks(layer, name)
    return data.reshape(layer.out_features, -1).numpy()


def encode(layer: Layer, gguf, approximate: bool = False):
    """(qtype, blocks, largest |Δŵ| measured through gguf's own dequantizer) — or a one-line BitnestError."""
    name, cls = plan(layer, gguf)
    qtype = gguf.GGMLQuantizationType[name]
    data = blocks(layer, qtype, gguf)
    back = torch.from_numpy(gguf.quants.dequantize(data, qtype).copy())  # gguf's decoder, our meaning
    err = float((back - layer.weight()).abs().max())
    if err > 0 and cls == EXACT:
        raise BitnestError(f"internal: {layer.name} does not decode back exactly through gguf as {name} ({err:.3g})")
    if err > 0 and not approximate:
        raise BitnestError(_approx_hint(layer, name, cls, err))
    return qtype, data, err


def _approx_hint(layer: Layer, name: str, cls: int, err: float) -> str:
    n = layer.name
    if cls == COARSE:
        return (f"{n}: {name} shares one fp16 scale per 256 weights with {KINDS[name].smax.bit_length()}-bit sub-block "
                f"scales, so group size {layer.group_size}'s own scales change weights by up to {err:.3g}; pass "
                "--approximate to accept, or quantize per channel or with a group size that is a multiple of 256 "
                "(and -o int_zero=true) for an exact export")
    if KINDS[name].block == BLOCK:
        return (f"{n}: {name} stores m = −α·z in float16, which changes weights by up to {err:.3g} here; pass "
                "--approximate to accept, or quantize with --symmetric, or per channel (or a group size that is a "
                "multiple of 256) with -o int_zero=true, for an exact export")
    return (f"{n}: {name} holds the min α·z as fp16 dmin × a {KINDS[name].mmax.bit_length()}-bit integer, which "
            f"changes weights by up to {err:.3g} with these real-valued zero points; pass --approximate to accept, or "
            "quantize with -o int_zero=true or --symmetric for an exact export")


# ---------------------------------------------------------------------------------------------- sign layers


def gguf_layers(model: torch.nn.Module) -> list[Layer]:
    """Every packed layer as a Layer, BitNet's sign layers included (ŵ = ±β as α' = 2β, z' = 1/2, t = 1 for +1);
    a one-line error for OneBit and the other kinds no GGUF type holds."""
    from ..eval.bits import packed_modules
    from ..formats.packing import unpack
    from ..nn.onebit import PackedSignLinear

    mods = packed_modules(model)
    signs = {n: m for n, m in mods.items() if isinstance(m, PackedSignLinear)}
    for name, m in signs.items():
        if m.g is not None or (m.h is not None and m.h.numel() != 1):
            raise BitnestError(f"{name} is a OneBit layer (kind onebit: signs with a per-input scale g, a per-output "
                               "scale h and a LayerNorm after the matmul); no GGUF type holds a scale per input column "
                               "(GGUF scales are per block along a row) — export BitNet or affine checkpoints")
        if m.post_ln:
            raise BitnestError(f"{name} is a BitNet-style sign layer with post_ln (a LayerNorm after the matmul, kind "
                               "onebit), which llama.cpp's Llama graph does not compute; only post_ln=false BitNet "
                               "layers map to TQ2_0")
        if m.bias is not None:
            raise BitnestError(f"{name} has a bias, which llama.cpp's Llama graph has no tensor for")
    if not signs:
        return affine_layers(model)
    rest = {n: m for n, m in mods.items() if n not in signs}

    class _Only:  # the other packed modules, under their own names, for affine_layers
        def named_modules(self):
            return iter(rest.items())

    affine = {l.name: l for l in affine_layers(_Only())} if rest else {}
    out = []
    for name, m in mods.items():
        if name in affine:
            out.append(affine[name])
            continue
        beta = torch.ones(1, 1) if m.h is None else m.h.float().reshape(1, 1)  # ŵ = β·sign, β in fp16
        if not torch.isfinite(2 * beta.half()).all():
            raise BitnestError(f"{name}: the sign layer's scale 2β overflows float16")
        t = (1 - unpack(m.qweight, 1, m.in_features)).to(torch.uint8)  # sign code 1 = negative → t = 0
        out.append(Layer(name, t, (2 * beta).half(), torch.full((1, 1), 0.5), 1, m.in_features, False, True, None))
    return out


# ---------------------------------------------------------------------------------------------- the file


def _permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order for q/k: (n_head, 2, d/2) -> (n_head, d/2, 2) over the output rows."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _permuted(layer: Layer, n_head: int) -> Layer:
    import dataclasses
    return dataclasses.replace(layer, codes=_permute(layer.codes, n_head),
                               scale=layer.scale if layer.per_tensor else _permute(layer.scale, n_head),
                               zero=layer.zero if layer.per_tensor else _permute(layer.zero, n_head))


FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
              "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S",
              "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K", "TQ2_0": "MOSTLY_TQ2_0"}


def file_type(weights: dict[str, int], gguf):
    """The LlamaFileType naming the mix: that of the type holding the most quantized weights (llama.cpp's
    `_S` variants are the all-one-type K mixes; the rest of the file — embeddings, norms — is F16 / F32)."""
    return gguf.LlamaFileType[FILE_TYPES[max(weights, key=lambda t: (weights[t], t))]]


def _add_vocab(w, loaded, gguf) -> None:
    tok = loaded.tokenizer
    src = Path(loaded.source)
    if hasattr(tok, "pieces"):  # bitnest's llama2.c tokenizer: sentencepiece-style pieces and scores
        w.add_tokenizer_model("llama")
        w.add_token_list([p for p in tok.pieces])
        w.add_token_scores([float(s) for s in tok.scores])
        types = [gguf.TokenType.NORMAL] * len(tok.pieces)
        types[0] = gguf.TokenType.UNKNOWN
        for i in (tok.bos_token_id, tok.eos_token_id):
            types[i] = gguf.TokenType.CONTROL
        for i in getattr(tok, "_byte_value", {}):
            types[i] = gguf.TokenType.BYTE
        w.add_token_types(types)
        w.add_bos_token_id(tok.bos_token_id)
        w.add_eos_token_id(tok.eos_token_id)
        w.add_unk_token_id(0)
        return
    try:
        vocab = gguf.vocab.BpeVocab(src)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise BitnestError(f"{src}: GGUF export reads byte-level BPE tokenizers (tokenizer.json) and llama2.c ones; "
                           f"this one is not ({e})") from None
    toks, types = [], []
    for text, _, ttype in list(vocab.bpe_tokens()) + list(vocab.added_tokens()):
        toks.append(text)
        types.append(ttype)
    special = {getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    types = [gguf.TokenType.CONTROL if i in special else t for i, t in enumerate(types)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types(types)
    gguf.vocab.SpecialVocab(src, load_merges=True, n_vocab=len(toks)).add_to_gguf(w)


def write_gguf(loaded, layers: list[Layer], out: Path, *, approximate: bool = False, overwrite: bool = False) -> dict:
    gguf = _gguf()
    cfg = loaded.model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise BitnestError(f"GGUF export writes Llama-architecture models; this one is {getattr(cfg, 'model_type', '?')!r}")
    out = Path(out)
    if out.suffix != ".gguf":
        out = out / "model.gguf" if out.is_dir() or not out.suffix else out.with_suffix(".gguf")
    from ..formats.checkpoint import check_output, clean_stale
    check_output(out, overwrite, file=True)  # before the encoding: exists / is a directory / not writable
    clean_stale(out)  # a temporary file a killed export left
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tensors: list[tuple[str, np.ndarray, object]] = []  # (gguf name, data, raw type or None)
    errors, types, weights = {}, {}, {}
    for l in layers:
        if l.bias is not None:
            raise BitnestError(f"{l.name} has a bias, which llama.cpp's Llama graph has no tensor for")
        plan(l, gguf)  # a grid no type holds: the error before any packing
    for l in layers:
        if l.name.endswith("q_proj"):
            l = _permuted(l, n_head)
        elif l.name.endswith("k_proj"):
            l = _permuted(l, n_kv)
        qtype, data, err = encode(l, gguf, approximate)  # decoded by gguf and compared with ŵ: exact, or reported
        errors[l.name], types[l.name] = err, qtype.name
        weights[qtype.name] = weights.get(qtype.name, 0) + l.codes.numel()
        tensors.append((names.get_name(l.name + ".weight", try_suffixes=(".weight",)) or l.name, data, qtype))
    for k, t in unquantized_state(loaded.model, layers, torch.float32).items():
        if k == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue
        mod = k.rsplit(".", 1)[0]
        if mod.endswith("q_proj"):
            t = _permute(t, n_head)
        elif mod.endswith("k_proj"):
            t = _permute(t, n_kv)
        gname = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if gname is None:
            if "rotary_emb" in k:
                continue
            raise BitnestError(f"no GGUF name for tensor {k}")
        arr = t.numpy() if t.dim() == 1 else t.to(torch.float16).numpy()  # norms in F32, matrices in F16
        tensors.append((gname, arr, None))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(Path(loaded.source).name)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
        w.add_rope_freq_base(float(rope))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
        w.add_rope_dimension_count(head_dim)
        if head_dim * n_head != cfg.hidden_size:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(file_type(weights, gguf))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(w, loaded, gguf)
        for name, arr, raw in tensors:
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"format": "gguf", "out": str(out), "layers": len(layers), "types": sorted(set(types.values())),
            "layer_types": types, "file_type": file_type(weights, gguf).name,
            "max_abs_weight_change": max(errors.values())}


def llama_cpp_logits(path, ids: torch.Tensor, n_threads: int = 2) -> torch.Tensor:
    """llama.cpp's own logits (W, T, V) for token windows `ids` (W, T) of a GGUF file — the consumer's view of an
    export, for checking it against bitnest (needs llama-cpp-python; the same ids, no re-tokenization)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise BitnestError("checking a GGUF with llama.cpp needs llama-cpp-python (pip install llama-cpp-python)") from None
    T = ids.shape[-1]
    llm = Llama(model_path=str(path), n_ctx=T, logits_all=True, n_threads=n_threads, n_batch=T, verbose=False)
    try:
        out = []
        for w in ids:
            llm.reset()
            llm.eval(w.tolist())
            out.append(torch.from_numpy(np.array(llm.scores[:len(w)], dtype=np.float32)))  # (T, V)
        return torch.stack(out)
    finally:
        llm.close()
