"""Data-adaptive clipping for the affine grid: per output row, the ratio γ ∈ (0, 1] shrinking the MinMax
range (α = (γ·max − γ·min)/(2^b − 1)) that minimizes the layer's output error on calibration data,

    ‖X Wᵀ − X Ŵᵀ‖² / n  =  ½ · Σ_rows ΔW_r H ΔW_rᵀ,    H = 2XᵀX/n,  ΔW = W − Ŵ(γ).

Rows are independent, so the search is one grid search per row (all of a row's groups share its γ).
"""
from __future__ import annotations

import torch

from ..grids.affine import AffineSpec, dequantize, fit, grouped, quantize
from ..grids.nested import slice_codes

RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 … 0.5


def output_error(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row ΔW_r H ΔW_rᵀ, (out,)."""
    D = (W.float() - What.float())  # (out, in)
    return ((D @ H.float()) * D).sum(1)


def qdq(W: torch.Tensor, spec: AffineSpec, gamma: torch.Tensor | None, serve_bits: int | None = None) -> torch.Tensor:
    """Ŵ (out, in) of the grid fitted with clipping γ (R, G); served at `serve_bits` for a nested grid."""
    alpha, z = fit(W, spec, gamma, gamma)
    q = quantize(W, spec, alpha, z)  # (out, in) uint8
    r = serve_bits or spec.bits
    if r != spec.bits:
        q = slice_codes(q, spec.bits, r)
    return dequantize(q, spec, alpha, z, shift=spec.bits - r)


@torch.no_grad()
def search_clip(W: torch.Tensor, H: torch.Tensor | None, spec: AffineSpec, serve_bits: int | None = None,
                ratios=RATIOS) -> torch.Tensor:
    """γ (R, G) per row minimizing the output error (H = None: the weight MSE). Per-tensor grids get one γ."""
    W = W.detach().float()  # (out, in)
    R, G, _ = grouped(W, spec.group_size).shape
    best_err, best = None, torch.ones(R, G, device=W.device)
    for r in ratios:
        gamma = torch.full((R, G), r, device=W.device)
        What = qdq(W, spec, gamma, serve_bits)  # (out, in)
        err = output_error(W, What, H) if H is not None else ((W - What) ** 2).sum(1)  # (out,)
        if R == 1:
            err = err.sum().reshape(1)  # per tensor: one γ for the whole matrix
        if best_err is None:
            best_err = err
            continue
        better = err < best_err  # (R,)
        best_err = torch.where(better, err, best_err)
        best[better] = r
    return best
