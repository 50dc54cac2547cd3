"""Non-uniform grids: ŵ = s · T[q], q ∈ {0, …, 2^b − 1} an index into a sorted table T of 2^b levels.

Two families, one representation — a table (Rt, Gt, K) (Rt ∈ {1, R}, Gt ∈ {1, G}: shared or per group) and
an optional scale s (R, G), over the (R, G, g) groups of `affine.grouped`:
  - learned codebooks (k-means, Lloyd's algorithm): one table per row (per channel), per group, or one for
    the whole tensor (weight sharing: every weight is one of 2^b shared values); no scale.
  - fixed codebooks scaled per group by absmax: NormalFloat (QLoRA's NF4 construction, any width ≥ 2) and
    power-of-two levels ±2^−e (a multiply by a level is a shift).
Tables and scales are stored in float16 (16 bits per entry in bits accounting).
"""
from __future__ import annotations

import torch

from ..errors import BitnestError
from .affine import AffineSpec, fit, grouped, quantize

TABLE_DTYPE = torch.float16


def nf_levels(bits: int, offset: float = 0.9677083) -> torch.Tensor:
    """NormalFloat levels in [−1, 1] (K,): 2^(b−1) positive and 2^(b−1) − 1 negative N(0, 1) quantiles and an
    exact zero, normalized by the largest (QLoRA's create_normal_map; bits = 4 is NF4)."""
    if not 2 <= bits <= 8:
        raise BitnestError(f"NormalFloat codebooks need 2..8 bits, got {bits}")
    N = torch.distributions.Normal(0.0, 1.0)
    half = 1 << (bits - 1)
    pos = N.icdf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])  # (2^(b−1),)
    neg = -N.icdf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])  # (2^(b−1) − 1,)
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


def log_levels(bits: int) -> torch.Tensor:
    """Power-of-two levels ±2^−e, e = 0 … 2^(b−1) − 1 (K = 2^b, sorted; no exact zero: the smallest
    magnitude 2^−(2^(b−1)−1) stands in for it)."""
    e = torch.arange(1 << (bits - 1), dtype=torch.float32)
    m = torch.pow(2.0, -e)
    return torch.cat([-m, m]).sort().values


