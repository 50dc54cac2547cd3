"""RTN: MinMax fit, round to nearest. Any bits 1–8, any granularity, no data."""
from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from ..models.blocks import replace_module
from ..nn.qlinear import QuantLinear
from . import QuantConfig, register


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    pass


@register("rtn", RTNConfig)
def rtn(model, config: RTNConfig, names: list[str], progress: bool = True, **_) -> None:
    for name in tqdm(names, desc="rtn", disable=not progress, leave=False):
        lin = model.get_submodule(name)
        spec = config.affine_spec(config.bits_for(name))
        spec.check_shape(lin.out_features, lin.in_features, name)
        replace_module(model, name, QuantLinear.from_linear(lin, spec))
