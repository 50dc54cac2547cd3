"""Weight + activation quantization.

  actquant  W{bits}A{act_bits}: packed weights (RTN or GPTQ) with int8 activations, `act_mode` dynamic
            (per-token scales at inference: no calibration unless the weights need it) or static (one
            per-tensor scale per layer from calibration observers: minmax | percentile | mse). W8A8 is
            bits=8 (per-channel symmetric), W4A8 is bits=4 (e.g. group 128).
  intonly   integer-only W8A8 (nn/intlinear.py): static input and output scales from calibration, int32
            accumulation, fixed-point requantization.
Static scales are observed block by block on the activations of the already-quantized model (the driver
propagates quantized outputs, and later groups in a block see earlier groups' quantized outputs), so the
calibration matches what the deployed model computes.
"""
from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from ..calib.data import CalibOptions
from ..calib.observers import OBSERVERS, InputStats
from ..errors import BitnestError
from ..models.blocks import replace_module
from ..nn.actquant import ACT_MODES, ActQuantLinear, fake_quant_sym
from ..nn.intlinear import IntLinear
from ..nn.qlinear import QuantLinear
from . import QuantConfig, register
from ..calib.driver import calibrated
from .gptq import GPTQConfig, quantize_linears


@dataclass(frozen=True)
class ActQuantConfig(CalibOptions, QuantConfig):
    bits: int = 8
    symmetric: bool = True
    act_bits: int = 8
    act_mode: str = "dynamic"  # dynamic | static
    observer: str = "minmax"  # static scales: minmax | percentile | mse
    percentile: float = 99.99
    weights: str = "rtn"  # rtn | gptq
    batch_size: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.act_mode not in ACT_MODES or self.observer not in OBSERVERS or self.weights not in ("rtn", "gptq"):
            raise BitnestError(f"actquant: act_mode in {ACT_MODES}, observer in {OBSERVERS}, weights rtn|gptq; "
                               f"got {self.act_mode}, {self.observer}, {self.weights}")
        if not 2 <= self.act_bits <= 8:
            raise BitnestError(f"act_bits must be in 2..8, got {self.act_bits}")


@register("actquant", ActQuantConfig)
def actquant(model, config: ActQuantConfig, names: list[str], progress: bool = True, calib=None, **_) -> None:
    def weights(ns, lins, st):
        if config.weights == "gptq":
            g = GPTQConfig(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric)
            return quantize_linears(lins, st.H, g, [config.bits_for(n) for n in ns])
        return [QuantLinear.from_linear(lin, config.affine_spec(config.bits_for(n)))
                for n, lin in zip(ns, lins)]

    if config.act_mode == "dynamic" and config.weights == "rtn":
        for name in tqdm(names, desc="actquant", disable=not progress, leave=False):
            q, = weights([name], [model.get_submodule(name)], None)
            replace_module(model, name, ActQuantLinear.wrap(q, config.act_bits))
        return

    def make(ns, lins, st):
        s = None if config.act_mode == "dynamic" else st.obs.scale(config.observer, config.act_bits, config.percentile)
        return [ActQuantLinear.wrap(q, config.act_bits, config.act_mode, s) for q in weights(ns, lins, st)]

    calibrated(model, config, names, calib, make, progress=progress, desc="actquant",
               stat=lambda n, dev: InputStats(n, dev, hessian=config.weights == "gptq"))


@dataclass(frozen=True)
class IntOnlyConfig(CalibOptions, QuantConfig):
    bits: int = 8
    symmetric: bool = True  # ignored: the weights are always int8 per-channel symmetric
    observer: str = "mse"  # input scale: minmax | percentile | mse
    percentile: float = 99.99
    out_scale: str = "channel"  # output scale per channel | tensor (absmax of the calibration outputs)
    batch_size: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.bits != 8 or self.group_size is not None or self.overrides:
            raise BitnestError("intonly is W8A8: 8-bit per-channel symmetric weights, no groups or overrides")
        if self.observer not in OBSERVERS or self.out_scale not in ("channel", "tensor"):
            raise BitnestError(f"intonly: observer in {OBSERVERS}, out_scale channel|tensor")


def int_linear(lin, obs, config: IntOnlyConfig) -> IntLinear:
    """IntLinear with s_x from the input observer and s_y from the outputs the layer gives on the observed rows."""
    s_x = obs.scale(config.observer, 8, config.percentile)
    X = fake_quant_sym(obs.rows, s_x)  # (rows, in): the int8 input grid
    probe = IntLinear.from_linear(lin, s_x, [1.0])  # its weights, to see the outputs it will produce
    Y = X @ probe.dequantized_weight().float().T + (0 if lin.bias is None else lin.bias.detach().float())  # (rows, out)
    y_max = Y.abs().amax(0) if config.out_scale == "channel" else Y.abs().amax().reshape(1)
    return IntLinear.from_linear(lin, s_x, (y_max / 127).clamp_min(1e-8))


@register("intonly", IntOnlyConfig)
def intonly(model, config: IntOnlyConfig, names: list[str], progress: bool = True, calib=None, **_) -> None:
    calibrated(model, config, names, calib, lambda ns, lins, st: [int_linear(lin, st.obs, config) for lin in lins],
               progress=progress, desc="intonly", stat=lambda n, dev: InputStats(n, dev))
