"""Run-time precision: switch a loaded Matryoshka model between widths in memory, without touching the disk.

    m = load_model("runs/mq", dtype=torch.bfloat16).model
    m.set_precision(4)                          # every nested layer at int4
    m.set_precision({"*.mlp.*": 2})             # a per-layer map (module-name globs); others keep their width
    m.set_precision(budget=3.0)                 # Mix'n'Match: the strategy's best mix within 3 bits per weight
    m.precision()                               # {"bits_per_weight": …, "layers": {name: r}, "resident_bytes": …}

A nested layer keeps its c-bit codes and builds the r-bit slice S(q, r) once per switch into a working copy
packed at r bits (nn/qlinear.py), so the int-r model reads r bits per weight per token and holds c + r bits per
weight; serving r = c needs no copy. `cache=True` keeps every width built so far (c + Σ r bits) and makes
switching back free. A switch validates every requested width before it changes any layer: a bad request
leaves the model as it was.
"""
from __future__ import annotations

import fnmatch
import time
import types
from collections.abc import Mapping

import torch
from torch import nn

from . import hugepages
from .errors import BitnestError

DEFAULT_STRATEGY = "reverse_pyramid"  # the best of the paper's strategies on ref-10m (BENCHMARKS.md, matquant)


def nested_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers that store c-bit codes of their own grid and can serve any r ≤ c."""
    return {n: m for n, m in model.named_modules()
            if hasattr(m, "set_serve_bits") and getattr(m, "bits", None) == getattr(m, "parent_bits", None)}


def resolve_mix(model: nn.Module, mods: dict[str, nn.Module], bits, budget, strategy) -> dict[str, int]:
    if budget is not None:
        if bits is not None:
            raise BitnestError("give bits (a width or a per-layer map) or a budget, not both")
        from .mixnmatch import strategy_mix
        levels = tuple(sorted({max(m.bits for m in mods.values()), 4, 2}, reverse=True))
        return strategy_mix(model, strategy, budget, names=list(mods), levels=levels)
    if isinstance(bits, Mapping):
        mix = {}
        for pat, r in bits.items():
            hits = [n for n in mods if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise BitnestError(f"no nested layer matches {pat!r} (layers look like {next(iter(mods))})")
            mix.update({n: r for n in hits})
        return mix
    if bits is None:
        raise BitnestError("set_precision needs bits (an int or a per-layer map) or budget=")
    return {n: bits for n in mods}


def set_precision(model: nn.Module, bits: int | Mapping[str, int] | None = None, *, budget: float | None = None,
                  strategy: str = DEFAULT_STRATEGY, cache: bool | None = None) -> dict:
    """Serve the nested layers at new widths (in place); returns `precision(model)` plus the switch time."""
    mods = nested_layers(model)
    if not mods:
        raise BitnestError("this model has no Matryoshka (nested) layers: only sliced/matquant checkpoints switch "
                           "precision at run time")
    mix = resolve_mix(model, mods, bits, budget, strategy)
    for n, r in mix.items():  # validate everything before changing anything
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= mods[n].bits:
            raise BitnestError(f"cannot serve {n} at {r!r} bits: it stores {mods[n].bits}-bit codes (choose 1..{mods[n].bits})")
    t0 = time.perf_counter()
    with torch.no_grad():
        for n, m in mods.items():
            if cache is not None and hasattr(m, "cache_slices"):
                m.cache_slices = cache
                if not cache:
                    m._slices = {}
            if n in mix:
                m.set_serve_bits(mix[n])
    out = precision(model)
    out["switch_seconds"] = time.perf_counter() - t0
    return out


def precision(model: nn.Module) -> dict:
    """The widths served now, the bits per weight they store (standalone-slice accounting, as eval.bits), and
    the bytes the model holds in memory (every tensor once, working copies included)."""
    mods = nested_layers(model)
    n = sum(m.in_features * m.out_features for m in mods.values())
    bits = sum(m.served_bits() for m in mods.values())
    widths = sorted({m.serve_bits for m in mods.values()})
    return {"bits": widths[0] if len(widths) == 1 else None, "bits_per_weight": bits / max(n, 1),
            "layers": {k: m.serve_bits for k, m in mods.items()}, "resident_bytes": resident_bytes(model)}


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage the model holds (parameters, buffers, cached slices)."""
    seen, total = set(), 0
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t is not None]
    for m in model.modules():
        tensors += [t for k, t in getattr(m, "_slices", {}).items() if k != "src" and torch.is_tensor(t)]
    for t in tensors:
        if t.is_meta:
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def attach(model: nn.Module) -> nn.Module:
    """Bind `model.set_precision(...)` and `model.precision()` (a loaded bitnest model gets them from load_model),
    and put the packed codes on huge pages where a loader did not already (hugepages.py)."""
    hugepages.place_module(model)
    object.__setattr__(model, "set_precision", types.MethodType(set_precision, model))
    object.__setattr__(model, "precision", types.MethodType(precision, model))
    return model
