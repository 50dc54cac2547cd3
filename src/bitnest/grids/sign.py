"""Sign grids: W ≈ Sign(W) ⊙ (a bᵀ) — OneBit's sign matrix with two value vectors (methods.md §2).

Conventions:
  - Sign(w) = +1 for w ≥ 0 and −1 for w < 0 (never 0: a sign is one bit). The stored code is 1 for a
    negative weight and 0 otherwise (the reference code's layout), packed 8 per byte by formats.packing.
  - SVID (sign-value-independent decomposition): |W| ≈ a bᵀ with a ∈ R^out (→ h, the output-side vector)
    and b ∈ R^in (→ g, the input-side vector), a rank-1 fit by SVD or by NMF. For a non-negative matrix
    the best rank-1 fit is non-negative (Perron–Frobenius), so both give the same optimum; they differ
    in how they get there. a and b are balanced (‖a‖ = ‖b‖) so both sit well inside float16's range.

Bits, "as the paper counts": an (out, in) layer stores out·in sign bits + (out + in)·16 bits of value
vectors; the paper divides by out·in + out + in *parameters* (1.0073 for 4096×4096), while bitnest's
bits-per-weight divides by the out·in weights it replaced (1.0078).
"""
from __future__ import annotations

import torch

from ..errors import BitnestError
from ..formats.packing import pack, unpack

VALUE_BITS = 16  # g and h are stored as float16
BACKWARDS = ("tanh", "ste", "clipped")


def sign(W: torch.Tensor) -> torch.Tensor:
    """±1 in W's dtype; Sign(0) = +1."""
    return torch.where(W < 0, -1.0, 1.0).to(W.dtype)


def sign_codes(W: torch.Tensor) -> torch.Tensor:
    """One code per weight, uint8: 1 where W < 0, 0 where W ≥ 0."""
    return (W < 0).to(torch.uint8)


