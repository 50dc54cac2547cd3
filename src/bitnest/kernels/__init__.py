"""Matmul on packed weights: one entry point, the path chosen in one place.

    y = kernels.linear(x, layer.packed, layer.bias)

`packed` is the layer's canonical packed weight (kernels/packed.py). The path is chosen by (device, kind, bits,
group size, shape): the first registered path for that device and kind whose `supports` accepts the weight,
falling back to the pure-torch reference (kernels/reference.py), which runs everywhere. Registered here:

  cpu    C++ kernels (kernels/cpu.py, compiled on first use; AVX-512 or AVX2 where the CPU has it): affine b = 1..8
         (per channel / tensor / group, sym / asym, Matryoshka slices, Extra Precision, activation-quantized),
         sign (OneBit / BitNet), codebook (table look-up), int8 × int8 (integer-only)
  cuda   Triton kernels (kernels/triton_kernels.py): affine, sign, codebook — when triton is installed
  any    reference

`use("reference")` (a context manager) or BITNEST_KERNELS=reference forces the reference path, e.g. to
compare a model's output on both paths; `path_for(x, packed)` names the path a call would take.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .packed import Affine, Codebook, Int8, Packed, Sign, groups

__all__ = ["Affine", "Codebook", "Int8", "Packed", "Sign", "groups", "linear", "path_for", "register", "use",
           "slice_pack", "REFERENCE"]

REFERENCE = "reference"


@dataclass(frozen=True)
class Path:
    name: str
    fn: Callable[[torch.Tensor, Packed], torch.Tensor]  # y without the bias (sign: with its LayerNorm)
    supports: Callable[[Packed], bool]


_PATHS: dict[tuple[str, str], list[Path]] = {}
_CHOICE: dict[tuple, Path] = {}
_CHOICE_GEN: list[str] = []  # one entry per registration
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("bitnest_kernel_path", default=None)


def register(device: str, kind: str, name: str, supports: Callable[[Packed], bool] = lambda p: True):
    """Decorator: a fast path for (device type, kind); earlier registrations are preferred."""
    def deco(fn):
        _PATHS.setdefault((device, kind), []).append(Path(name, fn, supports))
        _CHOICE.clear()
        _CHOICE_GEN.append(name)  # invalidates the choices memoised on packed views
        return fn
    return deco


_REF = {kind: Path(REFERENCE, fn, lambda p: True) for kind, fn in reference.LINEAR.items()}


def _forced() -> str | None:
    f = _FORCED.get()
    if f is None and os.environ.get("BITNEST_KERNELS", "").lower() in ("reference", "ref", "off", "0"):
        f = REFERENCE
    return f


def _select(x: torch.Tensor, p: Packed) -> Path:
    forced, dev = _forced(), x.device.type
    # a layer hands in the same packed view every forward (nn/view.py): its last choice rides on it, so a decode
    # step skips building the key (≈ 2–4 µs of Python per call); a registration (len(_PATHS)) or another device
    # or forced path looks it up again
    memo = p.__dict__.get("_path")
    if memo is not None and memo[0] == dev and memo[1] == forced and memo[2] == len(_CHOICE_GEN):
        return memo[3]
    key = (dev, *p.key(), p.in_features, p.out_features, forced)
    path = _CHOICE.get(key)
    if path is None:
        cands = [c for c in _PATHS.get((dev, p.kind), []) if forced in (None, c.name)]
        path = next((c for c in cands if c.supports(p)), _REF[p.kind])
        _CHOICE[key] = path
    object.__setattr__(p, "_path", (dev, forced, len(_CHOICE_GEN), path))
    return path


def path_for(x: torch.Tensor, p: Packed) -> str:
    """The name of the path `linear(x, p)` takes."""
    return _select(x, p).name


class _Differentiable(torch.autograd.Function):
    """A fast path's forward with the reference's gradient w.r.t. x (recomputed in backward), so that training
    through frozen packed layers (QAT teachers, OmniQuant blocks, adapters) works on every path."""

    @staticmethod
    def forward(ctx, x, path, p):
        ctx.save_for_backward(x)
        ctx.p = p
        return path.fn(x, p)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xr = x.detach().requires_grad_()
            (gx,) = torch.autograd.grad(reference.LINEAR[ctx.p.kind](xr, ctx.p), xr, gy)
        return gx, None, None


def linear(x: torch.Tensor, p: Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (…, in) · Ŵᵀ (+ bias) -> (…, out) in x's dtype, Ŵ the weight `p` describes (never materialized whole
    on the fast paths)."""
    path = _select(x, p)
    if path.name != REFERENCE and x.requires_grad and torch.is_grad_enabled():
        y = _Differentiable.apply(x, path, p)
    else:
        y = path.fn(x, p)
    return y if bias is None else y + bias.to(y.dtype)


@contextlib.contextmanager
def use(name: str | None):
    """Force one path by name ("reference", "cpu", "triton") for the calls inside; None restores the choice."""
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def slice_pack(qweight: torch.Tensor, c: int, r: int, in_features: int, clamp: bool = True) -> torch.Tensor:
    """c-bit packed codes -> the r-bit Matryoshka slice S(q, r) packed at r bits (r + 1 when clamp=False)."""
    if qweight.device.type == "cpu" and _forced() != REFERENCE and _cpu_ok():
        return cpu.slice_pack(qweight, c, r, in_features, clamp)
    from ..formats.packing import pack, unpack
    from ..grids.nested import slice_codes
    t = slice_codes(unpack(qweight, c, in_features), c, r, clamp)  # (out, in)
    return pack(t, r if clamp else r + 1)


# ------------------------------------------------------------------------------------------ CPU paths
from . import cpu  # noqa: E402


def _cpu_ok() -> bool:
    return cpu.available()


def _affine_ok(p: Affine) -> bool:
    return _cpu_ok() and p.scale.dtype == torch.float16 and (p.zero is None or p.zero.dtype == torch.float16)


register("cpu", "affine", "cpu", _affine_ok)(cpu.affine)
register("cpu", "sign", "cpu", lambda p: _cpu_ok())(cpu.sign)
register("cpu", "codebook", "cpu", lambda p: _cpu_ok() and p.table.dtype == torch.float16
         and (p.scale is None or p.scale.dtype == torch.float16))(cpu.codebook)
register("cpu", "int8", "cpu", lambda p: _cpu_ok())(cpu.int8)

# ------------------------------------------------------------------------------------------ CUDA paths
def _triton_ok(p: Packed) -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def _triton(kind: str):
    def fn(x, p):  # imported on first use: importing triton costs seconds and is useless without a GPU
        from . import triton_kernels
        return getattr(triton_kernels, kind)(x, p)
    return fn


for _kind in ("affine", "sign", "codebook", "int8"):
    register("cuda", _kind, "triton", _triton_ok)(_triton(_kind))
