"""Matryoshka nesting: the r most significant bits of a c-bit code (MatQuant, methods.md §1, Eq. 6).

S(q, r) = clamp(round(q / 2^(c−r)), 0, 2^r − 1) · 2^(c−r)
Bit form: t = q >> (c−r); t += (q >> (c−r−1)) & 1; t = min(t, 2^r − 1). `slice_codes` returns t (the r-bit
code); multiply by 2^(c−r) (a left shift) to put it back on the parent's scale. Extra Precision MatQuant
drops the clamp, so t can reach 2^r (one extra level, stored sparsely).
"""
from __future__ import annotations

import torch

from ..errors import BitnestError


def slice_codes(q: torch.Tensor, c: int, r: int, clamp: bool = True) -> torch.Tensor:
    """c-bit codes -> r-bit codes t with S(q, r) = t · 2^(c−r). uint8 in, uint8 out (int16 if unclamped r=8)."""
    if not 1 <= r <= c <= 8:
        raise BitnestError(f"slice width r must be in 1..{c}, got {r}")
    if r == c:
        return q.clone()
    s = c - r
    qi = q.to(torch.int16)
    t = (qi >> s) + ((qi >> (s - 1)) & 1)  # round half up on the dropped bits
    if clamp:
        t = t.clamp_max((1 << r) - 1)
    return t.to(torch.uint8)


def S(q: torch.Tensor, c: int, r: int, clamp: bool = True) -> torch.Tensor:
    """The sliced code on the parent's c-bit scale (paper's S(q, r)), as int16."""
    return slice_codes(q, c, r, clamp).to(torch.int16) << (c - r)


def slice_ste(q_float: torch.Tensor, c: int, r: int, clamp: bool = True) -> torch.Tensor:
    """Differentiable S for training: q_float holds integer-valued c-bit codes (from a straight-through
    round); rounds q/2^(c−r) with a straight-through estimator, clamps, rescales. Matches `S` exactly in the
    forward (round half up, like the bit form, not torch's half-to-even)."""
    if r == c:
        return q_float
    step = float(1 << (c - r))
    x = q_float / step
    t = x + (torch.floor(x + 0.5) - x).detach()  # STE round-half-up
    if clamp:
        t = t.clamp(max=(1 << r) - 1)
    return t * step


# ------------------------------------------------------------------------------------ multi-width rounding


_CHUNK = 1 << 20  # elements per pass of MultiWidth.round


