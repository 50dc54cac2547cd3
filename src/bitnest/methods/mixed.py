"""mixed: sensitivity-driven mixed precision (calib/sensitivity.py). Measures each layer's KL damage at each
candidate width (RTN on the configured grid, that layer alone), allocates widths to meet `budget` bits per
weight (scales and zeros included), then quantizes with `base` (rtn | gptq) using those per-layer widths
as `overrides`. `sensitivity_overrides` returns the allocation for use with any method."""
from __future__ import annotations

from dataclasses import dataclass

from ..calib.data import CalibOptions, as_calib
from ..calib.sensitivity import allocate_bits, as_overrides, layer_sensitivity
from ..errors import BitnestError
from ..grids.affine import AffineSpec
from ..nn.qlinear import QuantLinear
from . import QuantConfig, get_method, register


@dataclass(frozen=True)
class MixedConfig(CalibOptions, QuantConfig):
    budget: float = 3.0  # bits per weight, every stored bit counted (as eval.bits)
    candidates: tuple[int, ...] = (2, 3, 4, 8)
    base: str = "rtn"  # rtn | gptq
    n_calib: int = 8  # sensitivity runs one forward per layer and width: keep it small
    batch_size: int = 8

    def __post_init__(self):
        super().__post_init__()
        for b in self.candidates:
            AffineSpec(b, self.group_size, self.symmetric)
        if self.base not in ("rtn", "gptq") or self.budget <= 0:
            raise BitnestError(f"mixed: base rtn|gptq and a positive budget, got {self.base}, {self.budget}")
        if self.overrides:
            raise BitnestError("mixed chooses the per-layer overrides itself; pass a budget instead")


def sensitivity_overrides(model, names: list[str], calib, config: MixedConfig, progress: bool = True):
    """(default bits, overrides) meeting config.budget, from KL sensitivities on the calibration tokens."""
    def rtn(lin, b):
        return QuantLinear.from_linear(lin, config.affine_spec(b))
    sens, cost = layer_sensitivity(model, names, calib, tuple(config.candidates), rtn,
                                   batch_size=config.batch_size, progress=progress)
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    return as_overrides(allocate_bits(sens, cost, sizes, config.budget))


@register("mixed", MixedConfig)
def mixed(model, config: MixedConfig, names: list[str], progress: bool = True, calib=None, **_) -> None:
    calib = as_calib(calib, model, config)
    bits, overrides = sensitivity_overrides(model, names, calib, config, progress)
    base = get_method(config.base).config_cls.from_dict({**config.to_dict(), "bits": bits, "overrides": dict(overrides)})
    model.bitnest_allocation = (bits, overrides)
    get_method(config.base).fn(model, base, names, progress=progress, calib=calib)
