"""OneBit (Xu et al., NeurIPS 2024; methods.md §2): every target Linear becomes a 1-bit sign matrix with two
float16 value vectors, initialized by SVID and trained by distillation from the full-precision model.

    quantize(model, "onebit", steps=300, init="nmf")        # bitnest quantize --method onebit
    quantize(model, "onebit", post_ln=True)                 # the paper's layer (post-LayerNorm on each projection)

Pipeline (train/qat.py): frozen FP teacher → SVID init of each OneBitLinear → KD (+ α · hidden-state MSE)
with the shared loop → PackedSignLinear (signs 8 per byte, g and h in float16, ≈ 1 bit per weight).
Embeddings, lm_head and norms stay as they are (targets "all" = the projections inside the blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import BitnestError
from ..grids.sign import BACKWARDS
from ..nn.onebit import INITS, LATENT_INITS, OneBitLinear
from ..train.qat import DistillSettings, distill_qat
from . import QuantConfig, register


@dataclass(frozen=True)
class OneBitConfig(QuantConfig, DistillSettings):
    bits: int = 1
    init: str = "nmf"  # nmf | svd (SVID of |W|) | sign (g = h = 1)
    latent_init: str = "paper"  # paper: latent W = W; reference: sign(W) · 0.01
    # the paper's parameter-free LayerNorm on the layer's output. Off by default: it measures worse at every budget
    # a CPU trains (bench/onebit.py: 160 steps, ref-10m C4 173.6 without it vs 195.0 with it, BitNet-style 175.7;
    # stories260K 87.4 vs 127.5 vs 105.0) because it discards the SVID start's scales (BENCHMARKS.md, "What the
    # OneBit tables show"). post_ln=True is the paper's layer.
    post_ln: bool = False
    sign_backward: str = "tanh"  # tanh (reference: 1.001 − tanh²) | ste | clipped

    def __post_init__(self):
        QuantConfig.__post_init__(self)
        DistillSettings.__post_init__(self)
        if self.bits != 1 or self.group_size is not None or self.overrides:
            raise BitnestError("onebit layers are 1 bit per weight with per-row/column value vectors: "
                               "bits, group size and overrides cannot be set")
        for name, value, allowed in (("init", self.init, INITS), ("latent_init", self.latent_init, LATENT_INITS),
                                     ("sign_backward", self.sign_backward, BACKWARDS)):
            if value not in allowed:
                raise BitnestError(f"onebit {name} must be one of {', '.join(allowed)}, got {value!r}")


def run_distillation(model, config, names, prepare, progress, calib, tokenizer, desc):
    """Shared by onebit and bitnet: distill, convert, and keep the training record on the model."""
    ids = calib if calib is not None and hasattr(calib, "dim") else None
    result = distill_qat(model, names, prepare, DistillSettings.of(config), tokenizer=tokenizer, ids=ids,
                         progress=progress, desc=desc)
    model.bitnest_train = result  # history / tokens / seconds, for reports and benchmarks
    return result


@register("onebit", OneBitConfig)
def onebit(model, config: OneBitConfig, names: list[str], progress: bool = True, calib=None, tokenizer=None,
           **_) -> None:
    """calib: optional (N, T) token ids to train on instead of config.data; tokenizer: for a text file."""
    def prepare(name, linear):
        return OneBitLinear.from_linear(linear, init=config.init, latent_init=config.latent_init,
                                        post_ln=config.post_ln, backward=config.sign_backward)

    run_distillation(model, config, names, prepare, progress, calib, tokenizer, "onebit")