def assign(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level: x (R, G, g), table (Rt, Gt, K) sorted along K -> codes (R, G, g) int64."""
    R, G, g = x.shape
    T = table.float().expand(R, G, -1)  # (R, G, K)
    mid = (T[..., 1:] + T[..., :-1]) / 2  # (R, G, K − 1) decision boundaries
    return torch.searchsorted(mid.reshape(R * G, -1).contiguous(), x.reshape(R * G, g).contiguous()).reshape(R, G, g)


def lookup(codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """ŵ (R, G, g) float32 = s · T[q] for codes (R, G, g)."""
    R, G, g = codes.shape
    T = table.float().expand(R, G, -1)  # (R, G, K)
    v = torch.gather(T, 2, codes.long())  # (R, G, g)
    return v if scale is None else v * scale.float().unsqueeze(-1)


def absmax_scale(W: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """s (R, G) float16: the largest |w| of each group (the fixed codebooks span [−s, s])."""
    return grouped(W.float(), group_size).abs().amax(-1).clamp_min(1e-8).to(TABLE_DTYPE)


def fixed_codebook(W: torch.Tensor, levels: torch.Tensor, group_size: int | None):
    """codes (out, in) uint8, scale (R, G) float16, table (1, 1, K) float16 for a fixed normalized codebook."""
    table = levels.to(W.device, TABLE_DTYPE).reshape(1, 1, -1)  # (1, 1, K)
    s = absmax_scale(W, group_size)  # (R, G)
    x = grouped(W.float(), group_size) / s.float().unsqueeze(-1)  # (R, G, g) in [−1, 1]
    return assign(x, table).to(torch.uint8).reshape(W.shape), s, table


def _mse(x, table, codes, w=None):
    e = (x - lookup(codes, table)) ** 2  # (R, G, g)
    return (e if w is None else e * w).sum(-1)  # (R, G)


def _segment_sums(xs, ws, table):
    """Per level k: Σw, Σwx, Σwx² over the sorted values xs (R, G, g) nearest to table[k] (segments of xs)."""
    R, G, g = xs.shape
    T = table.float().expand(R, G, -1)  # (R, G, K)
    mid = (T[..., 1:] + T[..., :-1]) / 2  # (R, G, K − 1)
    b = torch.searchsorted(xs.reshape(R * G, g), mid.reshape(R * G, -1).contiguous(), right=True).reshape(R, G, -1)
    edges = torch.cat([torch.zeros_like(b[..., :1]), b, torch.full_like(b[..., :1], g)], -1)  # (R, G, K + 1)
    return [c.gather(-1, edges[..., 1:]) - c.gather(-1, edges[..., :-1]) for c in ws]  # 3 × (R, G, K)


def kmeans(W: torch.Tensor, bits: int, group_size: int | None = None, iters: int = 300,
           weights: torch.Tensor | None = None, table_dtype: torch.dtype = TABLE_DTYPE):
    """Lloyd's k-means on each group's weights, started from the uniform MinMax grid (RTN's levels and codes).

    Returns codes (out, in) uint8 and table (R, G, 2^b) in `table_dtype`. weights (out, in) ≥ 0 weigh the
    squared error (e.g. diag(H) per input: sensitivity-weighted clustering). 1-D Lloyd on sorted values:
    each cluster is a contiguous run, so an iteration is K binary searches into prefix sums. Each group keeps
    its best table; the last step compares it with the RTN start exactly, so the (weighted) MSE is never above
    RTN's when the table is stored exactly (table_dtype=float32); a float16 table adds only its rounding."""
    spec = AffineSpec(bits, group_size)
    alpha, z = fit(W, spec)
    x = grouped(W.float(), group_size)  # (R, G, g)
    w = None if weights is None else grouped(weights.float(), group_size)  # (R, G, g)
    k = torch.arange(1 << bits, dtype=torch.float32, device=W.device)
    zz = float(1 << (bits - 1)) if z is None else z.float().unsqueeze(-1)
    rtn_t = (alpha.float().unsqueeze(-1) * (k - zz)).to(table_dtype)  # (R, G, K): RTN's levels, as dequantize
    rtn_c = grouped(quantize(W, spec, alpha, z), group_size).long()  # (R, G, g): RTN's codes
    xs, order = x.double().sort(-1)  # (R, G, g)
    ws = torch.ones_like(xs) if w is None else w.double().gather(-1, order)
    pad = lambda t: torch.cat([torch.zeros_like(t[..., :1]), t.cumsum(-1)], -1)  # (R, G, g + 1) prefix sums
    cums = [pad(ws), pad(ws * xs), pad(ws * xs * xs)]
    table, best_t, best_e = rtn_t, rtn_t, None
    for _ in range(iters):
        Wk, Sk, Qk = _segment_sums(xs.float(), cums, table)  # (R, G, K) each
        c = table.double()
        e = (Qk - 2 * c * Sk + c * c * Wk).sum(-1)  # (R, G): weighted SSE of this table
        if best_e is None:
            best_e = e
        better = e < best_e
        best_t = torch.where(better.unsqueeze(-1), table, best_t)
        best_e = torch.where(better, e, best_e)
        new = torch.where(Wk > 0, Sk / Wk.clamp_min(1e-300), c).sort(-1).values.to(table_dtype)  # centroids
        if torch.equal(new, table):
            break
        table = new
    codes = assign(x, best_t)  # (R, G, g)
    keep = _mse(x, best_t, codes, w) < _mse(x, rtn_t, rtn_c, w)  # exact final check against RTN
    best_t = torch.where(keep.unsqueeze(-1), best_t, rtn_t)
    codes = torch.where(keep.unsqueeze(-1), codes, rtn_c)
    return codes.to(torch.uint8).reshape(W.shape), best_t


class CodebookGrid:
    """Column hooks for GPTQ (methods/gptq.py) on a codebook grid: kind "nf" | "log" (fixed levels × absmax per
    row of each group) or "kmeans" (a Lloyd table per row of each group, fitted on the original columns)."""

    def __init__(self, kind: str, bits: int, group_size: int | None):
        self.kind, self.bits, self.group_size = kind, bits, group_size
        self.spec = AffineSpec(bits, group_size)  # granularity only (GPTQ reads spec.group_size)
        self.levels = {"nf": nf_levels, "log": log_levels}[kind](bits) if kind != "kmeans" else None

    def fit(self, W: torch.Tensor, gamma=None):
        """(table, scale) for the columns W (out, k): table (R, 1, K), scale (R, 1) or None; R = out or 1."""
        if gamma is not None:
            raise BitnestError("clipping search is for the affine grid")
        g = -1 if self.group_size == -1 else None
        if self.kind == "kmeans":
            return kmeans(W, self.bits, g)[1], None
        return self.levels.to(W.device, TABLE_DTYPE).reshape(1, 1, -1), absmax_scale(W, g)

    def prepare(self, params):
        table, scale = params
        T = table.float()[:, 0]  # (R, K)
        return T, (T[:, 1:] + T[:, :-1]) / 2, None if scale is None else scale.float()[:, 0]  # levels, boundaries, s

    def quantize(self, w: torch.Tensor, p) -> torch.Tensor:
        T, mid, s = p
        x = w if s is None else w / s  # (out,)
        return (x.unsqueeze(1) > mid).sum(1).float()  # (out,) index of the nearest level, as `assign`

    def dequantize(self, q: torch.Tensor, p) -> torch.Tensor:
        T, mid, s = p
        v = T.expand(q.shape[0], -1).gather(1, q.long().unsqueeze(1))[:, 0]  # (out,)
        return v if s is None else v * s

    def stack(self, params):
        """Per-group params -> the stored tensors: table (R, G | 1, K), scale (R, G) or None."""
        if self.kind != "kmeans":
            return params[0][0], torch.cat([p[1] for p in params], 1)
        return torch.cat([p[0] for p in params], 1), None
