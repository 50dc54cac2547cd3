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


def qdq(W: torch.Tensor, spec: AffineSpec, gamma: torch.Tensor | None, serve_bits: int | None = None,
        multi=None) -> list[tuple[float, torch.Tensor]]:
    """[(λ, Ŵ (out, in))] of the grid fitted with clipping γ (R, G): one (1, Ŵ) served at `serve_bits` (a nested
    grid's slice), or with `multi` (grids/nested.MultiWidth) one per width, codes rounded for all widths."""
    alpha, z = fit(W, spec, gamma, gamma)
    q = quantize(W, spec, alpha, z, multi)  # (out, in) uint8
    widths = [(serve_bits or spec.bits, 1.0)] if multi is None else list(zip(multi.widths, multi.lambdas))
    c = spec.bits
    return [(lam, dequantize(q if r == c else slice_codes(q, c, r), spec, alpha, z, shift=c - r)) for r, lam in widths]


@torch.no_grad()
def search_clip(W: torch.Tensor, H: torch.Tensor | None, spec: AffineSpec, serve_bits: int | None = None,
                ratios=RATIOS, multi=None) -> torch.Tensor:
    """γ (R, G) per row minimizing the output error (H = None: the weight MSE). Per-tensor grids get one γ.
    `multi`: slice-aware clipping — the λ-weighted sum of every width's error (Matryoshka GPTQ)."""
    W = W.detach().float()  # (out, in)
    R, G, _ = grouped(W, spec.group_size).shape
    best_err, best = None, torch.ones(R, G, device=W.device)
    for r in ratios:
        gamma = torch.full((R, G), r, device=W.device)
        err = sum(lam * (output_error(W, What, H) if H is not None else ((W - What) ** 2).sum(1))
                  for lam, What in qdq(W, spec, gamma, serve_bits, multi))  # (out,)
        if R == 1:
            err = err.sum().reshape(1)  # per tensor: one γ for the whole matrix
        if best_err is None:
            best_err = err
            continue
        better = err < best_err  # (R,)
        best_err = torch.where(better, err, best_err)
        best[better] = r
    return best
