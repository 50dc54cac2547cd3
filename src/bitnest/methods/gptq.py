"""GPTQ (Frantar et al. 2023; IST-DASLab/gptq): quantize W column by column, spreading each column's
error over the columns not yet quantized through the inverse Hessian H⁻¹ of the layer's input, H = 2XᵀX/n.

Written once against a grid (fit params on a set of columns / quantize a column to codes / dequantize
codes to what the layer computes with / stack the params for storage), so the same loop serves the affine
grid at any width, the nested Matryoshka int8 grid (`nested=True`: c-bit codes are stored, the r-bit slice
is what the error feedback sees, so the served r-bit model is the GPTQ-optimized one), and the codebook
grids (`grid="nf" | "log" | "kmeans"`, grids/codebook.py, stored as CodebookLinear).

Act-order with groups uses *static groups*: each group's scale and zero are fitted on the original W before
the column loop, so group j's params are those of input columns [j·g, (j+1)·g) whatever order the columns
are quantized in. The packed layer stays the plain QuantLinear (no g_idx). Without act-order, each group's
params are fitted when the loop reaches it, on the error-updated columns (the paper's default).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calib.data import CalibOptions, as_calib
from ..calib.driver import BlockRunner, Hessian, blockwise
from ..errors import BitnestError
from ..grids.affine import AffineSpec, fit
from ..grids.codebook import CodebookGrid
from ..grids.nested import slice_codes
from ..models.blocks import replace_module
from ..nn.codebook import CodebookLinear
from ..nn.qlinear import QuantLinear
from . import QuantConfig, register


GRIDS = ("affine", "nf", "log", "kmeans")


class AffineGrid:
    """Column hooks for GPTQ on the affine grid (`affine.fit/quantize/dequantize`, same float ops, so
    GPTQ with H = I reproduces RTN bit for bit). serve_bits < spec.bits: the nested grid, whose codes are
    c-bit and whose dequantized value is the r-bit slice (as `kernels.reference` serves it)."""

    def __init__(self, spec: AffineSpec, serve_bits: int | None = None):
        self.spec, self.r = spec, serve_bits or spec.bits

    def fit(self, W: torch.Tensor, gamma=None):
        """Params for the columns W (out, k): (alpha, z) each (out, 1) — or (1, 1) for a per-tensor grid."""
        spec = AffineSpec(self.spec.bits, -1 if self.spec.group_size == -1 else None, self.spec.symmetric, self.spec.int_zero)
        return fit(W, spec, gamma, gamma)

    def prepare(self, params):
        """(α, z) as stored -> the float columns the loop uses: α (out,) or (1,), zero point (out,) or float."""
        alpha, z = params
        return alpha.float()[:, 0], float(1 << (self.spec.bits - 1)) if z is None else z.float()[:, 0]

    def quantize(self, w: torch.Tensor, p) -> torch.Tensor:
        a, zz = p
        return torch.round(w / a + zz).clamp_(0, self.spec.qmax)  # (out,) codes as float, as affine.quantize

    def dequantize(self, q: torch.Tensor, p) -> torch.Tensor:
        a, zz = p
        c, r = self.spec.bits, self.r
        t = q if r == c else slice_codes(q.to(torch.uint8), c, r).float() * float(1 << (c - r))
        return a * (t - zz)  # (out,), as affine.dequantize

    def stack(self, params):
        """Per-group params -> the stored (alpha, z), each (R, G)."""
        return torch.cat([p[0] for p in params], 1), None if params[0][1] is None else torch.cat([p[1] for p in params], 1)


def gptq(W: torch.Tensor, H: torch.Tensor, grid: "AffineGrid | CodebookGrid", *, blocksize: int = 128, percdamp: float = 0.01,
         act_order: bool = True, static_groups: bool | None = None, gamma: torch.Tensor | None = None):
    """Codes Q (out, in) uint8 and the grid's stored params (affine: alpha, z each (R, G)) for W (out, in).

    gamma (R, G): clipping ratios applied when fitting (data-adaptive clipping, calib/clip.py)."""
    W = W.detach().clone().float()  # (out, in)
    H = H.detach().clone().float()  # (in, in)
    out, n = W.shape
    g = grid.spec.group_size
    g = None if g in (None, -1) or g >= n else g
    static = act_order if static_groups is None else static_groups
    gam = (lambda j: None) if gamma is None else (lambda j: gamma[:, j:j + 1])
    if g is None:
        params = [grid.fit(W, gam(0))]
    elif static:
        params = [grid.fit(W[:, j:j + g], gam(j // g)) for j in range(0, n, g)]
    else:
        params = []
        blocksize = g * max(1, blocksize // g)  # a group never straddles two blocks
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diag(), descending=True) if act_order else torch.arange(n, device=H.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * H.diag().mean() * torch.eye(n, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (in, in)
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


@dataclass(frozen=True)
class GPTQConfig(CalibOptions, QuantConfig):
    act_order: bool = True
    percdamp: float = 0.01
    blocksize: int = 128
    true_sequential: bool = True
    clip: bool = False  # data-adaptive clipping: ratios searched on the output error tr(ΔW H ΔWᵀ)
    grid: str = "affine"  # affine | nf | log | kmeans (codebook grids give CodebookLinear layers)
    nested: bool = False  # store parent_bits-bit codes (Matryoshka), error feedback at the served `bits`
    parent_bits: int = 8
    batch_size: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.nested and not 1 <= self.bits <= self.parent_bits <= 8:
            raise BitnestError(f"nested gptq needs 1 <= bits <= parent_bits <= 8, got {self.bits}, {self.parent_bits}")
        if not 0 <= self.percdamp < 1:
            raise BitnestError(f"percdamp must be in [0, 1), got {self.percdamp}")
        if self.grid not in GRIDS or (self.grid != "affine" and (self.nested or self.clip)):
            raise BitnestError(f"gptq grid must be one of {GRIDS} (nested and clip are affine-only), got {self.grid}")


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
        grid = AffineGrid(spec, bits if config.nested else None)
    gamma = None
    if config.clip:
        from ..calib.clip import search_clip
        gamma = torch.cat([search_clip(lin.weight, H, spec, serve_bits=grid.r) for lin in lins])  # (R, G)
    W = torch.cat([lin.weight.detach() for lin in lins])  # (Σ out, in)
    Q, a, b = gptq(W, H, grid, blocksize=config.blocksize, percdamp=config.percdamp, act_order=config.act_order, gamma=gamma)
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


def sequential_quantize(block, runner: BlockRunner, names: list[str], make, stat=Hessian, sequential: bool = True) -> None:
    """For each group of sub-layers fed the same input (q/k/v, o, gate/up, down), accumulate statistics of that
    input (stat(in_features, device).add(x); default the Hessian), then replace the group's layers by
    make(names, linears, stats) -> modules. True-sequential: each group's inputs are seen with the earlier
    groups already quantized; otherwise all groups are collected in one pass."""
    groups = runner.groups(names)
    for todo in ([[g] for g in groups] if sequential else [groups]):
        lins = [[block.get_submodule(n) for n in g] for g in todo]
        stats = [stat(ls[0].in_features, ls[0].weight.device) for ls in lins]
        runner.collect({ls[0]: st.add for ls, st in zip(lins, stats)})
        for g, ls, st in zip(todo, lins, stats):
            for n, m in zip(g, make(g, ls, st)):
                replace_module(block, n, m)


def calibrated(model, config, names: list[str], calib, make, stat=Hessian, progress: bool = True,
               desc: str = "calib") -> None:
    """Block by block, replace every named Linear inside the blocks by make(full_names, linears, stats) ->
    modules, `stats` accumulated over the group's common input (true-sequential unless config says not)."""
    calib = as_calib(calib, model, config)
    todo = set(names)

    def process(prefix, block, runner):
        local = [n[len(prefix) + 1:] for n in names if n.startswith(prefix + ".")]
        sequential_quantize(block, runner, local, lambda ns, lins, st: make([f"{prefix}.{n}" for n in ns], lins, st),
                            stat, sequential=getattr(config, "true_sequential", True))
        todo.difference_update(f"{prefix}.{n}" for n in local)

    blockwise(model, calib, process, batch_size=getattr(config, "batch_size", 8), progress=progress, desc=desc)
    if todo:  # Linears outside the decoder blocks (e.g. lm_head named by a glob): no block inputs
        raise BitnestError(f"{sorted(todo)[0]} is outside the decoder blocks; calibrated methods quantize block layers only")


@register("gptq", GPTQConfig)
def gptq_method(model, config: GPTQConfig, names: list[str], progress: bool = True, calib=None, **_) -> None:
    calibrated(model, config, names, calib, progress=progress, desc="gptq", make=lambda ns, lins, st: quantize_linears(
        lins, st.H, config, [config.bits_for(n) for n in ns]))


__all__ = ["AffineGrid", "gptq", "GPTQConfig", "quantize_linear", "quantize_linears", "calibrated", "sequential_quantize"]
