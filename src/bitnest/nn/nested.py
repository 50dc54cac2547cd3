"""ExtraPrecisionLinear: Extra Precision MatQuant (methods.md §1) — the r-bit slice of a c-bit code without
the clamp, so it has 2^r + 1 levels {0, …, 2^r}; the weights in the extra top bucket (slice code 2^r) are
stored sparsely.

Two storage forms, one module (kind "matquant_ep" in the checkpoint):
  nested      `bits == parent_bits` (c): c-bit codes, any r ≤ c served on the fly by the unclamped slice
              S⁺(q, r) = round(q / 2^(c−r)) (round half up) — one checkpoint, every precision.
  standalone  `bits == serve_bits == r < c`: r-bit codes clamped to 2^r − 1, plus the positions of the k
              weights whose slice code is 2^r as a row-compressed list: `extra_counts`, the count per row
              (`count_bits` = bits of the largest count), and `extra_cols`, their column indices in row-major
              order (⌈log2 in⌉ bits each); both stored as bit-planes packed 8 per byte ((bits, ⌈n/8⌉) uint8,
              plane i holding bit i of every number). The forward adds 1 at those positions. `bitnest slice`
              writes this form.
Both dequantize with the parent's α, z: ŵ = α · (t · 2^(c−r) − z), t ∈ {0, …, 2^r}.

Serving (kernels.Affine): r-bit codes clamped to 2^r − 1 plus the bucket as a CSR list over rows (int32 row
pointers and columns), where the kernels add one step. For the nested form both are built when the width is
set (like QuantLinear's working copy: c + r bits per weight and the list); for the standalone form the list is
decoded from its bit-planes once. Neither is saved.

Bits accounting (`served_bits`): what the standalone r-bit form stores — r bits per weight, α and z, and
the list: ⌈log2 in⌉ · 8⌈k/8⌉ + count_bits · 8⌈out/8⌉ bits (for a 768 × 256 layer with 1% of its weights in
the bucket: ≈ 0.08 + 0.02 bits per weight).

MatQuantLinear is the training-time twin of both packed forms (and of QuantLinear): the forward of
`S(Q(W, c), r)` with straight-through rounding, bit-identical to the packed layer it converts to.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from ..errors import BitnestError
from ..formats.packing import pack, packed_len, unpack
from ..grids.affine import STORE_DTYPE, AffineSpec, dequantize, fit, grouped, quantize, round_ste, zero_point
from ..grids.nested import slice_codes, slice_ste
from ..kernels import reference
from .qlinear import fill


def index_bits(n: int) -> int:
    """Bits to write any integer in 0..n−1 (at least 1)."""
    return max(1, math.ceil(math.log2(max(n, 2))))


def encode_planes(x: torch.Tensor, nbits: int) -> torch.Tensor:
    """(k,) non-negative integers < 2^nbits -> (nbits, ⌈k/8⌉) uint8: bit-plane i (bit i of every number)."""
    planes = (x.to(torch.int64)[None, :] >> torch.arange(nbits, device=x.device)[:, None]) & 1  # (nbits, k)
    return pack(planes.to(torch.uint8), 1)


def decode_planes(b: torch.Tensor, k: int) -> torch.Tensor:
    """(nbits, ⌈k/8⌉) uint8 -> (k,) int64."""
    planes = unpack(b, 1, k).to(torch.int64)  # (nbits, k)
    return (planes << torch.arange(b.shape[0], device=b.device)[:, None]).sum(0)


def list_bits(counts: torch.Tensor, in_features: int) -> int:
    """Stored bits of the row-compressed list for per-row counts (out,): column planes + count planes."""
    k = int(counts.sum())
    if k == 0:
        return 0
    cb = index_bits(int(counts.max()) + 1)
    return index_bits(in_features) * packed_len(k, 1) * 8 + cb * packed_len(counts.numel(), 1) * 8


class ExtraPrecisionLinear(nn.Module):
    kind = "matquant_ep"
    keep_dtype = ("scale", "zero")
    nested = True  # the loader may choose serve_bits (only for the nested form)

    def __init__(self, in_features: int, out_features: int, *, bits: int, parent_bits: int, serve_bits: int,
                 group_size: int | None, symmetric: bool, n_extra: int = 0, count_bits: int = 1, bias: bool = False,
                 device=None):
        super().__init__()
        if not 1 <= serve_bits <= bits <= parent_bits <= 8:
            raise BitnestError(f"extra-precision layer needs 1 <= serve bits <= stored bits <= parent bits <= 8, "
                               f"got {serve_bits}, {bits}, {parent_bits}")
        if bits != parent_bits and serve_bits != bits:
            raise BitnestError(f"a standalone {bits}-bit extra-precision slice cannot be served at {serve_bits} bits; "
                               "re-slice the nested checkpoint instead")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.parent_bits, self.serve_bits = bits, parent_bits, serve_bits
        self.group_size, self.symmetric = group_size, symmetric
        self.spec = AffineSpec(parent_bits, group_size, symmetric)
        self.spec.check_shape(out_features, in_features)
        R = 1 if group_size == -1 else out_features
        G = 1 if group_size in (None, -1) else in_features // group_size
        self.col_bits, self.count_bits, self._n_extra = index_bits(in_features), count_bits, n_extra
        self.register_buffer("qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(R, G, dtype=STORE_DTYPE, device=device))
        self.register_buffer("zero", None if symmetric else torch.zeros(R, G, dtype=STORE_DTYPE, device=device))
        # bit-planes of the row-compressed list; None when empty (the nested form, or no weight in the bucket)
        self.register_buffer("extra_cols", torch.zeros(self.col_bits, packed_len(n_extra, 1), dtype=torch.uint8,
                                                       device=device) if n_extra else None)
        self.register_buffer("extra_counts", torch.zeros(count_bits, packed_len(out_features, 1), dtype=torch.uint8,
                                                         device=device) if n_extra else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._serving: tuple | None = None  # (key, Affine) built for the current width and codes

    @property
    def standalone(self) -> bool:
        return self.bits != self.parent_bits

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale, zero, *, parent_bits: int, serve_bits: int,
                   group_size, symmetric, bias=None) -> "ExtraPrecisionLinear":
        """The nested form from c-bit codes (out, in)."""
        out, inp = codes.shape
        m = cls(inp, out, bits=parent_bits, parent_bits=parent_bits, serve_bits=serve_bits, group_size=group_size,
                symmetric=symmetric, bias=bias is not None, device=codes.device)
        return fill(m, qweight=pack(codes, parent_bits), scale=scale, zero=zero, bias=bias)

    def layer_config(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "parent_bits": self.parent_bits, "serve_bits": self.serve_bits,
                "group_size": self.group_size, "symmetric": self.symmetric, "n_extra": self._n_extra, "count_bits": self.count_bits,
                "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_layer_config(cls, cfg: dict, device=None) -> "ExtraPrecisionLinear":
        return cls(cfg["in_features"], cfg["out_features"], bits=cfg["bits"], parent_bits=cfg["parent_bits"],
                   serve_bits=cfg["serve_bits"], group_size=cfg["group_size"], symmetric=cfg["symmetric"],
                   n_extra=cfg.get("n_extra", 0), count_bits=cfg.get("count_bits", 1), bias=cfg["bias"], device=device)

    def codes(self) -> torch.Tensor:
        """The served slice codes t ∈ {0, …, 2^r} (out, in), int16."""
        q = unpack(self.qweight, self.bits, self.in_features)  # (out, in)
        if not self.standalone:
            return slice_codes(q, self.parent_bits, self.serve_bits, clamp=False).to(torch.int16)
        t = q.to(torch.int16)
        if self._n_extra:
            counts = decode_planes(self.extra_counts, self.out_features)  # (out,)
            rows = torch.repeat_interleave(torch.arange(self.out_features, device=t.device), counts)  # (k,)
            t[rows, decode_planes(self.extra_cols, self._n_extra)] += 1  # the extra bucket: 2^r − 1 -> 2^r
        return t

    def extra_counts_per_row(self) -> torch.Tensor:
        """(out,) weights in the extra top bucket per row, at the served width."""
        if self.standalone:
            return decode_planes(self.extra_counts, self.out_features) if self._n_extra else \
                torch.zeros(self.out_features, dtype=torch.int64)
        if self.serve_bits == self.parent_bits:
            return torch.zeros(self.out_features, dtype=torch.int64)
        return (self.codes() == (1 << self.serve_bits)).sum(1)

    def n_extra(self) -> int:
        """Weights in the extra top bucket at the served width."""
        return int(self.extra_counts_per_row().sum())

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.spec, self.scale, self.zero, shift=self.parent_bits - self.serve_bits,
                          dtype=dtype)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def served_bits(self) -> int:
        """Every bit of the standalone r-bit form: codes, α, z, and the extra bucket's index list."""
        n = self.out_features * packed_len(self.in_features, self.serve_bits) * 8 + self.scale.numel() * 16
        n += 0 if self.zero is None else self.zero.numel() * 16
        return n + list_bits(self.extra_counts_per_row(), self.in_features)

    def to_standalone(self) -> "ExtraPrecisionLinear":
        """The r-bit standalone form (codes clamped to 2^r − 1 + the index list); same forward."""
        if self.standalone or self.serve_bits == self.parent_bits:
            return self
        r = self.serve_bits
        t = self.codes()  # (out, in) in 0..2^r
        top = t == (1 << r)  # (out, in)
        counts = top.sum(1)  # (out,)
        cols = top.nonzero()[:, 1]  # (k,) column of each, row-major order
        k = cols.numel()
        m = type(self)(self.in_features, self.out_features, bits=r, parent_bits=self.parent_bits, serve_bits=r,
                       group_size=self.group_size, symmetric=self.symmetric, n_extra=k,
                       count_bits=index_bits(int(counts.max()) + 1) if k else 1,
                       bias=self.bias is not None, device=self.qweight.device)
        m.qweight.copy_(pack(t.clamp_max((1 << r) - 1).to(torch.uint8), r))
        m.scale.copy_(self.scale)
        if self.zero is not None:
            m.zero.copy_(self.zero)
        if k:
            m.extra_cols.copy_(encode_planes(cols, m.col_bits))
            m.extra_counts.copy_(encode_planes(counts, m.count_bits))
        if self.bias is not None:
            m.bias.data.copy_(self.bias.detach())
        return m

    def set_serve_bits(self, r: int) -> None:
        if self.standalone and r != self.serve_bits or not 1 <= r <= self.bits:
            raise BitnestError(f"cannot serve this layer at {r} bits (stored: {self.bits}-bit "
                               f"{'standalone slice' if self.standalone else 'codes'})")
        self.serve_bits = r
        self.packed  # noqa: B018 — build the serving form now

    def _csr(self, counts: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rowptr = torch.zeros(self.out_features + 1, dtype=torch.int32, device=cols.device)
        rowptr[1:] = torch.cumsum(counts, 0)
        return rowptr, cols.to(torch.int32)

    @property
    def packed(self) -> kernels.Affine:
        q = self.qweight
        key = (self.serve_bits, q.data_ptr(), q._version, q.device)
        if self._serving is None or self._serving[0] != key:
            self._serving = None  # free the previous width's copy first
            self._serving = (key, self._build_packed())
        return self._serving[1]

    def drop_view(self) -> None:
        """Forget the served view (hugepages.place_module: it would keep the old codes alive)."""
        self._serving = None

    def _build_packed(self) -> kernels.Affine:
        c, r, K = self.parent_bits, self.serve_bits, self.in_features
        rowptr = cols = None
        if self.standalone:
            codes = self.qweight
            if self._n_extra:
                rowptr, cols = self._csr(decode_planes(self.extra_counts, self.out_features),
                                         decode_planes(self.extra_cols, self._n_extra))
        elif r == c:
            codes = self.qweight
        else:  # S⁺(q, r) = 2^r exactly when q ≥ 2^c − 2^(c−r−1): those go to the list, the rest is the clamped slice
            codes = kernels.slice_pack(self.qweight, c, r, K)  # (out, ⌈K·r/8⌉), clamped
            top = unpack(self.qweight, c, K) >= (1 << c) - (1 << (c - r - 1))  # (out, K)
            rowptr, cols = self._csr(top.sum(1), top.nonzero()[:, 1])
        return kernels.Affine(codes, r if self.standalone or r < c else c, K, self.scale, self.zero,
                              self.group_size, c, rowptr, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        form = f"standalone, {self._n_extra} extra" if self.standalone else f"nested in {self.bits}"
        return (f"in={self.in_features}, out={self.out_features}, bits={self.serve_bits}+extra ({form}), "
                f"{self.spec.granularity}, {'sym' if self.symmetric else 'asym'}")


# ------------------------------------------------------------------------------------------ training twin


def nested_fake_quant(W: torch.Tensor, spec: AffineSpec, r: int, *, clamp: bool = True, gamma=None, beta=None,
                      fit_grad: bool = False) -> torch.Tensor:
    """ŵ = α · (S(Q(W, c), r) − z) with straight-through rounds, (out, in) float32.

    The forward equals `dequantize(slice_codes(quantize(W, α, z), c, r), shift=c − r)` bit for bit (the same
    float operations; slice_ste rounds half up like the bit form). gamma/beta (R, G) clip the MinMax range
    (OmniQuant LWC); fit_grad lets gradients reach them (and W) through α and z, else α, z are constants."""
    alpha, z = fit(W if fit_grad else W.detach(), spec, gamma, beta)  # (R, G) each, rounded to fp16
    Wg = grouped(W.float(), spec.group_size)  # (R, G, g)
    a = alpha.float().unsqueeze(-1)  # (R, G, 1)
    zz = zero_point(spec, z)
    zz = zz.unsqueeze(-1) if isinstance(zz, torch.Tensor) else zz
    q = round_ste(Wg / a + zz).clamp(0, spec.qmax)  # c-bit codes as floats
    t = slice_ste(q, spec.bits, r, clamp)  # S(q, r) on the parent's scale
    return (a * (t - zz)).reshape(W.shape)


CLIP_LR_MULT = 10.0


class MatQuantLinear(nn.Module):
    """A Linear trained through its c-bit grid, served at `self.r` (set before each forward).

    - `weight` (out, in) float32 master copy: trained by QAT, frozen by the OmniQuant flavour;
    - `clip_logits` (R, G, 2) or None: OmniQuant's learnable weight clipping, γ = σ(K·θ₀), β = σ(K·θ₁), θ stored
      divided by K = CLIP_LR_MULT: Adam's steps do not depend on a parameter's scale, so this gives the clipping
      K× the learning rate of the LET scales trained beside it (σ′ ≈ 0.018 at OmniQuant's start ℓ = 4: at one
      shared LR, γ would barely move in a short calibration);
    - `in_log_scale` (in,) / `out_log_scale` (out,) or None: shared log-scales of an equivalent transformation
      (OmniQuant LET): the quantized weight is Q(W ⊙ e^{u_in} ⊘ e^{u_out}) — the inverse is folded into the
      neighbouring layer, so the block computes the same function before quantization.
    `to_packed()` gives the QuantLinear (clamp) or ExtraPrecisionLinear (no clamp) computing the same forward."""

    def __init__(self, linear: nn.Linear, spec: AffineSpec, *, clamp: bool = True, train_weight: bool = True,
                 learn_clip: bool = False, clip_init: float = 4.0):
        super().__init__()
        spec.check_shape(linear.out_features, linear.in_features)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.spec, self.clamp, self.r = spec, clamp, spec.bits
        self.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=train_weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(),
                                                                  requires_grad=train_weight)
        R, G, _ = grouped(torch.empty(self.out_features, self.in_features, device="meta"), spec.group_size).shape
        self.clip_logits = (nn.Parameter(torch.full((R, G, 2), clip_init / CLIP_LR_MULT, device=self.weight.device))
                            if learn_clip else None)
        self.in_log_scale: nn.Parameter | None = None
        self.out_log_scale: nn.Parameter | None = None

    def effective_weight(self) -> torch.Tensor:
        W = self.weight  # (out, in)
        if self.in_log_scale is not None:
            W = W * self.in_log_scale.exp()[None, :]
        if self.out_log_scale is not None:
            W = W * (-self.out_log_scale).exp()[:, None]
        return W

    def gamma_beta(self):
        if self.clip_logits is None:
            return None, None
        gb = torch.sigmoid(self.clip_logits * CLIP_LR_MULT)  # (R, G, 2)
        return gb[..., 0], gb[..., 1]

    def quantized_weight(self, r: int | None = None) -> torch.Tensor:
        gamma, beta = self.gamma_beta()
        return nested_fake_quant(self.effective_weight(), self.spec, self.r if r is None else r, clamp=self.clamp,
                                 gamma=gamma, beta=beta, fit_grad=self.clip_logits is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def to_packed(self, serve_bits: int | None = None) -> nn.Module:
        """The packed layer (c-bit codes, served at `serve_bits`, default self.r) with the same forward."""
        from .qlinear import QuantLinear

        W = self.effective_weight().detach()
        gamma, beta = self.gamma_beta()
        alpha, z = fit(W, self.spec, gamma, beta)
        q = quantize(W, self.spec, alpha, z)  # (out, in) uint8, c-bit
        r = serve_bits or self.r
        s = self.spec
        if self.clamp:
            return QuantLinear.from_codes(q, alpha, z, bits=s.bits, group_size=s.group_size, symmetric=s.symmetric,
                                          serve_bits=r, bias=self.bias)
        return ExtraPrecisionLinear.from_codes(q, alpha, z, parent_bits=s.bits, serve_bits=r,
                                               group_size=s.group_size, symmetric=s.symmetric, bias=self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, c={self.spec.bits}, r={self.r}, "
                f"{'clamp' if self.clamp else 'extra precision'}, {self.spec.granularity}"
                + (", learnable clipping" if self.clip_logits is not None else ""))
