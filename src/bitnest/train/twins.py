"""The one prepare → train → convert scaffold of every quantization-aware training (MatQuant QAT and OmniQuant,
OneBit / BitNet distillation):

    result = train_twins(model, names, make=lambda name, lin: Twin(lin), params=lambda twins: [...],
                         run=lambda params, twins: train(...), convert=lambda twins: ...)

1. each named Linear of `model` (a whole model, or one decoder block) is swapped for its training twin
   `make(name, linear)` (fake-quant, latent weights, learnable clipping, ...), without gradients;
2. every parameter of `model` is frozen but `params(twins)` (the twins' weights, clip logits, norms, ...);
3. `run(params, twins)` trains them (train/loop.py) and returns its record;
4. `convert(twins)` swaps the twins for their packed layers, without gradients;
5. every parameter's `requires_grad` is restored (new ones, e.g. a packed layer's bias, stay frozen) — also when
   training fails.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..models.blocks import replace_module


def swap(model: nn.Module, names, make: Callable[[str, nn.Module], nn.Module], progress: bool = False
         ) -> dict[str, nn.Module]:
    """Replace each named module by make(name, module), in place and without gradients; the new ones by name
    (a progress bar when asked: some twins start from a decomposition, e.g. OneBit's SVID)."""
    from tqdm.auto import tqdm

    out = {}
    with torch.no_grad():
        for name in tqdm(names, desc="init", disable=not progress, leave=False):
            out[name] = make(name, model.get_submodule(name))
            replace_module(model, name, out[name])
    return out


def train_twins(model: nn.Module, names, make: Callable[[str, nn.Module], nn.Module],
                params: Callable[[dict[str, nn.Module]], list[nn.Parameter]],
                run: Callable[[list[nn.Parameter], dict[str, nn.Module]], object],
                convert: Callable[[dict[str, nn.Module]], None], progress: bool = False):
    """Swap → train only `params` → convert, restoring every parameter's requires_grad (by identity: the packed
    layers' new parameters stay frozen); returns run's result."""
    before = {id(p): p.requires_grad for p in model.parameters()}  # by identity: a new bias of an old name stays frozen
    try:
        twins = swap(model, names, make, progress)
        trained = params(twins)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        result = run(trained, twins)
        with torch.no_grad():
            convert(twins)
    finally:
        for p in model.parameters():
            p.requires_grad_(before.get(id(p), False))
    return result


__all__ = ["swap", "train_twins"]
