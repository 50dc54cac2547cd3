"""Affine (MinMax) integer grids: ŵ = α · (q − z), q ∈ {0, …, 2^b − 1}.

Granularity is a group size along the input dimension of W (out, in):
  - `group_size=None`  per output channel (one α, z per row),
  - `group_size=-1`    per tensor,
  - `group_size=g`     per group of g consecutive inputs (g must divide `in`).
Asymmetric (the MatQuant base quantizer, methods.md §1): α = (max − min)/(2^b − 1), z = −min/α, with z
kept real-valued as in the paper; `int_zero=True` rounds z to an integer code in [0, 2^b − 1] (GPTQ's and
compressed-tensors' and GGUF's convention, so an export represents the grid exactly). The default stays
real-valued: on ref-10m, 2–8 bits, RTN/GPTQ/sliced/MatQuant, integer z costs measurably in 4 of 15 pairs and gains
in 5, every difference within 1.5 % perplexity (BENCHMARKS.md, "Integer zero points") — neither choice is free, and
the exporters say when `int_zero=True` is needed. Symmetric: α = max|w| / (2^(b−1) − 1), z = 2^(b−1) (implicit,
not stored), so 0 is exact. α and z are rounded to their storage dtype (fp16) *before* codes are computed, so
the fake-quant forward used in training equals the forward of the packed checkpoint exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BitnestError
from .nested import MultiWidth, slice_codes

STORE_DTYPE = torch.float16  # dtype of α and z on disk; 16 bits each per group in bits accounting


@dataclass(frozen=True)
class AffineSpec:
    bits: int = 4
    group_size: int | None = None  # None: per channel, -1: per tensor, g > 0: per group of g inputs
    symmetric: bool = False
    int_zero: bool = False  # asymmetric only: z rounded to an integer code

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise BitnestError(f"bits must be an integer in 1..8, got {self.bits!r}")
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise BitnestError(f"group size must be positive, -1 (per tensor) or None (per channel), got {self.group_size}")
        if self.symmetric and self.bits < 2:
            raise BitnestError("symmetric grids need at least 2 bits (1-bit symmetric is a sign grid: use --method onebit)")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def granularity(self) -> str:
        return "channel" if self.group_size is None else "tensor" if self.group_size == -1 else f"group{self.group_size}"

    def check_shape(self, out_features: int, in_features: int, name: str = "weight") -> None:
        g = self.group_size
        if g is not None and g > 0 and in_features % g:
            raise BitnestError(f"group size {g} does not divide the {in_features} input features of {name}")


def grouped(W: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) -> (R, G, g): rows R that own scales, G groups per row, g weights per group."""
    out, inp = W.shape
    if group_size is None:
        return W.reshape(out, 1, inp)
    if group_size == -1:
        return W.reshape(1, 1, out * inp)
    return W.reshape(out, inp // group_size, group_size)


def ungrouped(Wg: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return Wg.reshape(shape)


def fit(W: torch.Tensor, spec: AffineSpec, gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None):
    """MinMax α, z per group, as stored: (R, G) each in STORE_DTYPE. z is None when symmetric.

    gamma/beta (R, G) in [0, 1] shrink max/min (OmniQuant's learnable weight clipping); None = 1.
    """
    Wg = grouped(W.float(), spec.group_size)  # (R, G, g)
    if spec.symmetric:
        m = Wg.abs().amax(-1)  # (R, G)
        if gamma is not None:
            m = m * gamma
        alpha = (m / ((1 << (spec.bits - 1)) - 1)).clamp_min(1e-8)
        return alpha.to(STORE_DTYPE), None
    wmax, wmin = Wg.amax(-1), Wg.amin(-1)  # (R, G)
    if gamma is not None:
        wmax = wmax * gamma
    if beta is not None:
        wmin = wmin * beta
    alpha = ((wmax - wmin) / spec.qmax).clamp_min(1e-8)  # (R, G); clamp: constant groups
    alpha = alpha.to(STORE_DTYPE).float()
    flat = alpha == 0  # a constant group (an all-zero row): α rounds to 0 in the storage dtype and z = −wmin/α is NaN
    if flat.any():  # a step of the group's magnitude instead: it dequantizes to its constant
        mag = (torch.maximum(wmax.abs(), wmin.abs()).clamp_min(1e-4) / spec.qmax).to(STORE_DTYPE).float()
        alpha = torch.where(flat, mag, alpha)
    z = -wmin / alpha
    if spec.int_zero:  # an integer code: min maps within α/2 of code 0 (exact in fp16 up to 2048)
        z = torch.round(z).clamp(0, spec.qmax)
    return alpha.to(STORE_DTYPE), z.to(STORE_DTYPE)


def zero_point(spec: AffineSpec, z: torch.Tensor | None) -> torch.Tensor | float:
    return float(1 << (spec.bits - 1)) if z is None else z.float()


def quantize(W: torch.Tensor, spec: AffineSpec, alpha: torch.Tensor, z: torch.Tensor | None, multi=None) -> torch.Tensor:
    """q = clamp(round(w/α + z), 0, 2^b − 1) as uint8, shape of W (torch.round: half to even).

    z is real-valued (the paper's z = −min/α), so it is added before rounding: min(w) maps to code 0 and
    max(w) to 2^b − 1 exactly, and the error stays ≤ α/2 everywhere inside the range. `multi`
    (grids/nested.MultiWidth): round to the code best for all its slices at once instead."""
    Wg = grouped(W.float(), spec.group_size)  # (R, G, g)
    zz = zero_point(spec, z)
    zz = zz.unsqueeze(-1) if isinstance(zz, torch.Tensor) else zz
    u = Wg / alpha.float().unsqueeze(-1) + zz  # (R, G, g): positions on the grid
    q = torch.round(u).clamp(0, spec.qmax) if multi is None else multi.round(u)
    return q.to(torch.uint8).reshape(W.shape)


def dequantize(q: torch.Tensor, spec: AffineSpec, alpha: torch.Tensor, z: torch.Tensor | None,
               shift: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = α · ((q << shift) − z). `shift` = c − r for an r-bit slice stored as r-bit codes of a c-bit grid
    (multiplying by 2^shift is exact in floating point, so a stored slice dequantizes bit-identically to
    slicing the parent on the fly)."""
    qg = grouped(q, spec.group_size).float() * float(1 << shift)  # (R, G, g)
    zz = zero_point(spec, z)
    zz = zz.unsqueeze(-1) if isinstance(zz, torch.Tensor) else zz
    return (alpha.float().unsqueeze(-1) * (qg - zz)).reshape(q.shape).to(dtype)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


round_ste = _RoundSTE.apply


def fake_quant(W: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """Quantize-dequantize with a straight-through round: forward equals `dequantize(quantize(W))`,
    backward passes gradients through round (and through the clamp's interior)."""
    alpha, z = fit(W.detach(), spec)
    Wg = grouped(W, spec.group_size)  # (R, G, g)
    a = alpha.float().unsqueeze(-1)
    zz = zero_point(spec, z)
    zz = zz.unsqueeze(-1) if isinstance(zz, torch.Tensor) else zz
    q = round_ste(Wg / a + zz).clamp(0, spec.qmax)
    return (a * (q - zz)).reshape(W.shape).to(W.dtype)


class AffineGrid:
    """Column hooks for GPTQ-style solvers on the affine grid (fit params on a set of columns / quantize a column
    to codes / dequantize codes to what the error feedback sees / stack the params for storage), with the same
    float ops as `fit/quantize/dequantize`, so GPTQ with H = I reproduces RTN bit for bit.

    serve_bits r < spec.bits: the nested grid, whose codes are c-bit and whose dequantized value is the r-bit
    slice (as `kernels.reference` serves it). widths: Matryoshka GPTQ — codes minimise the λ-weighted error of
    every slice in `widths` (grids/nested.MultiWidth) and the feedback sees their λ-mean reconstruction."""

    def __init__(self, spec: AffineSpec, serve_bits: int | None = None, widths=None, lambdas=None):
        self.spec, self.r = spec, serve_bits or spec.bits
        self.multi = None if widths is None else MultiWidth(spec.bits, widths, lambdas)

    def fit(self, W: torch.Tensor, gamma=None):
        """Params for the columns W (out, k): (alpha, z) each (out, 1) — or (1, 1) for a per-tensor grid."""
        spec = AffineSpec(self.spec.bits, -1 if self.spec.group_size == -1 else None, self.spec.symmetric, self.spec.int_zero)
        if gamma is not None and gamma.dim() == 3:  # (2, out, 1): separate ratios for max and min
            return fit(W, spec, gamma[0], gamma[1])
        return fit(W, spec, gamma, gamma)

    def prepare(self, params):
        """(α, z) as stored -> the float columns the loop uses: α (out,) or (1,), zero point (out,) or float."""
        alpha, z = params
        return alpha.float()[:, 0], float(1 << (self.spec.bits - 1)) if z is None else z.float()[:, 0]

    def quantize(self, w: torch.Tensor, p) -> torch.Tensor:
        a, zz = p
        if self.multi is not None:
            return self.multi.round(w / a + zz)  # (out,) c-bit codes best for all widths at once
        return torch.round(w / a + zz).clamp_(0, self.spec.qmax)  # (out,) codes as float, as `quantize`

    def dequantize(self, q: torch.Tensor, p) -> torch.Tensor:
        a, zz = p
        if self.multi is not None:
            return a * (self.multi.mean(q) - zz)  # (out,) the λ-mean of the slices' reconstructions
        c, r = self.spec.bits, self.r
        t = q if r == c else slice_codes(q.to(torch.uint8), c, r).float() * float(1 << (c - r))
        return a * (t - zz)  # (out,), as `dequantize`

    def stack(self, params):
        """Per-group params -> the stored (alpha, z), each (R, G)."""
        return torch.cat([p[0] for p in params], 1), None if params[0][1] is None else torch.cat([p[1] for p in params], 1)
