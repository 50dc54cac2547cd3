"""QuantLinear: a Linear that holds packed codes + per-group scales/zeros and computes through kernels.

Fields (all serialized in the checkpoint's quantization_config["modules"][name]):
  bits         width of the stored codes (packing width)
  parent_bits  c, the width of the grid that `scale`/`zero` describe (== bits unless this is a stored
               r-bit slice of a c-bit Matryoshka grid)
  serve_bits   r, the width served at inference; < bits only for a nested (Matryoshka) layer — one
               checkpoint, every precision

Serving a nested layer at r < c: the r-bit slice S(q, r) of the c-bit codes is built once (`set_serve_bits`,
or lazily at the first forward) into a working copy packed at r bits, so every forward reads r bits per weight,
not c. Memory: c + r bits per weight (the codes plus one working copy); serving r = c needs no copy. The copy is
a non-persistent buffer: checkpoints still hold only the c-bit codes. `cache_slices=True` keeps every width
built so far (c + Σ r bits) so that switching back is free.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..errors import BitnestError
from ..formats.packing import pack, packed_len
from ..grids.affine import AffineSpec, STORE_DTYPE, fit, quantize
from ..kernels import reference
from .view import PackedView


def fill(m: nn.Module, **tensors) -> nn.Module:
    """Copy each given tensor (None = absent) into the module's buffer or parameter of that name."""
    for name, t in tensors.items():
        if t is not None:
            getattr(m, name).data.copy_(t.detach())
    return m


