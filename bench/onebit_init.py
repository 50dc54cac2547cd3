"""C4 held-out perplexity of ref-10m right after OneBit's SVID (NMF) initialization, before any training,
with and without the post-LayerNorm: how much of the full-precision model the start keeps.

    python bench/onebit_init.py        # ≈ 30 s on 2 cores; first 64 windows, as bench/onebit.py
"""
import sys
from pathlib import Path

import torch

from bitnest.eval.report import evaluate
from bitnest.models.blocks import replace_module, select_linears
from bitnest.nn.onebit import OneBitLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load  # noqa: E402


def main() -> int:
    torch.set_num_threads(2)
    for post_ln in (True, False):
        loaded, ctx = load("ref-10m")
        with torch.no_grad():
            for n in select_linears(loaded.model, "all"):
                lin = loaded.model.get_submodule(n)
                replace_module(loaded.model, n, OneBitLinear.from_linear(lin, init="nmf", post_ln=post_ln))
        r = evaluate(loaded.model, loaded.tokenizer, "c4", ctx=ctx, limit=64, progress=False)
        print(f"post_ln={post_ln}: C4 held-out PPL at step 0 = {r['ppl']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
