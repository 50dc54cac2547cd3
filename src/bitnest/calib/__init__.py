"""Calibration: data (C4 training rows, a file, or the model's own samples), the block-by-block driver, input
statistics (Hessians, activation observers), data-adaptive clipping and per-layer sensitivity."""
from .data import CalibOptions, as_calib, calibration_tokens  # noqa: F401
from .driver import BlockRunner, Hessian, blockwise, capture_block_inputs  # noqa: F401
