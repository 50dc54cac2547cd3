"""What the post-LayerNorm alone costs on ref-10m: OneBit's layer with its sign taken away.

Every projection becomes LayerNorm_noaffine[(X ⊙ g) · Wᵀ ⊙ h] with W the *full-precision* latent weight
(g = h = 1 at the start), then trains exactly as a bench/onebit.py row does (same teacher-generated data,
160 steps × 4 × 256 tokens, LR 1e-3, hidden-state loss on). The same with the LayerNorm off is the control
(its start is the FP model). If full-precision weights behind a post-LayerNorm do no better than 1-bit
BitNet-style layers after the same budget, the LayerNorm, not the sign, is what holds OneBit back there.

    python bench/onebit_structure.py     # ≈ 8 min on 2 cores; prints the table, writes BENCHMARKS.md "onebit_structure"
    # the LayerNorm's ceiling at bench/onebit.py's longest budget (≈ 40 min): compare with onebit_2000's rows
    python bench/onebit_structure.py --post-ln on --steps 2000 --samples 1024 --name onebit_structure_2000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bitnest.models.blocks import replace_module, select_linears
from bitnest.nn.onebit import OneBitLinear, sign_linear
from bitnest.train.data import self_generate
from bitnest.train.qat import DistillSettings, distill_qat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import eval_row, fmt_table, header, load, write_json, write_section  # noqa: E402


class FullPrecisionPostLN(OneBitLinear):
    """OneBit's layer with Sign removed: the latent weight is used as it is (a diagnostic, never packed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sign_linear(x, self.weight, self.g, self.h, self.bias, self.post_ln)


def prepare_fp(post_ln: bool):
    def prepare(name, linear):
        m = FullPrecisionPostLN(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                post_ln=post_ln, device=linear.weight.device)
        m.weight.copy_(linear.weight.detach().float())  # g = h = 1: with the LN off this is the FP layer
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m
    return prepare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--post-ln", choices=("both", "on", "off"), default="both")
    p.add_argument("--name", default="onebit_structure", help="results/<name>.json and the BENCHMARKS section")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    base, ctx = load("ref-10m")
    ids = self_generate(base.model, args.samples, ctx, batch_size=64, seed=0, progress=True)  # = bench/onebit.py's
    settings = DistillSettings(steps=args.steps, lr=1e-3, batch=4, seq_len=ctx, seed=0, hidden_loss=True)
    rows = []
    for post_ln in {"both": (True, False), "on": (True,), "off": (False,)}[args.post_ln]:
        loaded, _ = load("ref-10m")
        m = loaded.model
        names = select_linears(m, "all")
        with torch.no_grad():
            for n in names:
                replace_module(m, n, prepare_fp(post_ln)(n, m.get_submodule(n)))
        step0 = eval_row(m, loaded.tokenizer, ctx, limit=args.limit, storage=loaded.storage_dtype)
        loaded, _ = load("ref-10m")  # a fresh copy: distill_qat does its own swap
        m = loaded.model
        t0 = time.perf_counter()
        tr = distill_qat(m, names, prepare_fp(post_ln), settings, ids=ids, convert=lambda mod: mod, desc="fp+postln")
        trained = eval_row(m, loaded.tokenizer, ctx, limit=args.limit, storage=loaded.storage_dtype)
        rows.append({"model": "ref-10m", "weights": "full precision", "post_ln": post_ln,
                     "ppl_c4_step0": step0["ppl_c4"], "ppl_wikitext2_step0": step0["ppl_wikitext2"],
                     "ppl_c4": trained["ppl_c4"], "ppl_wikitext2": trained["ppl_wikitext2"],
                     "steps": tr.steps, "train_tokens": tr.tokens, "train_seconds": time.perf_counter() - t0,
                     "final_kd": tr.history[-1]["kd"]})
        print(rows[-1], flush=True)
    cols = [("weights", "weights", ""), ("post_ln", "post-LN", ""), ("ppl_c4_step0", "C4 PPL at step 0", ".1f"),
            ("ppl_wikitext2_step0", "WikiText-2 at step 0", ".1f"), ("ppl_c4", f"C4 PPL after {args.steps} steps", ".2f"),
            ("ppl_wikitext2", f"WikiText-2 after {args.steps} steps", ".2f"), ("final_kd", "final KD", ".3f"),
            ("train_tokens", "train tokens", ",")]
    text = fmt_table(rows, cols)
    print("\n" + text)
    if not args.no_write:
        write_json(f"{args.name}.json", rows)
        extra = (f"ref-10m, every attention and MLP projection; {args.steps} steps × 4 × {ctx} tokens of the same "
                 f"{args.samples} teacher-generated sequences as bench/onebit.py, LR 1e-3, hidden-state loss on; "
                 f"first {args.limit} windows of each text.")
        title = "OneBit (issue 4): the post-LayerNorm with full-precision weights"
        if args.name != "onebit_structure":  # e.g. the 2000-step run: tell the sections apart
            title += f", {args.steps} steps"
        write_section(args.name, header(title, extra) + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
