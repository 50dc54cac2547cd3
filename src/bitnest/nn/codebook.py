"""CodebookLinear: b-bit packed indices into a table of levels, ŵ = s · T[q] (grids/codebook.py).

Stored: `qweight` (out, ceil(in·b/8)) uint8 packed by formats.packing; `table` (Rt, Gt, 2^b) float16 — one per
row / group for k-means, one for the whole tensor for weight sharing and for the fixed NormalFloat / power-of-
two codebooks; `scale` (R, G) float16 for the fixed codebooks (absmax per group), absent for k-means.
served_bits() counts all of it: indices at b bits, every table entry and scale at 16 bits.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..formats.packing import pack, packed_len, unpack
from ..grids.affine import AffineSpec, grouped
from ..grids.codebook import TABLE_DTYPE, lookup
from .qlinear import fill
from .view import PackedView


class CodebookLinear(PackedView):
    kind = "codebook"
    keep_dtype = ("table", "scale")

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int | None,
                 table_shape: tuple[int, int], scaled: bool, codebook: str = "kmeans", bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.codebook = codebook  # "kmeans" | "nf" | "log": how the table was made (metadata)
        AffineSpec(bits, group_size).check_shape(out_features, in_features)
        R, G, _ = grouped(torch.empty(out_features, in_features, device="meta"), group_size).shape
        self.register_buffer("qweight", torch.zeros(out_features, packed_len(in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("table", torch.zeros(*table_shape, 1 << bits, dtype=TABLE_DTYPE, device=device))
        self.register_buffer("scale", torch.ones(R, G, dtype=TABLE_DTYPE, device=device) if scaled else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None, *, bits: int,
                   group_size: int | None, codebook: str = "kmeans", bias=None) -> "CodebookLinear":
        out, inp = codes.shape
        m = cls(inp, out, bits=bits, group_size=group_size, table_shape=tuple(table.shape[:2]), scaled=scale is not None,
                codebook=codebook, bias=bias is not None, device=codes.device)
        return fill(m, qweight=pack(codes, bits), table=table, scale=scale, bias=bias)

    def layer_config(self) -> dict:
        return {"kind": self.kind, "codebook": self.codebook, "bits": self.bits, "serve_bits": self.bits,
                "group_size": self.group_size, "table_shape": list(self.table.shape[:2]), "scaled": self.scale is not None,
                "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_layer_config(cls, cfg: dict, device=None) -> "CodebookLinear":
        return cls(cfg["in_features"], cfg["out_features"], bits=cfg["bits"], group_size=cfg["group_size"],
                   table_shape=tuple(cfg["table_shape"]), scaled=cfg["scaled"], codebook=cfg.get("codebook", "kmeans"),
                   bias=cfg["bias"], device=device)

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features)  # (out, in)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        q = grouped(self.codes(), self.group_size)  # (R, G, g)
        return lookup(q, self.table, self.scale).reshape(self.out_features, self.in_features).to(dtype)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def served_bits(self) -> int:
        s = 0 if self.scale is None else self.scale.numel() * 16
        return self.qweight.numel() * 8 + self.table.numel() * 16 + s

    @property
    def packed(self) -> kernels.Codebook:
        b = self._buffers
        q, t, s = b["qweight"], b["table"], b["scale"]
        return self.packed_view((q, t, s), lambda: kernels.Codebook(
            q, self.bits, self.in_features, t, s, self.group_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, {self.codebook}, "
                f"table {tuple(self.table.shape)}")
