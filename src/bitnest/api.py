"""Python API: `quantize(model, method, **config)` in place, `save`, `load`, `evaluate`."""
from __future__ import annotations

import torch

from . import hugepages
from .errors import BitnestError
from .methods import QuantConfig, get_method
from .models.blocks import select_linears


def make_config(method: str, **kwargs) -> QuantConfig:
    """The method's frozen config from keyword arguments; unknown keys are a one-line error."""
    from dataclasses import fields

    m = get_method(method)
    known = {f.name for f in fields(m.config_cls)}
    bad = sorted(set(kwargs) - known)
    if bad:
        raise BitnestError(f"method {method!r} has no option(s) {', '.join(bad)}; it takes {', '.join(sorted(known))}")
    try:
        return m.config_cls(**kwargs)
    except TypeError as e:
        raise BitnestError(f"bad options for {method}: {e}") from None


def quantize(model: torch.nn.Module, method: str = "rtn", config: QuantConfig | None = None, *,
             progress: bool = True, calib=None, tokenizer=None, **kwargs) -> torch.nn.Module:
    """Quantize `model` in place with a registered method and return it. `tokenizer` reads text-file training
    data (OneBit / BitNet `data=FILE`); without it, the tokenizer saved next to the model's weights is used.

    >>> quantize(model, "rtn", bits=4, group_size=128)
    """
    config = config or make_config(method, **kwargs)
    names = select_linears(model, config.targets)
    for n in names:
        lin = model.get_submodule(n)
        if not torch.isfinite(lin.weight).all():
            raise BitnestError(f"weight {n} contains NaN or Inf values; refusing to quantize a broken model")
    with torch.no_grad():
        get_method(method).fn(model, config, names, progress=progress, calib=calib, tokenizer=tokenizer)
    hugepages.place_module(model)  # the packed codes every token streams, on 2 MiB pages (hugepages.py)
    model.bitnest_method = (method, config)
    return model


def quantization_config(method: str, config: QuantConfig, source: str) -> dict:
    nested = method in NESTED_METHODS or bool(getattr(config, "nested", False))  # e.g. GPTQ on the int8 grid
    return {"method": method, "config": config.to_dict(), "nested": nested, "source_model": source}


NESTED_METHODS = {"sliced", "matquant"}
