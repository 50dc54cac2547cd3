"""RTN with data-adaptive clipping: the affine grid's range shrunk per row by the ratio that minimizes the
layer's output error on calibration data (calib/clip.py), then round to nearest. Same packed QuantLinear."""
from __future__ import annotations

from dataclasses import dataclass

from ..calib.clip import search_clip
from ..calib.data import CalibOptions
from ..grids.affine import AffineSpec, fit, quantize
from ..nn.qlinear import QuantLinear
from . import QuantConfig, register
from ..calib.driver import calibrated


@dataclass(frozen=True)
class ClipConfig(CalibOptions, QuantConfig):
    batch_size: int = 8


def clipped_linear(lin, H, spec: AffineSpec) -> QuantLinear:
    W = lin.weight.detach()  # (out, in)
    spec.check_shape(*W.shape)
    gamma = search_clip(W, H, spec)  # (R, G)
    alpha, z = fit(W, spec, gamma, gamma)
    return QuantLinear.from_codes(quantize(W, spec, alpha, z), alpha, z, bits=spec.bits, group_size=spec.group_size,
                                  symmetric=spec.symmetric, bias=lin.bias)


@register("clip", ClipConfig)
def clip(model, config: ClipConfig, names: list[str], progress: bool = True, calib=None, **_) -> None:
    calibrated(model, config, names, calib, progress=progress, desc="clip", make=lambda ns, lins, st: [clipped_linear(
        lin, st.H, config.affine_spec(config.bits_for(n))) for n, lin in zip(ns, lins)])
