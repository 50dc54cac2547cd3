"""Bits accounting: every stored bit per quantized weight, and whole-model bytes.

`bits_per_weight` counts, for each quantized layer, its codes at the width it serves plus its scales and
zeros (and whatever else a packed module stores), divided by the number of weights it replaced. A nested
checkpoint served at r bits is counted as the standalone r-bit checkpoint `bitnest slice` would write.
`model_bytes` is the size of all tensors of that checkpoint: packed layers as above, everything else at
the storage dtype, tied tensors once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn.qlinear import QuantLinear


@dataclass(frozen=True)
class BitsReport:
    bits_per_weight: float  # over quantized weights (16 or 32 for an unquantized model: its storage dtype)
    quantized_weights: int
    model_bytes: int
    per_layer: dict  # name -> served bits per weight


def packed_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module that reports its own storage through `served_bits()` and `num_weights()`."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "served_bits") and n}


def _num_weights(m) -> int:
    return m.num_weights() if hasattr(m, "num_weights") else m.in_features * m.out_features


def bits_report(model: torch.nn.Module, storage_dtype: torch.dtype = torch.float16,
                only: list[str] | None = None) -> BitsReport:
    """`only`: restrict bits_per_weight to these module names (e.g. the FFN, for MatQuant's metric)."""
    packed = packed_modules(model)
    inside = {id(t) for m in packed.values() for t in list(m.parameters()) + list(m.buffers())}
    seen, other_bytes = set(), 0
    for t in list(model.parameters()) + list(model.buffers(recurse=True)):
        if id(t) in inside or id(t) in seen:
            continue
        seen.add(id(t))
        other_bytes += t.numel() * (torch.finfo(storage_dtype).bits // 8 if t.is_floating_point() else t.element_size())
    bias_bytes = sum(m.bias.numel() * torch.finfo(storage_dtype).bits // 8 for m in packed.values() if getattr(m, "bias", None) is not None)
    per_layer = {n: m.served_bits() / _num_weights(m) for n, m in packed.items()}
    total_bits = sum(m.served_bits() for m in packed.values())
    sel = packed if only is None else {n: m for n, m in packed.items() if n in set(only)}
    nw = sum(_num_weights(m) for m in sel.values())
    bpw = sum(m.served_bits() for m in sel.values()) / nw if nw else float(torch.finfo(storage_dtype).bits)
    return BitsReport(bpw, nw, other_bytes + bias_bytes + (total_bits + 7) // 8, per_layer)