def codes_to_sign(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `sign_codes` on the signs: 0 → +1, 1 → −1."""
    return (1 - 2 * codes.to(torch.int8)).to(dtype)


def pack_signs(W: torch.Tensor) -> torch.Tensor:
    """(out, in) float -> (out, ceil(in/8)) uint8, bit i of a row = sign code of weight i (LSB first)."""
    return pack(sign_codes(W), 1)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, ceil(in/8)) uint8 -> (out, in) ±1 in `dtype`."""
    return codes_to_sign(unpack(packed, 1, in_features), dtype)


class _SignSTE(torch.autograd.Function):
    """Sign forward; a surrogate gradient backward.

    tanh:    grad · (1.001 − tanh²(w)) — the OneBit reference code (tanh's derivative plus 0.001, so a
             saturated latent weight still moves)
    ste:     grad (identity straight-through, as BitNet)
    clipped: grad · 1[|w| ≤ 1] (hardtanh straight-through)
    """

    @staticmethod
    def forward(ctx, W, backward: str):
        ctx.save_for_backward(W)
        ctx.kind = backward
        return sign(W)

    @staticmethod
    def backward(ctx, grad):
        (W,) = ctx.saved_tensors
        if ctx.kind == "tanh":
            return grad * (1.001 - torch.tanh(W) ** 2), None
        if ctx.kind == "clipped":
            return grad * (W.abs() <= 1).to(grad.dtype), None
        return grad, None


def sign_ste(W: torch.Tensor, backward: str = "tanh") -> torch.Tensor:
    if backward not in BACKWARDS:
        raise BitnestError(f"unknown sign backward {backward!r}; choose one of {', '.join(BACKWARDS)}")
    return _SignSTE.apply(W, backward)


# ---------------------------------------------------------------------------------------------------------
# SVID: rank-1 fits of |W|


def _balanced(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale so ‖a‖ = ‖b‖ without changing a bᵀ."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return a, b
    s = (nb / na).sqrt()
    return a * s, b / s


def rank1_svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 Frobenius fit A ≈ a bᵀ from the top singular triple: a = √σ u, b = √σ v.

    For A ≥ 0 the top singular vectors can be taken non-negative (Perron–Frobenius); the signs are fixed
    so the sums are positive and float round-off below zero is clipped."""
    A = A.double()
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    u, v, s = U[:, 0], Vh[0], S[0]  # (out,), (in,), ()
    if u.sum() < 0:
        u, v = -u, -v
    a, b = (s.sqrt() * u), (s.sqrt() * v)
    if bool((A >= 0).all()):
        a, b = a.clamp_min(0), b.clamp_min(0)
    return a, b


def nmf(A: torch.Tensor, rank: int = 1, iters: int = 200, tol: float = 1e-7, seed: int = 0,
        eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative matrix factorization A ≈ U V (U: (out, r), V: (r, in)) by Lee–Seung multiplicative
    updates for the Frobenius loss, from a seeded random start (as sklearn's init="random"). Stops when
    the relative loss improvement falls below `tol`."""
    if (A < 0).any():
        raise BitnestError("NMF needs a non-negative matrix")
    A = A.double()
    out, inp = A.shape
    gen = torch.Generator().manual_seed(seed)
    scale = (A.mean() / rank).clamp_min(eps).sqrt()
    U = (torch.rand(out, rank, generator=gen, dtype=torch.float64) * scale).to(A.device)  # (out, r)
    V = (torch.rand(rank, inp, generator=gen, dtype=torch.float64) * scale).to(A.device)  # (r, in)
    prev = None
    for _ in range(iters):
        V = V * (U.T @ A) / (U.T @ U @ V).clamp_min(eps)  # (r, in)
        U = U * (A @ V.T) / (U @ (V @ V.T)).clamp_min(eps)  # (out, r)
        loss = torch.linalg.matrix_norm(A - U @ V).item()
        if prev is not None and prev - loss <= tol * max(prev, eps):
            break
        prev = loss
    return U, V


def svid(W: torch.Tensor, method: str = "nmf", **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with |W| ≈ a bᵀ, a: (out,) → h, b: (in,) → g; float32, balanced."""
    A = W.detach().abs()
    if method == "svd":
        a, b = rank1_svd(A)
    elif method == "nmf":
        U, V = nmf(A, rank=1, **kw)
        a, b = U[:, 0], V[0]
    else:
        raise BitnestError(f"unknown SVID method {method!r}; choose svd or nmf")
    a, b = _balanced(a, b)
    return a.float(), b.float()


def proposition2_errors(W: torch.Tensor) -> tuple[float, float]:
    """The two sides of the paper's Proposition 2, in the Frobenius norm:
    (‖W − Sign(W) ⊙ a bᵀ‖ with a bᵀ the best rank-1 fit of |W|,  ‖W − u vᵀ‖ with u vᵀ the best rank-1 fit
    of W). The first is never larger: for c ≥ 0, |w − Sign(w)·c| = ||w| − c|, so the first is the rank-1 fit
    error of |W| (whose best fit is non-negative), and |u||v|ᵀ is a candidate with ||w| − |x|| ≤ |w − x|."""
    W = W.double()
    a, b = rank1_svd(W.abs())
    u, v = rank1_svd(W)
    return (W - svid_weight(W, a, b)).norm().item(), (W - u[:, None] * v[None, :]).norm().item()


def svid_weight(W: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The weight a sign layer with value vectors (a, b) computes with: Sign(W) ⊙ (a bᵀ), (out, in)."""
    return sign(W) * (a[:, None] * b[None, :])


# ---------------------------------------------------------------------------------------------------------
# Bits accounting


def sign_layer_bits(out_features: int, in_features: int, value_bits: int = VALUE_BITS) -> int:
    """Every stored bit of a OneBit layer: out·in signs + (out + in) value-vector entries."""
    return out_features * in_features + (out_features + in_features) * value_bits


def paper_bits_per_parameter(out_features: int, in_features: int, value_bits: int = VALUE_BITS) -> float:
    """Bits per parameter as the OneBit paper counts (signs and value-vector entries are all parameters):
    4096×4096 → 16,908,288 / 16,785,408 = 1.0073."""
    n_params = out_features * in_features + out_features + in_features
    return sign_layer_bits(out_features, in_features, value_bits) / n_params


def bits_per_weight(out_features: int, in_features: int, value_bits: int = VALUE_BITS) -> float:
    """Bits per original weight (bitnest's bits_per_weight): 4096×4096 → 1.0078."""
    return sign_layer_bits(out_features, in_features, value_bits) / (out_features * in_features)