class MultiWidth:
    """The nested rounding objective of Matryoshka GPTQ (MatGPTQ, Kleinegger et al. 2026): the c-bit code q of
    a weight at u = w/α + z (its position on the parent's grid) that minimises the λ-weighted squared error of
    every served slice,

        q*(u) = argmin_q Σ_r λ_r (u − S(q, r))²  =  argmin_q  B_q − 2u·A_q,
        A_q = Σ_r λ_r S(q, r) / Λ,   B_q = Σ_r λ_r S(q, r)² / Λ,   Λ = Σ_r λ_r.

    Each q is a line in u, so q*(u) is the lower envelope of 2^c lines: computed once (convex-hull trick),
    then a weight's code is one `searchsorted` on the envelope's breakpoints — O(log 2^c) per weight instead of
    trying all 2^c codes. With λ only on r = c it is round-to-nearest on the c-bit grid. `mean(q)` = A_q is
    the λ-mean reconstruction whose error GPTQ spreads to later columns (the compensation that minimises the
    λ-weighted output error of all widths at once)."""

    def __init__(self, c: int, widths, lambdas=None):
        widths = tuple(int(r) for r in widths)
        lambdas = tuple(float(x) for x in (lambdas if lambdas is not None else [1.0] * len(widths)))
        if not widths or len(lambdas) != len(widths) or any(not 1 <= r <= c for r in widths):
            raise BitnestError(f"widths must be in 1..{c} with one λ each, got {widths} / {lambdas}")
        if any(not x >= 0 for x in lambdas) or not any(x > 0 for x in lambdas):
            raise BitnestError(f"λ must be non-negative and not all zero, got {lambdas}")
        self.c, self.widths, self.lambdas = c, widths, lambdas
        q = torch.arange(1 << c, dtype=torch.uint8)
        T = torch.stack([S(q, c, r).double() for r in widths])  # (W, 2^c): slice values on the parent's scale
        lam = torch.tensor(lambdas, dtype=torch.float64)[:, None] / sum(lambdas)  # (W, 1)
        self.A, self.B = (lam * T).sum(0), (lam * T * T).sum(0)  # (2^c,) each
        self.codes, self.breaks = self._envelope()
        self._lut = self._bins()
        self.T = T.float()  # (W, 2^c)
        # round_apart: positions and slices centred on the grid's middle (float32 cost terms 4× smaller)
        mid = float(1 << (c - 1))
        Tc = T - mid
        self._apart = ((lam * Tc * Tc).sum(0, keepdim=True).float(), (lam * Tc).float(), mid)
        # codes that slice alike for every width of positive λ tie; round_apart takes the one nearest the widest width's
        # position: each code's class of alike codes is an interval (the slices are monotone in q), [lo, hi] per code
        live = [k for k, x in enumerate(lambdas) if x > 0]
        key = [tuple(col[k] for k in live) for col in T.T.tolist()]
        lo, hi = list(range(1 << c)), list(range(1 << c))
        for q_ in range(1, 1 << c):
            if key[q_] == key[q_ - 1]:
                lo[q_] = lo[q_ - 1]
        for q_ in range((1 << c) - 2, -1, -1):
            if key[q_] == key[q_ + 1]:
                hi[q_] = hi[q_ + 1]
        self._alike = None if c in [widths[k] for k in live] else (torch.tensor(lo, dtype=torch.float32),
                                                                  torch.tensor(hi, dtype=torch.float32))
        self._on = {}  # device -> round_apart's tables there (GPTQ calls it once per column)

    def _envelope(self):
        """Codes on the lower envelope of the lines B_q − 2u·A_q, by increasing u, and the u where each hands
        over to the next."""
        A, B = self.A.tolist(), self.B.tolist()
        best: dict[float, int] = {}  # equal slopes: only the lowest line can be minimal
        for q in range(len(A)):
            if A[q] not in best or B[q] < B[best[A[q]]]:
                best[A[q]] = q
        order = [best[a] for a in sorted(best)]  # increasing A: the minimum at small u comes first
        cross = lambda i, j: (B[j] - B[i]) / (2 * (A[j] - A[i]))  # u where lines i and j are equal
        hull: list[int] = []
        for q in order:
            while len(hull) >= 2 and cross(hull[-2], q) <= cross(hull[-2], hull[-1]):
                hull.pop()  # the last line is never strictly below both neighbours
            hull.append(q)
        breaks = [cross(hull[k], hull[k + 1]) for k in range(len(hull) - 1)]
        return torch.tensor(hull, dtype=torch.uint8), torch.tensor(breaks, dtype=torch.float64)

    def _bins(self):
        """A lookup for `round`: bins of width a third of the closest breakpoint spacing over the breakpoints' span,
        each holding the count of breakpoints below its start, so a weight's envelope index is one gather and two
        comparisons (searchsorted took 60 % of the slice-aware clip search). For float32 positions each breakpoint b
        is compared through up(b), the smallest float32 above b: b < u ⇔ u ≥ up(b), exact, all in float32.
        None when the spacing needs > 2^20 bins."""
        b = self.breaks
        if len(b) < 2:
            return None
        w = float((b[1:] - b[:-1]).min()) / 3
        if w < 8 * float(b.abs().max()) * 2.0 ** -23:  # breakpoints within a few float32 steps: the bins cannot tell
            return None
        n = int((float(b[-1]) - float(b[0])) / w) + 2 if w > 0 else 1 << 30
        if n > 1 << 20:
            return None
        lo = float(b[0])
        counts = torch.searchsorted(b, lo + w * torch.arange(n, dtype=torch.float64))  # (n,) breakpoints below each start
        inf = torch.tensor([float("inf")], dtype=torch.float64)
        pad = torch.cat([-inf, b, inf])  # (len + 2,): index i + 1 is breakpoint i
        up = pad.float()
        up = torch.where(up.double() > pad, up, up.nextafter(torch.tensor(float("inf"))))  # smallest float32 > b
        return lo, w, counts, pad, up

    def round(self, u: torch.Tensor) -> torch.Tensor:
        """q*(u) for every element of u (any shape, real-valued positions on the parent grid), as float codes:
        codes[#breakpoints < u], the same index torch.searchsorted gives.
        A bin index computed in floating point is off by at most one bin: the count at the bin's start then differs
        from the true one by at most one breakpoint (a third of the spacing per bin), which the two comparisons mend."""
        if self._lut is None:
            idx = torch.searchsorted(self.breaks.to(u.device), u.double().contiguous())
            return self.codes.to(u.device)[idx].to(u.dtype)
        lo, w, counts, pad, up = (x.to(u.device) if isinstance(x, torch.Tensor) else x for x in self._lut)
        if not u.isfinite().all():  # as searchsorted places them: NaN and +inf past the last breakpoint, −inf first
            u = torch.nan_to_num(u, nan=float(pad[-2]) + 1, posinf=float(pad[-2]) + 1, neginf=lo - 1)
        if u.numel() > _CHUNK:  # bounded temporaries (several int64 copies of u) and cache-sized passes
            flat = u.reshape(-1)
            return torch.cat([self.round(flat[i:i + _CHUNK]) for i in range(0, flat.numel(), _CHUNK)]).reshape(u.shape)
        if u.dtype != torch.float32:
            u, pad_ = u.double(), pad
        else:
            pad_ = up  # b < u ⇔ u ≥ up(b) for float32 u
        k = ((u - lo) * (1 / w)).floor_().clamp_(0, len(counts) - 1).long()
        i = counts[k]
        below, above = pad_[i + 1], pad_[i]  # the breakpoint at/after the bin's start, the one before it
        if pad_ is up:
            idx = i + (u >= below).long() - (u < above).long()
        else:
            idx = i + (below < u).long() - (above >= u).long()
        return self.codes.to(u.device)[idx].to(u.dtype)

    def round_apart(self, U: torch.Tensor) -> torch.Tensor:
        """The c-bit code of each column of U (W, n) — width r's own position on the parent grid in row r, in the order
        of `widths` — minimising Σ_r λ_r (u_r − S(q, r))², as float codes (n,). With equal rows it minimises what
        `round` does (to float32 rounding of the objective); Matryoshka GPTQ with one compensated copy of W per width
        (methods/gptq.gptq_nested) gives each width its own row. Exact over all 2^c codes: the objective is
        B_q − 2 Σ_r λ_r u_r S(q, r) + const, one (n, W) × (W, 2^c) product."""
        B, LT, mid, lo, hi, _ = self._tables(U.device)
        top = float(1 << self.c)  # far outside the grid every position has the same best code: NaN and ±inf made finite
        U = U.float().nan_to_num(nan=top, posinf=top, neginf=-top).clamp(-top, 2 * top)  # as `round` places them
        q = torch.addmm(B, U.T - mid, LT, alpha=-2).argmin(1)  # (n, 2^c) objective -> (n,)
        if lo is not None:  # the parent is not a width: of the alike codes, the nearest to the widest's position
            wide = max(range(len(self.widths)), key=lambda k: self.widths[k])
            return torch.round(U[wide]).clamp_(lo[q], hi[q])
        return q.float()

    def slices(self, q: torch.Tensor) -> torch.Tensor:
        """S(q, r) for every width, (W, *q.shape), on the parent's scale, float32."""
        return self._tables(q.device)[-1][:, q.long()]

    def _tables(self, device) -> tuple:
        """round_apart's and slices' tables on `device`, moved once (GPTQ calls both once per column):
        (B, λ·T centred, mid, alike lo, alike hi, T)."""
        if device not in self._on:
            self._on[device] = tuple(x.to(device) if isinstance(x, torch.Tensor) else x
                                     for x in (*self._apart, *(self._alike or (None, None)), self.T))
        return self._on[device]

    def mean(self, q: torch.Tensor) -> torch.Tensor:
        """A_q: the λ-mean of the slices of codes q on the parent's scale (same dtype as q if floating)."""
        dt = q.dtype if q.is_floating_point() else torch.float32
        return self.A.to(q.device, dt)[q.long()]

    def objective(self, u: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Σ_r λ_r (u − S(q, r))² / Λ, elementwise (the value `round` minimises)."""
        A, B = self.A.to(u.device)[q.long()], self.B.to(u.device)[q.long()]
        return (B - 2 * u.double() * A + u.double() ** 2).to(u.dtype)
