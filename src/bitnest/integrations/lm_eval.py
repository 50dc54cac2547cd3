"""lm-evaluation-harness on a bitnest checkpoint (for users online, who can fetch lm-eval's datasets):

    python -m bitnest.integrations.lm_eval --model bitnest \\
        --model_args pretrained=runs/mq,bits=4,dtype=float32 --tasks piqa,arc_easy --batch_size 16

or from Python: `import bitnest.integrations.lm_eval; lm_eval.simple_evaluate(model="bitnest", model_args=...)`.
The model is lm-eval's own HFLM loading the checkpoint through transformers (bitnest's registered quantizer), so
every lm-eval task and metric applies unchanged; `bits` / `budget` choose a Matryoshka checkpoint's precision.
bitnest's built-in `bitnest eval --tasks …` scores the local task files with the same conventions offline.
"""
from __future__ import annotations

import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import bitnest  # noqa: F401  registers quant_method "bitnest" with transformers


@register_model("bitnest")
class BitnestLM(HFLM):
    def __init__(self, pretrained: str, bits: int | str | None = None, budget: float | str | None = None, **kwargs):
        super().__init__(pretrained=pretrained, **kwargs)
        if bits is not None or budget is not None:  # the run-time switch: equal to loading at that precision
            from .. import runtime
            runtime.set_precision(self.model, int(bits) if bits is not None else None,
                                  budget=float(budget) if budget is not None else None)


def main() -> int:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
