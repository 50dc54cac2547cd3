"""transformers-native loading: `AutoModelForCausalLM.from_pretrained(bitnest_checkpoint)` after `import bitnest`.

`import bitnest` registers `quant_method: "bitnest"` (BitnestConfig) and its HfQuantizer with transformers, so
any bitnest checkpoint loads through the standard API onto bitnest's packed layers and fast kernels:

    import bitnest, torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained("runs/mq", dtype=torch.bfloat16)                  # as stored
    m = AutoModelForCausalLM.from_pretrained("runs/mq", quantization_config=bitnest.BitnestConfig(bits=4))
    m.set_precision(2)                                          # Matryoshka: switch in memory, as load_model's
    m.save_pretrained("out")                                    # a bitnest checkpoint again

The quantizer replaces the listed Linear modules of the meta-device skeleton with packed shells (as
`formats.checkpoint.load_quantized` does), transformers loads the stored tensors into them (scales and zeros keep
their stored dtype), and after loading the requested width / per-layer mix / bits budget is served through
`bitnest.runtime.set_precision` (the run-time switch, whose logits equal loading at that width).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import auto as _auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import BitnestError

QUANT_METHOD = "bitnest"
# What a caller may choose at load time (not part of the stored format): the served precision.
LOADING_ATTRIBUTES = ("bits", "mix", "budget", "strategy")


class BitnestConfig(QuantizationConfigMixin):
    """A bitnest checkpoint's `quantization_config` (see formats/checkpoint.py), plus loading choices:

    bits      serve every nested (Matryoshka) layer at this width
    mix       {module-name glob: width}, a per-layer Mix'n'Match map
    budget    serve the best mix within this many bits per weight (`strategy`, default reverse_pyramid)
    """

    def __init__(self, bits: int | None = None, mix: dict[str, int] | None = None, budget: float | None = None,
                 strategy: str | None = None, **stored: Any):
        self.quant_method = QUANT_METHOD
        self.bits, self.mix, self.budget, self.strategy = bits, mix, budget, strategy
        for k, v in stored.items():
            setattr(self, k, v)

    def get_loading_attributes(self) -> dict:
        return {k: getattr(self, k) for k in LOADING_ATTRIBUTES if getattr(self, k, None) is not None}

    def stored(self) -> dict:
        """The checkpoint's own quantization_config (loading choices left out)."""
        return {k: v for k, v in self.to_dict().items() if k not in LOADING_ATTRIBUTES}

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        for k in LOADING_ATTRIBUTES:  # a loading choice is saved only when it was made
            if d.get(k) is None:
                d.pop(k, None)
        return d


class BitnestHfQuantizer(HfQuantizer):
    """Loads pre-quantized bitnest checkpoints (bitnest quantizes with its own CLI/API, which need calibration
    data and methods transformers' `from_pretrained` has no place for)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        qc = self.quantization_config
        if not getattr(qc, "modules", None):
            raise BitnestError("this bitnest quantization_config lists no modules; quantize with `bitnest quantize`, "
                               "then load the checkpoint it writes")
        from ..formats.checkpoint import FORMAT_VERSION
        if getattr(qc, "format_version", 0) > FORMAT_VERSION:
            raise BitnestError(f"checkpoint format {qc.format_version} is newer than this bitnest reads ({FORMAT_VERSION}); upgrade bitnest")

    def _process_model_before_weight_loading(self, model, **kwargs):
        from ..formats.checkpoint import _module_class
        from ..models.blocks import replace_module

        for name, lc in self.quantization_config.modules.items():
            try:
                model.get_submodule(name)
            except AttributeError:
                raise BitnestError(f"the checkpoint quantizes {name}, which this model does not have") from None
            replace_module(model, name, _module_class(lc).from_layer_config(dict(lc), device="meta"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .. import runtime

        runtime.attach(model)
        qc = self.quantization_config
        if qc.bits is not None or qc.mix or qc.budget is not None:
            if not getattr(qc, "nested", False):
                raise BitnestError("bits/mix/budget re-slice Matryoshka checkpoints (method sliced/matquant); "
                                   f"this one stores {qc.config.get('bits')}-bit {qc.method} codes")
            bits = qc.mix if qc.mix else qc.bits
            runtime.set_precision(model, bits, budget=qc.budget, strategy=qc.strategy or runtime.DEFAULT_STRATEGY)
        return model

    def get_state_dict_and_metadata(self, model):
        """Before save_pretrained writes config.json: the module entries follow the layers as they are now (a
        switched precision is saved as the width served), and the float tensors' dtype is the model's."""
        from ..formats.checkpoint import _packed_modules

        qc = self.quantization_config
        qc.modules = {n: m.layer_config() for n, m in _packed_modules(model).items()}
        qc.storage_dtype = str(model.dtype).replace("torch.", "")
        for k in LOADING_ATTRIBUTES:  # the saved checkpoint is what it holds, not how it was loaded
            setattr(qc, k, None)
        return None, {}

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Idempotent: make transformers know `quant_method: "bitnest"`."""
    if QUANT_METHOD in _auto.AUTO_QUANTIZER_MAPPING:
        return
    _auto.register_quantization_config(QUANT_METHOD)(BitnestConfig)
    _auto.register_quantizer(QUANT_METHOD)(BitnestHfQuantizer)
    # from_pretrained(..., quantization_config=BitnestConfig(bits=4)) on a checkpoint that has its own config:
    # transformers keeps the stored one and copies only the "loading attributes" of config types in this tuple.
    types = getattr(_auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(types, tuple) and BitnestConfig not in types:
        _auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*types, BitnestConfig)
