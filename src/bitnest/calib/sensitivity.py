"""Sensitivity-driven mixed precision: how much does the model suffer when only layer l is quantized to b bits,
and which bits per layer meet a bits-per-weight budget at the least total damage.

Sensitivity s_l(b) = mean KL(p_FP ‖ p_l,b) of the next-token distributions on calibration tokens, with every
other layer in full precision (an end-to-end measure: it sees how errors are amplified downstream, unlike a
per-layer output error). `block_sensitivity` is the local alternative that needs one decoder block at a time (so
it streams): s_l(b) = Σ‖y_l,b − y‖² / Σ‖y‖², the relative change of the residual stream leaving l's block when l
alone is at b bits, on the FP model's inputs to that block. Allocation: start every layer at its widest
candidate and repeatedly narrow the layer with the smallest added sensitivity per bit saved until the budget holds (greedy on the convex hull of
each layer's (bits, s) curve). The result is QuantConfig's `overrides`: ((module-name glob, bits), ...).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import BitnestError
from ..models.blocks import replace_module


def _logprobs(model, calib: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    from ..eval.perplexity import _logits
    dev = next(model.parameters()).device
    return [F.log_softmax(_logits(model, x.to(dev)).float(), -1) for x in calib.split(batch_size)]  # [(b, T, V)]


@torch.no_grad()
def layer_sensitivity(model, names: list[str], calib: torch.Tensor, candidates: tuple[int, ...],
                      quantizer: Callable[[torch.nn.Module, int], torch.nn.Module], *, batch_size: int = 8,
                      progress: bool = True) -> tuple[dict, dict]:
    """({name: {bits: KL}}, {name: {bits: served bits}}): each layer quantized alone by quantizer(linear, bits)."""
    ref = _logprobs(model, calib, batch_size)
    sens, cost = {}, {}
    for name in tqdm(names, desc="sensitivity", disable=not progress, leave=False):
        lin = model.get_submodule(name)
        sens[name], cost[name] = {}, {}
        for b in candidates:
            q = quantizer(lin, b)
            replace_module(model, name, q)
            lp = _logprobs(model, calib, batch_size)
            kl = sum(F.kl_div(a, r, log_target=True, reduction="sum").item() for a, r in zip(lp, ref))
            sens[name][b] = kl / (calib.numel())
            cost[name][b] = q.served_bits()
        replace_module(model, name, lin)
    return sens, cost


@torch.no_grad()
def block_sensitivity(model, names: list[str], calib: torch.Tensor, candidates: tuple[int, ...],
                      quantizer: Callable[[torch.nn.Module, int], torch.nn.Module], *, batch_size: int = 8,
                      progress: bool = True) -> tuple[dict, dict]:
    """({name: {bits: s}}, {name: {bits: served bits}}) with s the relative squared change of the block's output
    when layer `name` alone is quantized by quantizer(linear, bits); every block sees the FP model's activations
    (calib.driver.blockwise, nothing is replaced, so under a streaming run nothing is written)."""
    from .driver import blockwise, require_block_layers

    require_block_layers(model, names, "block sensitivity scores")
    sens, cost = {}, {}

    def process(block_name, block, runner):
        local = [n for n in names if n.startswith(block_name + ".")]
        if not local:
            return
        ref = runner.forward()  # [(b, T, C)] the FP block's outputs
        norm = sum(float(y.double().pow(2).sum()) for y in ref)
        for name in local:
            rel = name[len(block_name) + 1:]
            lin = block.get_submodule(rel)
            sens[name], cost[name] = {}, {}
            for b in candidates:
                q = quantizer(lin, b)
                replace_module(block, rel, q)
                out = runner.forward()
                sens[name][b] = sum(float((o - y).double().pow(2).sum()) for o, y in zip(out, ref)) / max(norm, 1e-30)
                cost[name][b] = q.served_bits()
            replace_module(block, rel, lin)

    blockwise(model, calib, process, batch_size=batch_size, progress=progress, desc="sensitivity")
    return sens, cost


def allocate_bits(sens: dict, cost: dict, sizes: dict, budget: float) -> dict[str, int]:
    """{name: bits} with Σ cost ≤ budget · Σ sizes (bits per weight), greedily minimizing Σ sensitivity."""
    bits = {n: max(c) for n, c in cost.items()}
    total = sum(cost[n][bits[n]] for n in bits)
    limit = budget * sum(sizes.values())
    while total > limit:
        best = None
        for n, b in bits.items():
            for lower in (c for c in cost[n] if c < b):  # any narrower option: the curve need not be convex
                saved = cost[n][b] - cost[n][lower]
                if saved <= 0:
                    continue
                ratio = (sens[n][lower] - sens[n][b]) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, n, lower)
        if best is None:
            lo = sum(cost[n][min(cost[n])] for n in cost) / sum(sizes.values())
            raise BitnestError(f"a budget of {budget} bits/weight is below the narrowest candidates ({lo:.3f})")
        _, n, lower = best
        total -= cost[n][bits[n]] - cost[n][lower]
        bits[n] = lower
    return bits


def as_overrides(bits: dict[str, int]) -> tuple[int, tuple[tuple[str, int], ...]]:
    """(default bits, overrides): the most common width becomes the default, the other layers override it."""
    default = Counter(bits.values()).most_common(1)[0][0]
    return default, tuple((n, b) for n, b in bits.items() if b != default)
