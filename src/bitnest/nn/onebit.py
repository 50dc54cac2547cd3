"""1-bit sign layers: OneBit (Xu et al. 2024) and the BitNet-style baseline, for training and for serving.

    Y = LayerNorm_noaffine([(X ⊙ g) · Sign(W)ᵀ] ⊙ h) (+ bias)          methods.md §2

One function, `sign_linear`, computes this from (±1 matrix, g, h); the training modules call it with the
straight-through sign of their latent weight and float16-rounded g, h, the packed module with the unpacked
signs and its float16 g, h — so the training forward equals the deployed forward exactly (bit for bit).

  OneBitLinear       training: latent W (out, in), g (in,), h (out,) trainable, all float32
  BitNetLinear       training: latent W; Sign(W − mean W) with one scale β = mean|W − mean W|
  PackedSignLinear   serving: `qweight` (out, ceil(in/8)) uint8 signs, 8 per byte (formats.packing, 1 bit,
                     code 1 = negative), `g` (in,) and `h` (out,) float16 — either may be absent (BitNet
                     has no g and a single-entry h); the full-precision weight is never stored
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import BitnestError
from ..formats.packing import packed_len
from ..grids.sign import VALUE_BITS, pack_signs, sign, sign_ste, svid, unpack_signs
from ..kernels.reference import LN_EPS, sign_linear  # noqa: F401 — the one formula, shared by training and serving
from .view import PackedView

STORE_DTYPE = torch.float16  # g, h on disk
INITS = ("nmf", "svd", "sign")
LATENT_INITS = ("paper", "reference")


class _RoundFp16STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v):
        return v.to(STORE_DTYPE).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fp16_ste(v: torch.Tensor) -> torch.Tensor:
    """v rounded to float16 (the value the checkpoint will hold), gradient passed straight through."""
    return _RoundFp16STE.apply(v)


class PackedSignLinear(PackedView):
    """A served 1-bit layer: packed signs + float16 value vectors; forward from the packed form."""

    kind = "onebit"
    keep_dtype = ("g", "h")  # checkpoint tensors stored in their own dtype, not the model's storage dtype

    def __init__(self, in_features: int, out_features: int, *, g: bool = True, h_size: int | None = None,
                 post_ln: bool = True, bias: bool = False, method: str = "onebit", device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.post_ln, self.method = post_ln, method
        h_size = out_features if h_size is None else h_size
        if h_size not in (0, 1, out_features):
            raise BitnestError(f"h must have 0, 1 or {out_features} entries, got {h_size}")
        self.register_buffer("qweight", torch.zeros(out_features, packed_len(in_features, 1), dtype=torch.uint8, device=device))
        self.register_buffer("g", torch.ones(in_features, dtype=STORE_DTYPE, device=device) if g else None)
        self.register_buffer("h", torch.ones(h_size, dtype=STORE_DTYPE, device=device) if h_size else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_parts(cls, W_for_signs: torch.Tensor, g: torch.Tensor | None, h: torch.Tensor | None, *,
                   post_ln: bool, bias: torch.Tensor | None = None, method: str = "onebit") -> "PackedSignLinear":
        out, inp = W_for_signs.shape
        m = cls(inp, out, g=g is not None, h_size=0 if h is None else h.numel(), post_ln=post_ln,
                bias=bias is not None, method=method, device=W_for_signs.device)
        m.qweight.copy_(pack_signs(W_for_signs.detach()))
        if g is not None:
            m.g.copy_(g.detach().to(STORE_DTYPE))
        if h is not None:
            m.h.copy_(h.detach().reshape(-1).to(STORE_DTYPE))
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    def layer_config(self) -> dict:
        # bits/serve_bits/group_size: the fields `bitnest info` lists for every layer
        return {"kind": self.kind, "method": self.method, "bits": 1, "serve_bits": 1, "group_size": None,
                "in_features": self.in_features,
                "out_features": self.out_features, "g": self.g is not None,
                "h_size": 0 if self.h is None else self.h.numel(), "post_ln": self.post_ln,
                "bias": self.bias is not None}

    @classmethod
    def from_layer_config(cls, cfg: dict, device=None) -> "PackedSignLinear":
        return cls(cfg["in_features"], cfg["out_features"], g=cfg["g"], h_size=cfg["h_size"],
                   post_ln=cfg["post_ln"], bias=cfg["bias"], method=cfg.get("method", "onebit"), device=device)

    def signs(self, dtype=torch.float32) -> torch.Tensor:
        return unpack_signs(self.qweight, self.in_features, dtype)  # (out, in) ±1

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def served_bits(self) -> int:
        """Every stored bit of the layer (bias excluded, as QuantLinear): signs incl. row padding + g + h."""
        vec = sum(t.numel() for t in (self.g, self.h) if t is not None)
        return self.qweight.numel() * 8 + vec * VALUE_BITS

    stored_bits = served_bits

    @property
    def packed(self) -> kernels.Sign:
        b = self._buffers
        q, g, h = b["qweight"], b["g"], b["h"]
        return self.packed_view((q, g, h, self.post_ln), lambda: kernels.Sign(q, self.in_features, g, h, self.post_ln))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.method}, "
                f"{self.served_bits() / self.num_weights():.4f} bits/weight, post_ln={self.post_ln}")


class OneBitLinear(nn.Module):
    """Training form of a OneBit layer: latent weight W (only its sign is used), g, h — all trainable."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, post_ln: bool = True,
                 backward: str = "tanh", device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.post_ln, self.backward = post_ln, backward
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device))
        self.g = nn.Parameter(torch.ones(in_features, device=device))
        self.h = nn.Parameter(torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, init: str = "nmf", latent_init: str = "paper", post_ln: bool = True,
                    backward: str = "tanh", nmf_iters: int = 200) -> "OneBitLinear":
        """SVID initialization from the full-precision weight (methods.md §2).

        init: nmf | svd — |W| ≈ a bᵀ, h ← a, g ← b; sign — g = h = 1 (sign-only start).
        latent_init: paper — the latent weight is W; reference — sign(W) · 0.01 (the reference code).
        """
        if init not in INITS:
            raise BitnestError(f"unknown OneBit init {init!r}; choose one of {', '.join(INITS)}")
        if latent_init not in LATENT_INITS:
            raise BitnestError(f"unknown latent init {latent_init!r}; choose one of {', '.join(LATENT_INITS)}")
        W = linear.weight.detach().float()  # (out, in)
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, post_ln=post_ln,
                backward=backward, device=W.device)
        m.weight.copy_(W if latent_init == "paper" else sign(W) * 0.01)
        if init != "sign":
            a, b = svid(W, init, iters=nmf_iters) if init == "nmf" else svid(W, "svd")
            m.h.copy_(a)
            m.g.copy_(b)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = sign_ste(self.weight, self.backward)  # (out, in) ±1
        return sign_linear(x, S, fp16_ste(self.g), fp16_ste(self.h), self.bias, self.post_ln)

    @torch.no_grad()
    def to_packed(self) -> PackedSignLinear:
        return PackedSignLinear.from_parts(self.weight, self.g, self.h, post_ln=self.post_ln, bias=self.bias,
                                           method="onebit")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, post_ln={self.post_ln}, backward={self.backward}"


class BitNetLinear(nn.Module):
    """Training form of the BitNet-style baseline: Y = [X · Sign(W − μ)ᵀ] · β, μ = mean W,
    β = mean|W − μ| (one scale per matrix, recomputed from the latent weight every step)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, post_ln: bool = False,
                 backward: str = "tanh", device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.post_ln, self.backward = post_ln, backward
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, post_ln: bool = False, backward: str = "tanh") -> "BitNetLinear":
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, post_ln=post_ln,
                backward=backward, device=linear.weight.device)
        m.weight.copy_(linear.weight.detach().float())
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def centered(self) -> tuple[torch.Tensor, torch.Tensor]:
        Wc = self.weight - self.weight.mean()  # (out, in)
        beta = Wc.abs().mean().reshape(1)  # (1,)
        return Wc, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Wc, beta = self.centered()
        return sign_linear(x, sign_ste(Wc, self.backward), None, fp16_ste(beta), self.bias, self.post_ln)

    @torch.no_grad()
    def to_packed(self) -> PackedSignLinear:
        Wc, beta = self.centered()
        return PackedSignLinear.from_parts(Wc, None, beta, post_ln=self.post_ln, bias=self.bias, method="bitnet")

