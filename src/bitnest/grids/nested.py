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
