"""Non-uniform weight quantization into CodebookLinear: k-means codebooks, weight sharing, NormalFloat, powers of two.

  kmeans  Lloyd's k-means per output channel (group_size None), per group, or per tensor (-1), started from
          the uniform MinMax grid. `weighted=True` weighs each input's error by diag(H) from calibration data
          (sensitivity-weighted clustering, as SqueezeLLM), through the block-by-block driver.
  share   weight sharing: the same with one table per layer — 2^b shared values, b-bit indices.
  nf      NormalFloat levels (QLoRA's NF4 at 4 bits) × absmax per group (default group 64).
  log     power-of-two levels ±2^−e × absmax per group.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from ..calib.data import CalibOptions
from ..errors import BitnestError
from ..grids.affine import AffineSpec
from ..grids.codebook import fixed_codebook, kmeans, log_levels, nf_levels
from ..models.blocks import replace_module
from ..nn.codebook import CodebookLinear
from . import QuantConfig, register


@dataclass(frozen=True)
class KMeansConfig(CalibOptions, QuantConfig):
    iters: int = 300
    weighted: bool = False  # weigh errors by diag(H) (needs calibration data)
    batch_size: int = 8


@dataclass(frozen=True)
class ShareConfig(KMeansConfig):
    group_size: int | None = -1  # always per tensor (a per-channel value, e.g. the CLI's default, is overridden)


@dataclass(frozen=True)
class FixedConfig(QuantConfig):
    group_size: int | None = 64

    def __post_init__(self):
        super().__post_init__()
        if self.symmetric:
            raise BitnestError("fixed codebooks are symmetric by construction; drop --symmetric")


def kmeans_linear(lin, bits: int, group_size, iters: int, weights=None) -> CodebookLinear:
    W = lin.weight.detach()  # (out, in)
    AffineSpec(bits, group_size).check_shape(*W.shape)
    codes, table = kmeans(W, bits, group_size, iters=iters, weights=weights)
    return CodebookLinear.from_codes(codes, table, None, bits=bits, group_size=group_size, codebook="kmeans", bias=lin.bias)


def _kmeans(model, config: KMeansConfig, names, progress, calib, desc):
    if config.weighted:
        from ..calib.driver import calibrated

        def make(ns, lins, st):
            d = st.H.diag().clamp_min(1e-8 * st.H.diag().mean())  # (in,) ∝ E[x_j²]: the error weight of input j
            return [kmeans_linear(lin, config.bits_for(n), config.group_size, config.iters, d.expand_as(lin.weight))
                    for n, lin in zip(ns, lins)]
        calibrated(model, config, names, calib, make, progress=progress, desc=desc)
        return
    for name in tqdm(names, desc=desc, disable=not progress, leave=False):
        lin = model.get_submodule(name)
        replace_module(model, name, kmeans_linear(lin, config.bits_for(name), config.group_size, config.iters))


@register("kmeans", KMeansConfig)
def kmeans_method(model, config: KMeansConfig, names: list[str], progress: bool = True, calib=None, **_) -> None:
    _kmeans(model, config, names, progress, calib, "kmeans")


@register("share", ShareConfig)
def share_method(model, config: ShareConfig, names: list[str], progress: bool = True, calib=None, **_) -> None:
    _kmeans(model, replace(config, group_size=-1), names, progress, calib, "share")


def fixed_linear(lin, levels: torch.Tensor, bits: int, group_size, codebook: str) -> CodebookLinear:
    W = lin.weight.detach()  # (out, in)
    AffineSpec(bits, group_size).check_shape(*W.shape)
    codes, scale, table = fixed_codebook(W, levels, group_size)
    return CodebookLinear.from_codes(codes, table, scale, bits=bits, group_size=group_size, codebook=codebook, bias=lin.bias)


def _fixed(model, config, names, progress, kind, levels_of):
    for name in tqdm(names, desc=kind, disable=not progress, leave=False):
        b = config.bits_for(name)
        replace_module(model, name, fixed_linear(model.get_submodule(name), levels_of(b), b, config.group_size, kind))


@register("nf", FixedConfig)
def nf_method(model, config: FixedConfig, names: list[str], progress: bool = True, **_) -> None:
    _fixed(model, config, names, progress, "nf", nf_levels)


@register("log", FixedConfig)
def log_method(model, config: FixedConfig, names: list[str], progress: bool = True, **_) -> None:
    _fixed(model, config, names, progress, "log", log_levels)
