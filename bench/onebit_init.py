"""C4 held-out perplexity of ref-10m right after OneBit's SVID (NMF) initialization, before any training,
with and without the post-LayerNorm: how much of the full-precision model the start keeps.

    python bench/onebit_init.py        # ≈ 20 s on 2 cores; first 64 windows, as bench/onebit.py;
                                       # prints the table, writes BENCHMARKS.md "onebit_init"
"""
import sys
from pathlib import Path

import torch

from bitnest.eval.report import evaluate
from bitnest.models.blocks import replace_module, select_linears
from bitnest.nn.onebit import OneBitLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_table, header, load, write_json, write_section  # noqa: E402


def main() -> int:
    torch.set_num_threads(2)
    rows = []
    for init, post_ln in (("none (FP)", None), ("nmf", True), ("nmf", False)):
        loaded, ctx = load("ref-10m")
        if post_ln is not None:  # the FP row is the same model before replacement, measured in the same run
            with torch.no_grad():
                for n in select_linears(loaded.model, "all"):
                    lin = loaded.model.get_submodule(n)
                    replace_module(loaded.model, n, OneBitLinear.from_linear(lin, init="nmf", post_ln=post_ln))
        r = evaluate(loaded.model, loaded.tokenizer, "c4", ctx=ctx, limit=64, progress=False)
        rows.append({"model": "ref-10m", "init": init, "post_ln": "" if post_ln is None else post_ln,
                     "ppl_c4_step0": r["ppl"]})
    text = fmt_table(rows, [("init", "init", ""), ("post_ln", "post-LN", ""), ("ppl_c4_step0", "C4 PPL at step 0", ".1f")])
    print("\n" + text)
    write_json("onebit_init.json", rows)
    write_section("onebit_init", header("OneBit (issue 4): the SVID start before training",
                                        "ref-10m, every attention and MLP projection 1-bit from SVID (NMF), no "
                                        "training; C4 held-out, first 64 windows.") + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
