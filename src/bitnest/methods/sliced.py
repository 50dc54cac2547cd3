"""Sliced int8: RTN on the c-bit (default 8) MinMax grid, served at r bits by MatQuant's nested slicing.

The checkpoint stores the c-bit codes once; `serve_bits` (r) is chosen at load time or per layer
(`overrides`), and `bitnest slice` writes a standalone r-bit copy.
"""
from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from ..errors import BitnestError
from ..models.blocks import replace_module
from ..nn.qlinear import QuantLinear
from . import QuantConfig, register


@dataclass(frozen=True)
class SlicedConfig(QuantConfig):
    bits: int = 4  # r: the width served
    parent_bits: int = 8  # c: the width of the stored grid

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.bits <= self.parent_bits <= 8:
            raise BitnestError(f"sliced needs 1 <= bits <= parent bits <= 8, got bits={self.bits}, parent={self.parent_bits}")


@register("sliced", SlicedConfig)
def sliced(model, config: SlicedConfig, names: list[str], progress: bool = True, **_) -> None:
    spec = config.affine_spec(config.parent_bits)
    for name in tqdm(names, desc="sliced", disable=not progress, leave=False):
        lin = model.get_submodule(name)
        spec.check_shape(lin.out_features, lin.in_features, name)
        replace_module(model, name, QuantLinear.from_linear(lin, spec, serve_bits=config.bits_for(name)))
