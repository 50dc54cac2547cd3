"""Activation observers for static quantization: a per-tensor clipping range c from calibration data, then
the symmetric b-bit scale s = c / (2^(b−1) − 1).

  minmax      c = max |x| over every calibration value (exact, running)
  percentile  c = the p-th percentile of |x| (default 99.99) — ignores rare outliers
  mse         c minimizing E[(x − Q_c(x))²] over a grid of candidates (0.05 … 1) · max |x|

The percentile and MSE choices work on a bounded uniform subsample of token rows (memory stays
O(max_rows · features)); the rows themselves are kept so a layer's *outputs* can be derived from them.
The MSE also counts the `top_k` largest |x| ever seen exactly, so a rare outlier the subsample missed still
weighs on the choice of c.
"""
from __future__ import annotations

import torch

from ..errors import BitnestError
from ..nn.actquant import fake_quant_sym
from .driver import Hessian

OBSERVERS = ("minmax", "percentile", "mse")


class Observer:
    def __init__(self, max_rows: int = 4096, seed: int = 0, top_k: int = 128):
        self.absmax, self.count, self.top_k = 0.0, 0, top_k
        self.top = torch.empty(0)  # the top_k largest |x| seen
        self.rows: torch.Tensor | None = None  # (≤ max_rows, features) uniform subsample of the token rows
        self.keys = torch.empty(0)  # reservoir by random keys: keep the rows with the smallest keys
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        X = x.detach().reshape(-1, x.shape[-1]).float()  # (N, features)
        self.absmax = max(self.absmax, float(X.abs().max()))
        self.count += X.numel()
        self.top = torch.cat([self.top, X.abs().flatten().topk(min(self.top_k, X.numel())).values.cpu()])
        self.top = self.top.topk(min(self.top_k, self.top.numel())).values
        keys = torch.cat([self.keys, torch.rand(X.shape[0], generator=self.gen)])
        rows = X if self.rows is None else torch.cat([self.rows, X])
        if len(keys) > self.max_rows:
            keep = keys.topk(self.max_rows, largest=False).indices
            keys, rows = keys[keep], rows[keep.to(rows.device)]
        self.keys, self.rows = keys, rows

    def range(self, method: str = "minmax", bits: int = 8, percentile: float = 99.99) -> float:
        """The clipping value c (the static scale is c / (2^(b−1) − 1))."""
        if method == "minmax" or self.rows is None:
            return max(self.absmax, 1e-8)
        a = self.rows.abs().flatten()
        if method == "percentile":
            k = max(1, min(a.numel(), int(round(a.numel() * percentile / 100))))
            return max(float(a.kthvalue(k).values), 1e-8)
        if method == "mse":
            return mse_range(self.rows, self.absmax, bits, top=self.top, count=self.count)
        raise BitnestError(f"unknown observer {method!r}; choose from {OBSERVERS}")

    def scale(self, method: str = "minmax", bits: int = 8, percentile: float = 99.99) -> float:
        return self.range(method, bits, percentile) / ((1 << (bits - 1)) - 1)


def mse_range(x: torch.Tensor, absmax: float, bits: int, n_grid: int = 50, max_values: int = 1 << 17,
              top: torch.Tensor | None = None, count: int | None = None) -> float:
    """c ∈ {0.05, …, 1} · absmax minimizing the total squared quantization error: a fixed subsample of the
    values x, scaled up to `count` values, plus the exact largest values `top`."""
    v = x.flatten()
    if v.numel() > max_values:
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:max_values].to(v.device)]
    w = (count or v.numel()) / v.numel()  # each sampled value stands for w values
    t = torch.zeros(0) if top is None else top.to(v.device)
    qmax = (1 << (bits - 1)) - 1
    best_c, best_e = absmax, None
    for f in torch.linspace(0.05, 1.0, n_grid).tolist():
        c = max(absmax * f, 1e-8)
        e = w * float(((fake_quant_sym(v, c / qmax, bits) - v) ** 2).sum()) + float(((fake_quant_sym(t, c / qmax, bits) - t) ** 2).sum())
        if best_e is None or e < best_e:
            best_c, best_e = c, e
    return best_c


class InputStats:
    """What activation-quantizing methods collect on a Linear's input: an Observer, and the Hessian when the
    weights are quantized by GPTQ."""

    def __init__(self, in_features: int, device=None, hessian: bool = False, max_rows: int = 4096):
        self.obs = Observer(max_rows)
        self.hess = Hessian(in_features, device) if hessian else None

    @property
    def H(self) -> torch.Tensor:
        return self.hess.H

    def add(self, x: torch.Tensor) -> None:
        self.obs.add(x)
        if self.hess is not None:
            self.hess.add(x)