class QuantLinear(PackedView):
    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int | None,
                 symmetric: bool, parent_bits: int | None = None, serve_bits: int | None = None,
                 bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.parent_bits = parent_bits or bits
        self.serve_bits = serve_bits or bits
        self.group_size, self.symmetric = group_size, symmetric
        self.spec = AffineSpec(self.parent_bits, group_size, symmetric)
        self.spec.check_shape(out_features, in_features)
        R, G = self._scale_shape()
        self.register_buffer("qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(R, G, dtype=STORE_DTYPE, device=device))
        self.register_buffer("zero", None if symmetric else torch.zeros(R, G, dtype=STORE_DTYPE, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        # the r-bit working copy of a nested layer served at r < c (not saved); see the module docstring
        self.register_buffer("qweight_r", None, persistent=False)
        self._slice_of: tuple | None = None  # (r, identity of the codes it was sliced from)
        self.cache_slices = False
        self._slices: dict[int, torch.Tensor] = {}

    def _scale_shape(self) -> tuple[int, int]:
        g = self.group_size
        if g is None:
            return self.out_features, 1
        if g == -1:
            return 1, 1
        return self.out_features, self.in_features // g

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale, zero, *, bits, group_size, symmetric, parent_bits=None,
                   serve_bits=None, bias=None) -> "QuantLinear":
        """Wrap already-computed codes (out, in) in [0, 2^bits)."""
        out, inp = codes.shape
        m = cls(inp, out, bits=bits, group_size=group_size, symmetric=symmetric, parent_bits=parent_bits,
                serve_bits=serve_bits, bias=bias is not None, device=codes.device)
        return fill(m, qweight=pack(codes, bits), scale=scale, zero=zero, bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: AffineSpec, serve_bits: int | None = None) -> "QuantLinear":
        """RTN: MinMax fit, round to nearest."""
        W = linear.weight.detach()  # (out, in)
        spec.check_shape(*W.shape)
        alpha, z = fit(W, spec)
        q = quantize(W, spec, alpha, z)  # (out, in) uint8
        return cls.from_codes(q, alpha, z, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                              serve_bits=serve_bits, bias=linear.bias)

    def layer_config(self) -> dict:
        return {"bits": self.bits, "parent_bits": self.parent_bits, "serve_bits": self.serve_bits,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_layer_config(cls, cfg: dict, device=None) -> "QuantLinear":
        return cls(cfg["in_features"], cfg["out_features"], bits=cfg["bits"], group_size=cfg["group_size"],
                   symmetric=cfg["symmetric"], parent_bits=cfg["parent_bits"], serve_bits=cfg["serve_bits"],
                   bias=cfg["bias"], device=device)

    # ---------------------------------------------------------------- serving

    @property
    def nested(self) -> bool:
        """Stores c-bit codes of its own grid (re-servable at any r ≤ c), not a standalone slice."""
        return self.bits == self.parent_bits

    def set_serve_bits(self, r: int) -> None:
        """Serve at r bits from now on; builds the r-bit working copy now (not at the next forward)."""
        if not isinstance(r, int) or not 1 <= r <= self.bits or (r != self.serve_bits and not self.nested):
            raise BitnestError(f"cannot serve this layer at {r} bits: it stores {self.bits}-bit codes"
                               + ("" if self.nested else " of a standalone slice (only its own width)"))
        self.serve_bits = r
        self.drop_view()  # the view references the previous working copy: let it go before the next is built
        self._working_codes()

    def _codes_id(self) -> tuple:
        q = self._buffers["qweight"]
        return (q.data_ptr(), q._version, q.device)

    def _working_codes(self) -> torch.Tensor:
        """The codes the kernels read: the stored ones, or the r-bit working copy of a nested layer."""
        r = self.serve_bits
        if r == self.bits:
            if self.qweight_r is not None or self._slice_of is not None:  # (a module setattr per forward costs µs)
                self.qweight_r, self._slice_of = None, None
            return self.qweight
        src = self._codes_id()
        if self._slice_of == (r, src):  # the common case, every forward: no module attribute look-ups
            return self._buffers["qweight_r"]
        if self._slices and self._slices.get("src") != src:
            self._slices = {}
        w = self._slices.get(r)
        if w is None:
            self.qweight_r = None  # free the previous copy before building the next
            w = kernels.slice_pack(self.qweight, self.bits, r, self.in_features)  # (out, ⌈in·r/8⌉)
        if self.cache_slices:
            self._slices.update({r: w, "src": src})
        self.qweight_r, self._slice_of = w, (r, src)
        return w

    def standalone(self) -> "QuantLinear":
        """The r-bit layer of the width served now (`bitnest slice`): r-bit codes, the parent's α and z."""
        r = self.serve_bits
        m = type(self)(self.in_features, self.out_features, bits=r, group_size=self.group_size, symmetric=self.symmetric,
                       parent_bits=self.parent_bits, serve_bits=r, bias=self.bias is not None, device="meta")
        m.qweight, m.scale, m.zero = self._working_codes(), self.scale, self.zero
        if self.bias is not None:
            m.bias = self.bias
        return m

    @property
    def packed(self) -> kernels.Affine:
        b, r = self._buffers, self.serve_bits
        plain = r == self.bits and self._slice_of is None  # (else the working copy, with its own checks and clean-up)
        q = b["qweight"] if plain else self._working_codes()
        s, z = b["scale"], b["zero"]
        return self.packed_view((q, r, s, z), lambda: kernels.Affine(q, r, self.in_features, s, z, self.group_size,
                                                                     self.parent_bits))

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The weight this layer computes with, materialized (for inspection and tests; forward never does)."""
        return reference.affine_weight(self.packed, dtype)

    def stored_bits(self) -> int:
        """Every stored bit of the quantized weight: packed codes, scales, zeros (bias excluded)."""
        n = self.qweight.numel() * 8 + self.scale.numel() * 16
        return n + (0 if self.zero is None else self.zero.numel() * 16)

    def served_bits(self) -> int:
        """Bits a standalone checkpoint at serve_bits would store (codes at r bits + scales/zeros)."""
        return self.stored_bits() - self.qweight.numel() * 8 + self.out_features * packed_len(self.in_features, self.serve_bits) * 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        s = f"in={self.in_features}, out={self.out_features}, bits={self.serve_bits}"
        if self.serve_bits != self.bits:
            s += f" (nested in {self.bits})"
        return s + f", {self.spec.granularity}, {'sym' if self.symmetric else 'asym'}"
