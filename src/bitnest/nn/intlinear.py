"""IntLinear: an integer-only linear layer (int8 weights and activations, int32 accumulation, fixed-point
requantization; kernels/integer.py).

  x_q = clamp(round(x / s_x), ±127)                 int8 input (static per-tensor scale s_x, calibrated)
  acc = x_q · W_qᵀ + b_q                            int32; W_q int8 per-channel symmetric, b_q = round(b / (s_x s_w))
  y_q = (acc · M0 + 2^(k−1)) >> k, clamp ±127       int8 output; M0 · 2^−k ≈ s_x s_w / s_y per output channel
  y   = s_y · y_q                                   back to float for the rest of the (float) model
The matmul path between x_q and y_q is integers only. The model around it (norms, attention, SiLU) stays in
float, so each layer quantizes its own input and dequantizes its output at the boundary. Stored: W_q, M0
(int32), k (int8), b_q (int32), s_x (fp32) and s_y (fp32, per output channel or per tensor); w's own scale
is folded into M0 and not stored.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..kernels import reference
from .view import PackedView
from ..kernels.integer import QMAX, int8_matmul, quantize_multiplier, requantize, simulate_requantize


class IntLinear(PackedView):
    kind = "intlinear"
    keep_dtype = ("x_scale", "y_scale")

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, per_channel_out: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("M0", torch.zeros(out_features, dtype=torch.int32, device=device))
        self.register_buffer("k", torch.ones(out_features, dtype=torch.int8, device=device))
        self.register_buffer("bias_q", torch.zeros(out_features, dtype=torch.int32, device=device) if bias else None)
        self.register_buffer("x_scale", torch.ones(1, device=device))
        self.register_buffer("y_scale", torch.ones(out_features if per_channel_out else 1, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear, x_scale: float, y_scale: torch.Tensor) -> "IntLinear":
        """Quantize `lin` given the calibrated input scale s_x and output scale(s) s_y ((out,) or (1,))."""
        W = lin.weight.detach().float()  # (out, in)
        y_scale = torch.as_tensor(y_scale, dtype=torch.float32).reshape(-1)
        m = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, per_channel_out=y_scale.numel() > 1,
                device=W.device)
        s_w = (W.abs().amax(1) / QMAX).clamp_min(1e-12)  # (out,)
        m.qweight.copy_(torch.round(W / s_w[:, None]).clamp(-QMAX, QMAX).to(torch.int8))
        M0, k = quantize_multiplier(x_scale * s_w.double() / y_scale.double())  # (out,) each
        m.M0.copy_(M0.to(torch.int32))
        m.k.copy_(k.to(torch.int8))
        if lin.bias is not None:
            m.bias_q.copy_(torch.round(lin.bias.detach().double() / (x_scale * s_w.double())).to(torch.int32))
        m.x_scale.fill_(x_scale)
        m.y_scale.copy_(y_scale)
        return m

    def check_loaded(self) -> str | None:
        """After loading a checkpoint: the requantization constants are ones `quantize_multiplier` makes
        (2^(P−1) ≤ M0 < 2^P, 1 ≤ k ≤ 62, positive scales), else what is wrong. (out,) vectors: no cost."""
        from ..kernels.integer import P
        if self.k.numel() and not (1 <= int(self.k.min()) and int(self.k.max()) <= 62):
            return f"shift k outside 1..62 (found {int(self.k.min())}..{int(self.k.max())})"
        if self.M0.numel() and not (1 << (P - 1) <= int(self.M0.min()) and int(self.M0.max()) < 1 << P):
            return f"multiplier M0 outside [2^{P - 1}, 2^{P})"
        if not (bool((self.x_scale > 0).all()) and bool((self.y_scale > 0).all())):
            return "a scale that is not positive"
        return None

    @property
    def packed(self) -> kernels.Int8:
        b = self._buffers
        parts = (b["qweight"], b["M0"], b["k"], b["bias_q"], b["x_scale"], b["y_scale"])
        return self.packed_view(parts, lambda: kernels.Int8(*parts))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return reference.int8_quantize_input(x, self.packed)

    def int_forward(self, x_q: torch.Tensor) -> torch.Tensor:
        """int8 (N, in) -> int8 (N, out), integers only."""
        acc = int8_matmul(x_q, self.qweight)  # (N, out) int32
        if self.bias_q is not None:
            acc = acc + self.bias_q
        return requantize(acc, self.M0.long(), self.k.long())

    def simulate(self, x_q: torch.Tensor) -> torch.Tensor:
        """The same computation in float64 (integer-valued floats): equals int_forward exactly."""
        acc = x_q.double() @ self.qweight.double().T  # (N, out), exact below 2^53
        if self.bias_q is not None:
            acc = acc + self.bias_q.double()
        return simulate_requantize(acc, self.M0.long(), self.k.long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.packed)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The effective float weight, W_q · s_w with s_w = M · s_y / s_x (for inspection)."""
        return reference.int8_weight(self.packed, dtype)

    def layer_config(self) -> dict:
        return {"kind": self.kind, "bits": 8, "serve_bits": 8, "group_size": None, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias_q is not None,
                "per_channel_out": self.y_scale.numel() > 1}

    @classmethod
    def from_layer_config(cls, cfg: dict, device=None) -> "IntLinear":
        return cls(cfg["in_features"], cfg["out_features"], bias=cfg["bias"], per_channel_out=cfg["per_channel_out"], device=device)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def served_bits(self) -> int:
        """Every stored bit: int8 weights, M0 (32) and k (8) per channel, s_x and s_y (32 each), and the int32
        bias, which belongs to the integer representation."""
        b = 0 if self.bias_q is None else 32 * self.out_features
        return 8 * self.qweight.numel() + 40 * self.out_features + 32 * (1 + self.y_scale.numel()) + b

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W8A8 integer-only"
