"""`--method matquant`: the registered entry point of MatQuant's two flavours, QAT (matquant.run_qat) and
OmniQuant (omniquant.run_omniquant). Both share matquant.py's config, plan and loss; this module imports the two
flavours, so neither imports the other."""
from __future__ import annotations

from . import register
from .matquant import MatQuantConfig, run_qat
from .omniquant import run_omniquant


@register("matquant", MatQuantConfig)
def matquant(model, config: MatQuantConfig, names: list[str], progress: bool = True, calib=None, **_) -> None:
    """calib: optional (N, T) token ids to train / calibrate on instead of config.calib_data."""
    run = run_qat if config.flavour == "qat" else run_omniquant
    model.bitnest_train = run(model, config, names, calib=calib, progress=progress)  # history / tokens / seconds
