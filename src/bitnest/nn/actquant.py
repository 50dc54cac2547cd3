"""ActQuantLinear: a QuantLinear (packed b-bit weights) whose input activations are quantized to int8 too.

  dynamic  per-token symmetric scales computed at inference, s_t = max_j |x_tj| / 127   (W8A8 / W4A8 dynamic)
  static   one per-tensor scale fixed at calibration (calib/observers.py: minmax, percentile, mse)
The forward simulates the integer matmul: x̂ = s · clamp(round(x / s), ±127), then F.linear(x̂, Ŵ). With
8-bit per-channel symmetric weights this is exactly what an int8 GEMM with int32 accumulation and a float
rescale computes (see nn/intlinear.py for the integer-only path).
"""
from __future__ import annotations

import torch

from .. import kernels
from ..errors import BitnestError
from ..kernels.reference import fake_quant_sym, quant_act  # noqa: F401 — the activation grid, shared with calibration
from .qlinear import QuantLinear

ACT_MODES = ("dynamic", "static")


class ActQuantLinear(QuantLinear):
    kind = "actquant"
    keep_dtype = ("scale", "zero", "act_scale")

    def __init__(self, in_features: int, out_features: int, *, act_bits: int = 8, act_mode: str = "dynamic", **kw):
        super().__init__(in_features, out_features, **kw)
        if act_mode not in ACT_MODES or not 2 <= act_bits <= 8:
            raise BitnestError(f"activation quantization: mode {act_mode!r} (dynamic|static), bits {act_bits} (2..8)")
        self.act_bits, self.act_mode = act_bits, act_mode
        self.register_buffer("act_scale", torch.ones(1) if act_mode == "static" else None)

    @classmethod
    def wrap(cls, q: QuantLinear, act_bits: int = 8, act_mode: str = "dynamic", act_scale: float | None = None) -> "ActQuantLinear":
        """The same packed weight with quantized activations (`act_scale` for static mode)."""
        m = cls(q.in_features, q.out_features, act_bits=act_bits, act_mode=act_mode, bits=q.bits,
                group_size=q.group_size, symmetric=q.symmetric, parent_bits=q.parent_bits, serve_bits=q.serve_bits,
                bias=q.bias is not None, device=q.qweight.device)
        m.load_state_dict({k: v for k, v in q.state_dict().items()}, strict=False)
        if act_mode == "static":
            m.act_scale.fill_(act_scale)
        return m

    def layer_config(self) -> dict:
        return {**super().layer_config(), "kind": self.kind, "act_bits": self.act_bits, "act_mode": self.act_mode}

    @classmethod
    def from_layer_config(cls, cfg: dict, device=None) -> "ActQuantLinear":
        return cls(cfg["in_features"], cfg["out_features"], act_bits=cfg["act_bits"], act_mode=cfg["act_mode"],
                   bits=cfg["bits"], group_size=cfg["group_size"], symmetric=cfg["symmetric"],
                   parent_bits=cfg["parent_bits"], serve_bits=cfg["serve_bits"], bias=cfg["bias"], device=device)

    def stored_bits(self) -> int:
        return super().stored_bits() + (0 if self.act_scale is None else 32)

    @property
    def packed(self) -> kernels.Affine:
        b, r = self._buffers, self.serve_bits
        q = b["qweight"] if r == self.bits and self._slice_of is None else self._working_codes()
        s, z, a = b["scale"], b["zero"], b["act_scale"]
        return self.packed_view((q, r, s, z, a, self.act_bits), lambda: kernels.Affine(
            q, r, self.in_features, s, z, self.group_size, self.parent_bits, act_bits=self.act_bits, act_scale=a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", A{self.act_bits} {self.act_mode}"
