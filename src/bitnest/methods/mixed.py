"""mixed: sensitivity-driven mixed precision (calib/sensitivity.py). Measures each layer's damage at each
candidate width (RTN on the configured grid, that layer alone; `sensitivity`: "kl" at the model's output, or
"block": the relative change of its block's output, one block at a time — what a streaming run uses), allocates
widths to meet `budget` bits per weight (scales and zeros included), then quantizes with `base` (rtn | gptq) using those per-layer widths
as `overrides`. `sensitivity_overrides` returns the allocation for use with any method."""
from __future__ import annotations

from dataclasses import dataclass

from ..calib.data import CalibOptions, as_calib
from ..calib.sensitivity import allocate_bits, as_overrides, block_sensitivity, layer_sensitivity
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
    sensitivity: str = "kl"  # kl (the model's output, whole model) | block (its block's output; streams)

    def __post_init__(self):
        super().__post_init__()
        if self.sensitivity not in ("kl", "block"):
            raise BitnestError(f"mixed: sensitivity must be kl or block, got {self.sensitivity!r}")
        for b in self.candidates:
            AffineSpec(b, self.group_size, self.symmetric)
        if self.base not in ("rtn", "gptq") or self.budget <= 0:
            raise BitnestError(f"mixed: base rtn|gptq and a positive budget, got {self.base}, {self.budget}")
        if self.overrides:
            raise BitnestError("mixed chooses the per-layer overrides itself; pass a budget instead")


def sensitivity_overrides(model, names: list[str], calib, config: MixedConfig, progress: bool = True):
    """(default bits, overrides) meeting config.budget, from the sensitivities (config.sensitivity: KL at the
    model's output, or the block's relative output change) on the calibration tokens."""
    def rtn(lin, b):
        return QuantLinear.from_linear(lin, config.affine_spec(b))
    score = block_sensitivity if config.sensitivity == "block" else layer_sensitivity
    sens, cost = score(model, names, calib, tuple(config.candidates), rtn, batch_size=config.batch_size,
                       progress=progress)
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    return as_overrides(allocate_bits(sens, cost, sizes, config.budget))


def base_config(config: MixedConfig, bits: int, overrides) -> QuantConfig:
    """The base method's config for the allocation (default bits, overrides)."""
    return get_method(config.base).config_cls.from_dict({**config.to_dict(), "bits": bits, "overrides": dict(overrides)})


@register("mixed", MixedConfig)
def mixed(model, config: MixedConfig, names: list[str], progress: bool = True, calib=None, **_) -> None:
    calib = as_calib(calib, model, config)
    bits, overrides = sensitivity_overrides(model, names, calib, config, progress)
    base = base_config(config, bits, overrides)
    model.bitnest_allocation = (bits, overrides)
    get_method(config.base).fn(model, base, names, progress=progress, calib=calib)
