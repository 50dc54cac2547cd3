"""Data-adaptive clipping for the affine grid: per output row, the ratio γ ∈ (0, 1] shrinking the MinMax
range (α = (γ·max − γ·min)/(2^b − 1)) that minimizes the layer's output error on calibration data,

    ‖X Wᵀ − X Ŵᵀ‖² / n  =  ½ · Σ_rows ΔW_r H ΔW_rᵀ,    H = 2XᵀX/n,  ΔW = W − Ŵ(γ).

Rows are independent, so the search is one grid search per row (all of a row's groups share its γ). Scored on H's
diagonal blocks only (`block`), groups decouple too and each (row, group) gets its own γ (AWQ's auto-clip objective).
For a nested parent (Matryoshka GPTQ) the search is slice-aware (`multi`) and may also stretch the max side (`tops`).
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
    """[(λ, Ŵ (out, in))] of the grid fitted with clipping γ (R, G) — or (2, R, G): separate ratios for the max and
    the min — one (1, Ŵ) served at `serve_bits` (a nested grid's slice), or with `multi` (grids/nested.MultiWidth)
    one per width, codes rounded for all widths."""
    return list(_qdq(W, spec, gamma, serve_bits, multi))


def _qdq(W, spec, gamma, serve_bits=None, multi=None):
    """`qdq` one width at a time (one Ŵ alive: the search's memory is a few copies of W, not one per width)."""
    gmax, gmin = (gamma, gamma) if gamma is None or gamma.dim() == 2 else (gamma[0], gamma[1])
    alpha, z = fit(W, spec, gmax, gmin)
    q = quantize(W, spec, alpha, z, multi)  # (out, in) uint8
    widths = [(serve_bits or spec.bits, 1.0)] if multi is None else list(zip(multi.widths, multi.lambdas))
    c = spec.bits
    for r, lam in widths:
        yield lam, dequantize(q if r == c else slice_codes(q, c, r), spec, alpha, z, shift=c - r)


def block_error(W: torch.Tensor, What: torch.Tensor, Hb: torch.Tensor | None, b: int) -> torch.Tensor:
    """Per (row, block of b inputs) ΔW_rj H_jj ΔW_rjᵀ, H_jj = Hb[j] the block's diagonal block of H; (R, n/b).
    Hb None: the squared weight error per block."""
    D = (W.float() - What.float()).reshape(W.shape[0], -1, b)  # (R, G, b)
    if Hb is None:
        return (D * D).sum(-1)
    return (torch.einsum("rgi,gij->rgj", D, Hb) * D).sum(-1)


def diagonal_blocks(H: torch.Tensor, b: int) -> torch.Tensor:
    """H's diagonal b × b blocks, (n/b, b, b)."""
    return torch.stack([H[j:j + b, j:j + b] for j in range(0, H.shape[0], b)]).float()


@torch.no_grad()
def search_clip(W: torch.Tensor, H: torch.Tensor | None, spec: AffineSpec, serve_bits: int | None = None,
                ratios=RATIOS, multi=None, tops=(1.0,), block: int | None = None,
                coarse: bool = False) -> torch.Tensor:
    """γ (R, G) per row minimizing the output error (H = None: the weight MSE). Per-tensor grids get one γ.

    `multi`: slice-aware clipping — the λ-weighted sum of every width's error (Matryoshka GPTQ).
    `tops`: also stretch the max side by each factor t ≥ 1 (γ_max = t·γ, γ_min = γ; asymmetric grids): a nested
    grid's r-bit slice tops out at (2^r − 1)·2^(c−r) of the parent's 2^c − 1 (int2 of int8: 192 of 255), so a
    parent stretched by up to 4/3 (256/192) lets the narrow slices span the weights. Returns (2, R, G) (γ_max, γ_min).
    `block`: score on H's diagonal blocks of `block` inputs only (the cross-block terms of H dropped: AWQ's
    auto-clip objective, out·in·block per candidate instead of out·in²); with groups, block = the group size and
    γ is chosen per (row, group). Per-tensor grids, and per-row grids whose input width is not a multiple of `block`,
    are scored on all of H.
    `coarse`: every 4th ratio (with every stretch) first, then ±2 and ±1 steps around each entry's best — 3× fewer
    candidates, the full grid's choice wherever the error is unimodal in the ratio."""
    W = W.detach().float()  # (out, in)
    R, G, g = grouped(W, spec.group_size).shape
    tops = (1.0,) if spec.symmetric else tuple(tops)
    if block is not None and R > 1:
        b = g if G > 1 else block if W.shape[1] % block == 0 else W.shape[1]
        Hb = None if H is None else diagonal_blocks(H.float(), b)  # (n/b, b, b)
        per = G > 1  # one γ per (row, group), else per row

        def err_of(gamma):  # (R, G) or (R, 1)
            e = sum(lam * block_error(W, What, Hb, b) for lam, What in _qdq(W, spec, gamma, serve_bits, multi))
            return e if per else e.sum(1, keepdim=True)
    else:
        per = False

        def err_of(gamma):
            e = sum(lam * (output_error(W, What, H) if H is not None else ((W - What) ** 2).sum(1))
                    for lam, What in _qdq(W, spec, gamma, serve_bits, multi))  # (out,)
            return e.sum().reshape(1, 1) if R == 1 else e[:, None]

    shape = (R, G) if per else (R, 1)
    rt = torch.tensor(ratios, dtype=torch.float32, device=W.device)
    tt = torch.tensor(tops, dtype=torch.float32, device=W.device)
    best_err, bi, bj = None, None, None

    def visit(i, j):  # i, j: (shape) indices into ratios and tops, per row (or row and group)
        nonlocal best_err, bi, bj
        cand = torch.stack([tt[j] * rt[i], rt[i]])  # (2, *shape): γ_max, γ_min
        err = err_of(cand.expand(2, R, G) if not per else cand)
        if best_err is None:
            best_err, bi, bj = err, i, j
            return
        better = err < best_err
        best_err, bi, bj = torch.where(better, err, best_err), torch.where(better, i, bi), torch.where(better, j, bj)

    full = lambda k: torch.full(shape, k, dtype=torch.long, device=W.device)
    if not coarse or len(ratios) < 9:
        for i in range(len(ratios)):
            for j in range(len(tops)):
                visit(full(i), full(j))
    else:  # every 4th ratio with every stretch, then ±2 and ±1 ratio steps around each entry's best
        for i in range(0, len(ratios), 4):
            for j in range(len(tops)):
                visit(full(i), full(j))
        for step in (2, 1):
            ci, cj = bi.clone(), bj.clone()
            for d in (-step, step):
                visit((ci + d).clamp(0, len(ratios) - 1), cj)
    best = torch.stack([tt[bj] * rt[bi], rt[bi]]).expand(2, R, G).contiguous()  # (2, R, G)
    return best[0] if tops == (1.0,) else best
