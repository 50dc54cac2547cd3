"""GPTQ (Frantar et al. 2023; IST-DASLab/gptq): quantize W column by column, spreading each column's
error over the columns not yet quantized through the inverse Hessian H⁻¹ of the layer's input, H = 2XᵀX/n.

Written once against a grid (fit params on a set of columns / quantize a column to codes / dequantize
codes to what the layer computes with / stack the params for storage), so the same loop serves the affine
grid at any width, the nested Matryoshka int8 grid (`nested=True`: c-bit codes are stored, the r-bit slice
is what the error feedback sees, so the served r-bit model is the GPTQ-optimized one), and the codebook
grids (`grid="nf" | "log" | "kmeans"`, grids/codebook.py, stored as CodebookLinear). Matryoshka GPTQ runs
either that loop on the multi-width grid (`compensation="shared"`, the paper's) or `gptq_nested`, one compensated
copy of W per served width (the default).

Act-order with groups uses *static groups*: each group's scale and zero are fitted on the original W before
the column loop, so group j's params are those of input columns [j·g, (j+1)·g) whatever order the columns
are quantized in. The packed layer stays the plain QuantLinear (no g_idx). Without act-order, each group's
params are fitted when the loop reaches it, on the error-updated columns (the paper's default).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calib.data import CalibOptions
from ..calib.driver import calibrated
from ..errors import BitnestError
from ..grids.affine import AffineGrid
from ..grids.codebook import CodebookGrid
from ..nn.codebook import CodebookLinear
from ..nn.qlinear import QuantLinear
from . import QuantConfig, register


GRIDS = ("affine", "nf", "log", "kmeans")


def gptq(W: torch.Tensor, H: torch.Tensor, grid: "AffineGrid | CodebookGrid", *, blocksize: int = 128, percdamp: float = 0.01,
         act_order: bool = True, static_groups: bool | None = None, gamma: torch.Tensor | None = None):
    """Codes Q (out, in) uint8 and the grid's stored params (affine: alpha, z each (R, G)) for W (out, in).

    gamma (R, G), or (2, R, G) for separate max / min ratios: clipping ratios applied when fitting (data-adaptive
    clipping, calib/clip.py)."""
    W = W.detach().float()  # (out, in): the caller's when float32 (_ordered copies it: no extra copy at the peak)
    out, n = W.shape
    g = grid.spec.group_size
    g = None if g in (None, -1) or g >= n else g
    static = act_order if static_groups is None else static_groups
    gam = (lambda j: None) if gamma is None else (lambda j: gamma[..., j:j + 1])
    if g is None or static:
        params = _static_params(W, grid, g, gam)
    else:
        params = []
        blocksize = g * max(1, blocksize // g)  # a group never straddles two blocks
    W, Hinv, perm = _ordered(W, H, act_order, percdamp)
    Wt, Q = W.T.contiguous(), torch.zeros(n, out, device=W.device)  # (in, out): a column is a contiguous row
    cols, cur, p = perm.tolist(), None, None
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, Hinv1 = Wt[i1:i2].clone(), Hinv[i1:i2, i1:i2]  # (B, out), (B, B)
        Err1 = torch.zeros_like(W1)  # (B, out)
        for i in range(i2 - i1):
            col = cols[i1 + i]
            if g is not None and not static and col % g == 0:
                params.append(grid.fit(W1[i:i + g].T, gam(col // g)))
            j = 0 if g is None else col // g
            if j != cur:
                cur, p = j, grid.prepare(params[j])
            w, d = W1[i], Hinv1[i, i]  # (out,), scalar
            q = grid.quantize(w, p)  # (out,)
            Q[i1 + i] = q
            err = (w - grid.dequantize(q, p)).div_(d)  # (out,)
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # W1 -= Hinv1[i, i:] ⊗ err: the error spread forward
            Err1[i] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ Err1  # (in − i2, out): the block's error, lazily, to later columns
    Q = Q[torch.argsort(perm)].T.to(torch.uint8)  # (out, in), back to input order
    return (Q, *grid.stack(params))


def _static_params(W: torch.Tensor, grid, g: int | None, gam) -> list:
    """The grid's params fitted on the original W (out, in): one set per row (g None) or per group of g inputs."""
    return [grid.fit(W, gam(0))] if g is None else [grid.fit(W[:, j:j + g], gam(j // g)) for j in range(0, W.shape[1], g)]


def _ordered(W: torch.Tensor, H: torch.Tensor, act_order: bool, percdamp: float):
    """A copy of W (out, in) with dead inputs zeroed and its columns in the quantization order (act-order: decreasing
    H_jj), the upper Cholesky factor of the damped H⁻¹ (in, in) in that order, and the order itself. W and H are left
    as they are; the copies are made here so that only the ordered ones outlive the call (the caller's references
    would keep an unordered copy alive through it: tests/test_streaming.py's peak-memory bound)."""
    W = W.detach().clone().float()  # (out, in)
    H = H.detach().clone().float()  # (in, in)
    n = W.shape[1]
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diag(), descending=True) if act_order else torch.arange(n, device=H.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * H.diag().mean() * torch.eye(n, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (in, in)
    return W, Hinv, perm


def gptq_nested(W: torch.Tensor, H: torch.Tensor, grid: AffineGrid, *, blocksize: int = 128, percdamp: float = 0.01,
                act_order: bool = True, gamma: torch.Tensor | None = None, **_):
    """Matryoshka GPTQ with one compensated copy of W per served width (`compensation="per_width"`): codes (out, in)
    uint8 on the c-bit parent grid and its stored (alpha, z).

    The shared loop (`gptq` on a MultiWidth grid, MatGPTQ's) keeps one W and spreads the λ-mean of the slices' errors
    through H⁻¹, so no slice gets the compensation it needs: on ref-10m g64 its int2 slice's WikiText-2 perplexity gap
    stayed at 1.6× GPTQ-int2's for every λ tried (BENCHMARKS.md "Matryoshka GPTQ"). Here width r keeps its own W_r,
    updated by its own slice's error exactly as GPTQ at r alone would update W. The widths still share one code per
    weight: at each column the code is the exact argmin over all 2^c codes of Σ_r λ_r (u_r − S(q, r))², u_r = W_r's
    position on the parent grid (MultiWidth.round_apart) — so λ only settles where the widths' trajectories disagree.
    Cost: the column loop on K = len(widths) copies, plus one (out, K) × (K, 2^c) product per column.
    Groups are always static (fitted on the original W, as act-order does), so every copy sees the same grid."""
    multi = grid.multi
    K = len(multi.widths)
    W = W.detach().float()  # (out, in): the caller's when float32 (_ordered copies it)
    out, n = W.shape
    g = grid.spec.group_size
    g = None if g in (None, -1) or g >= n else g
    gam = (lambda j: None) if gamma is None else (lambda j: gamma[..., j:j + 1])
    params = _static_params(W, grid, g, gam)
    W, Hinv, perm = _ordered(W, H, act_order, percdamp)
    Wt = W.T.contiguous().unsqueeze(0).repeat(K, 1, 1)  # (K, in, out): width k's compensated copy
    del W  # memory: the caller's W + K copies + the codes (bench/scale.py counts K + 3 with the transient)
    Q = torch.zeros(n, out, device=Wt.device)  # (in, out) codes as float (exact below 2^24)
    cols, cur, p = perm.tolist(), None, None
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, Hinv1 = Wt[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]  # (K, B, out), (B, B)
        Err1 = torch.zeros_like(W1)  # (K, B, out)
        for i in range(i2 - i1):
            j = 0 if g is None else cols[i1 + i] // g
            if j != cur:
                cur, p = j, grid.prepare(params[j])
            a, zz = p
            q = multi.round_apart(W1[:, i] / a + zz)  # (out,): the code best for every width at its own position
            Q[i1 + i] = q
            err = W1[:, i].sub(a * (multi.slices(q) - zz)).div_(Hinv1[i, i])  # (K, out)
            W1[:, i:] -= Hinv1[i, i:, None] * err[:, None, :]  # each copy: its own error spread forward
            Err1[:, i] = err
        for k in range(K):  # the block's error to later columns, lazily, in place: no (K, in − i2, out) temporary
            Wt[k, i2:].addmm_(Hinv[i1:i2, i2:].T, Err1[k], alpha=-1)
    Q = Q[torch.argsort(perm)].T.to(torch.uint8)  # (out, in), back to input order
    return (Q, *grid.stack(params))


@dataclass(frozen=True)
class GPTQConfig(CalibOptions, QuantConfig):
    act_order: bool = True
    percdamp: float = 0.01
    blocksize: int = 128
    true_sequential: bool = True
    clip: bool = False  # data-adaptive clipping: ratios searched on the output error tr(ΔW H ΔWᵀ)
    clip_stretch: float = 1.0  # with clip: also try stretching the max side by up to this factor (5 steps from 1)
    clip_block: int = 0  # with clip: score on H's diagonal blocks of this many inputs (0: all of H; groups: per group)
    grid: str = "affine"  # affine | nf | log | kmeans (codebook grids give CodebookLinear layers)
    nested: bool = False  # store parent_bits-bit codes (Matryoshka), error feedback at the served `bits`
    parent_bits: int = 8
    batch_size: int = 8

    def multi_width(self) -> dict:
        """AffineGrid's Matryoshka-GPTQ arguments: none for plain and nested GPTQ."""
        return {}

    def __post_init__(self):
        super().__post_init__()
        if self.nested and not 1 <= self.bits <= self.parent_bits <= 8:
            raise BitnestError(f"nested gptq needs 1 <= bits <= parent_bits <= 8, got {self.bits}, {self.parent_bits}")
        if not 0 <= self.percdamp < 1:
            raise BitnestError(f"percdamp must be in [0, 1), got {self.percdamp}")
        try:
            object.__setattr__(self, "clip_stretch", float(self.clip_stretch))
            object.__setattr__(self, "clip_block", int(self.clip_block))
        except (TypeError, ValueError):
            raise BitnestError(f"clip_stretch must be a number and clip_block an integer, got {self.clip_stretch!r}, "
                               f"{self.clip_block!r}") from None
        if not 1.0 <= self.clip_stretch <= 4.0 or self.clip_block < 0:
            raise BitnestError(f"clip_stretch must be in [1, 4] and clip_block ≥ 0, got {self.clip_stretch}, {self.clip_block}")
        if self.grid not in GRIDS or (self.grid != "affine" and (self.nested or self.clip)):
            raise BitnestError(f"gptq grid must be one of {GRIDS} (nested and clip are affine-only), got {self.grid}")


@dataclass(frozen=True)
class MatGPTQConfig(GPTQConfig):
    """Matryoshka GPTQ: one c-bit parent whose slices are GPTQ-optimised for every width in `precisions` at once."""
    bits: int | None = None  # width served by default (any r ≤ parent_bits at load time); None: max(precisions)
    nested: bool = True
    precisions: tuple = ()  # the widths optimised for; () = (8, 4, 3, 2)
    lambdas: tuple = ()  # λ_r in the order of `precisions`; () = 2 for each but the narrowest, 1 for it: (2, 2, 2, 1)
    # slice-aware clipping on by default: the clip ratios are searched on the λ-weighted output error of every
    # slice, the max side also stretched up to 256/192 (an int2 slice of an int8 parent tops out at code 192), scored
    # on H's 128-input diagonal blocks (per group with groups). ref-10m (BENCHMARKS.md "Matryoshka GPTQ")
    clip: bool = True
    clip_stretch: float = 4 / 3
    clip_block: int = 128
    # per_width: one compensated copy of W per width, one code chosen for all of them (`gptq_nested`); shared: the
    # paper's loop, one W and the λ-mean error spread. ref-10m g64 (BENCHMARKS.md "Matryoshka GPTQ"): shared's int2 gap
    # to FP was 1.14× / 1.65× GPTQ-int2's on C4 / WikiText-2 at every λ tried.
    # (per_width fits groups on the original W even without act-order — static groups — so all copies share a grid)
    compensation: str = "per_width"

    def __post_init__(self):
        from .matquant import parse_bits, parse_lambdas
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.compensation not in COMPENSATIONS:
            raise BitnestError(f"matgptq compensation must be one of {COMPENSATIONS}, got {self.compensation!r}")
        if isinstance(self.parent_bits, str):
            set_("parent_bits", int(self.parent_bits))
        precisions = parse_bits(self.precisions) if self.precisions else DEFAULT_MAT_PRECISIONS
        lambdas = parse_lambdas(self.lambdas) if self.lambdas else default_mat_lambdas(precisions)
        if len(lambdas) != len(precisions):
            raise BitnestError(f"{len(lambdas)} lambdas for {len(precisions)} precisions "
                               f"({','.join(map(str, precisions))}): give one λ per precision")
        if not 1 <= self.parent_bits <= 8 or max(precisions) > self.parent_bits:
            raise BitnestError(f"matgptq precisions must be ≤ parent_bits (1..8), got {precisions} with parent_bits {self.parent_bits}")
        pairs = sorted(zip(precisions, lambdas), key=lambda p: -p[0])
        set_("precisions", tuple(p for p, _ in pairs))
        set_("lambdas", tuple(x for _, x in pairs))
        bits = self.bits
        if isinstance(bits, str):
            bits = None if bits.lower() == "none" else int(bits)
        set_("bits", max(self.precisions) if bits is None else bits)
        if not self.nested:
            raise BitnestError("matgptq is nested by definition (nested=false is plain gptq)")
        super().__post_init__()

    def multi_width(self) -> dict:
        return {"widths": self.precisions, "lambdas": self.lambdas}


DEFAULT_MAT_PRECISIONS = (8, 4, 3, 2)
COMPENSATIONS = ("per_width", "shared")


def default_mat_lambdas(precisions) -> tuple[float, ...]:
    """λ = 2 for every width but the narrowest, 1 for it: (2, 2, 2, 1) for 8,4,3,2. A shared compensation step spreads
    the λ-mean error, so the narrowest slice's large error must not dominate it (MatGPTQ's equal weights cost int8/int4
    up to 0.7 % on ref-10m), yet it needs enough weight for its own compensation: with the stretched slice-aware clip,
    ref-10m C4 held-out 128 windows vs GPTQ alone at each width, int8 / int4 +0.02 / +0.17 % per channel and
    +0.13 / +0.36 % g64, int2 gap to FP 0.66× / 1.14× GPTQ-int2's; (4, 4, 2, 1) gave int2 0.85× / 1.00×, and (8, 4, 2, 1) 0.84× /
    1.05× at 32 windows. Those figures are the shared loop's; with one compensated copy per width (the default) λ only
    settles the code where the widths' own positions disagree and weighs the clip search, and these λ gave every
    slice at least GPTQ-alone's quality on ref-10m (BENCHMARKS.md "Matryoshka GPTQ")."""
    narrowest = min(precisions)
    return tuple(1.0 if r == narrowest else 2.0 for r in precisions)


def quantize_linears(lins: list, H: torch.Tensor, config: GPTQConfig, bits: list[int]) -> list[QuantLinear]:
    """GPTQ for Linears fed the same input (one H, in × in). Layers of equal width run as one stacked W:
    GPTQ treats rows independently given H, so stacking q/k/v (or gate/up) changes nothing but the time."""
    out = [None] * len(lins)
    for b in sorted(set(bits)):
        idx = [i for i, bi in enumerate(bits) if bi == b]
        for part in ([[i] for i in idx] if config.group_size == -1 else [idx]):  # per-tensor params: one layer
            ms = _gptq_stack([lins[i] for i in part], H, config, b)
            for i, m in zip(part, ms):
                out[i] = m
    return out


def quantize_linear(lin, H: torch.Tensor, config: GPTQConfig, bits: int) -> QuantLinear:
    """The QuantLinear GPTQ makes of `lin` (nn.Linear) given its input Hessian H (in, in)."""
    return quantize_linears([lin], H, config, [bits])[0]


def _gptq_stack(lins: list, H: torch.Tensor, config: GPTQConfig, bits: int) -> list:
    c = config.parent_bits if config.nested else bits
    spec = config.affine_spec(c)
    for lin in lins:
        spec.check_shape(lin.out_features, lin.in_features)
    if config.grid != "affine":
        grid = CodebookGrid(config.grid, bits, config.group_size)
    else:
        grid = AffineGrid(spec, bits if config.nested else None, **config.multi_width())
    gamma = None
    if config.clip:
        from ..calib.clip import search_clip
        st = config.clip_stretch
        tops = tuple(1 + (st - 1) * k / 4 for k in range(5)) if st > 1 else (1.0,)
        # coarse-to-fine when stretching: 5× the candidates otherwise; plain clip keeps its full 21-ratio grid
        gamma = torch.cat([search_clip(lin.weight, H, spec, serve_bits=grid.r, multi=getattr(grid, "multi", None),
                                       tops=tops, block=config.clip_block or None, coarse=st > 1)
                           for lin in lins], -2)  # (R, G), or (2, R, G): γ for max and min
    W = torch.cat([lin.weight.detach() for lin in lins])  # (Σ out, in)
    solve = gptq_nested if getattr(config, "compensation", "shared") == "per_width" else gptq
    Q, a, b = solve(W, H, grid, blocksize=config.blocksize, percdamp=config.percdamp, act_order=config.act_order, gamma=gamma)
    mods, r0 = [], 0
    for lin in lins:
        rows = slice(r0, r0 + lin.out_features)
        a_, b_ = (t if t is None or t.shape[0] == 1 else t[rows] for t in (a, b))  # per-row params of this layer
        if config.grid != "affine":
            mods.append(CodebookLinear.from_codes(Q[rows], a_, b_, bits=bits, group_size=config.group_size,
                                                  codebook=config.grid, bias=lin.bias))
        else:
            mods.append(QuantLinear.from_codes(Q[rows], a_, b_, bits=c, group_size=config.group_size, symmetric=config.symmetric,
                                               serve_bits=bits if config.nested else None, bias=lin.bias))
        r0 += lin.out_features
    return mods


@register("gptq", GPTQConfig)
def gptq_method(model, config: GPTQConfig, names: list[str], progress: bool = True, calib=None, **_) -> None:
    calibrated(model, config, names, calib, progress=progress, desc="gptq", make=lambda ns, lins, st: quantize_linears(
        lins, st.H, config, [config.bits_for(n) for n in ns]))


@register("matgptq", MatGPTQConfig)
def matgptq_method(model, config: MatGPTQConfig, names: list[str], progress: bool = True, calib=None, **_) -> None:
    """Matryoshka GPTQ (MatGPTQ, arXiv 2602.03537): the GPTQ loop on the c-bit grid, each column's codes chosen
    to minimise Σ_r λ_r (w − ŵ_r)² over the slices r ∈ precisions (grids/nested.MultiWidth). compensation="shared"
    (the paper's): one W, the λ-mean error spread through H⁻¹; "per_width" (default): one W_r per width, each
    updated by its own slice's error, ŵ_r taken at W_r's own position (`gptq_nested`). With `clip`, the clipping
    search is scored over all widths too. A normal nested checkpoint: served at `bits`, any r ≤ parent_bits at load
    time or run time."""
    calibrated(model, config, names, calib, progress=progress, desc="matgptq", make=lambda ns, lins, st: quantize_linears(
        lins, st.H, config, [config.bits_for(n) for n in ns]))


__all__ = ["gptq", "gptq_nested", "GPTQConfig", "MatGPTQConfig", "quantize_linear", "quantize_linears"]
