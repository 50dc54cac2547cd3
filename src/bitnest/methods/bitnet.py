"""BitNet-style 1-bit baseline (methods.md §2): Sign(W − mean W) with one scale β = mean|W − mean W| per
matrix, trained by the same distillation as OneBit and packed the same way (signs 8 per byte + one
float16 β). The OneBit paper found these layers unstable under distillation; they are its baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import BitnestError
from ..grids.sign import BACKWARDS
from ..nn.onebit import BitNetLinear
from ..train.qat import DistillSettings
from . import QuantConfig, register
from .onebit import run_distillation


@dataclass(frozen=True)
class BitNetConfig(QuantConfig, DistillSettings):
    bits: int = 1
    post_ln: bool = False  # BitNet-style layers have no output LayerNorm; True isolates the sign/scale choice
    sign_backward: str = "tanh"

    def __post_init__(self):
        QuantConfig.__post_init__(self)
        DistillSettings.__post_init__(self)
        if self.bits != 1 or self.group_size is not None or self.overrides:
            raise BitnestError("bitnet layers are 1 bit per weight with one scale: bits, group size and overrides cannot be set")
        if self.sign_backward not in BACKWARDS:
            raise BitnestError(f"bitnet sign_backward must be one of {', '.join(BACKWARDS)}, got {self.sign_backward!r}")


@register("bitnet", BitNetConfig)
def bitnet(model, config: BitNetConfig, names: list[str], progress: bool = True, calib=None, tokenizer=None,
           **_) -> None:
    def prepare(name, linear):
        return BitNetLinear.from_linear(linear, post_ln=config.post_ln, backward=config.sign_backward)

    run_distillation(model, config, names, prepare, progress, calib, tokenizer, "bitnet")
