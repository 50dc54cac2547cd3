"""Integer arithmetic for integer-only linear layers (Jacob et al. 2018, gemmlowp / TFLite style).

  acc = Σ x_q · W_q (+ b_q)            int8 × int8 products, int32 accumulation (+ int32 bias)
  y_q = clamp(round(acc · M), ±127)    M = s_x · s_w / s_y, a real multiplier applied as M0 · 2^−k:
                                       (acc · M0 + 2^(k−1)) >> k, M0 an integer of P bits, k a right shift
No floating point between the int8 input and the int8 output. P = 24 (not gemmlowp's 31) so acc · M0 stays
below 2^53 for |acc| < 2^29 (any layer up to 33k inputs): the float64 simulation `simulate_requantize`
is then exact and the two paths can be compared bit for bit. 24 bits of M are far finer than int8 steps.
"""
from __future__ import annotations

import torch

P = 24  # bits of the integer multiplier M0: 2^(P−1) ≤ M0 < 2^P
QMAX = 127  # symmetric int8, [−127, 127]


def quantize_multiplier(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real multipliers M > 0 (…,) -> (M0 int64, k int64) with M ≈ M0 · 2^−k, 2^(P−1) ≤ M0 < 2^P, k ≥ 1."""
    M = M.double()
    e = torch.floor(torch.log2(M))
    k = (P - 1 - e).long()  # (…,)
    M0 = torch.round(M * torch.pow(2.0, k.double())).long()
    over = M0 >= (1 << P)  # rounding reached 2^P
    M0, k = torch.where(over, M0 // 2, M0), torch.where(over, k - 1, k)
    if (k < 1).any():
        raise ValueError("requantization multiplier ≥ 2^(P−1): the output scale is far too small")
    return M0, k


def multiplier_value(M0: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The exact real value M0 · 2^−k the integer path applies (float64)."""
    return M0.double() * torch.pow(2.0, -k.double())


def int8_matmul(x_q: torch.Tensor, W_q: torch.Tensor) -> torch.Tensor:
    """x_q (N, in) int8 · W_q (out, in)ᵀ int8 -> (N, out) int32, exact (torch._int_mm: int8 GEMM, int32
    accumulation). CUDA's kernel wants N > 16 and in, out multiples of 8: zero padding, which adds nothing."""
    N, n_in = x_q.shape
    out = W_q.shape[0]
    if x_q.is_cuda:
        up = lambda v, m: -(-v // m) * m
        Np, ip, op = max(24, up(N, 8)), up(n_in, 8), up(out, 8)
        x_q = torch.nn.functional.pad(x_q, (0, ip - n_in, 0, Np - N))
        W_q = torch.nn.functional.pad(W_q, (0, ip - n_in, 0, op - out))
    return torch._int_mm(x_q.contiguous(), W_q.T.contiguous())[:N, :out]


def requantize(acc: torch.Tensor, M0: torch.Tensor, k: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """int32 acc (N, out), per-channel M0, k (out,) -> int8 (N, out): round-half-up fixed-point multiply."""
    prod = acc.long() * M0 + (torch.ones_like(k) << (k - 1))  # (N, out) int64, exact
    return (prod >> k).clamp_(-qmax, qmax).to(torch.int8)  # arithmetic shift: floor


def simulate_requantize(acc: torch.Tensor, M0: torch.Tensor, k: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """The float64 simulation of `requantize`: clamp(floor(acc · M + ½)) with M = M0 · 2^−k."""
    return torch.floor(acc.double() * multiplier_value(M0, k) + 0.5).clamp_(-qmax, qmax)
