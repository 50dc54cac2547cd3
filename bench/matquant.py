"""MatQuant benchmark (issue 3): the paper's Tables 1 and 2 in miniature on ref-10m, FFN only.

For each flavour (qat, omniquant), per-channel MinMax grids (plus one group-128 QAT run):
  fp                 the full-precision model
  minmax             no training: the int8 MinMax grid sliced to r (= method `sliced`)
  sliced_int8        int8 trained alone (R = {8}), then sliced to r = 8, 6, 4, 3, 2
  baseline           each r trained alone on its own r-bit MinMax grid (R = {r}, c = r), same recipe and budget
                     (the int8 baseline is the sliced_int8 model at r = 8)
  matquant           R = {8, 4, 2}, λ = (0.1, 0.1, 1), served at 8, 4, 2 and interpolated 6, 3
  single_precision   R = {2} on the int8 parameterization, served at 8, 4, 2
  extra_precision    R = {8, 4, 2}, no clamp, λ = (1, 1, 1), served at 8, 4, 2 (extra bucket counted)
  mixnmatch_<s>      the matquant model with per-block widths: the paper's four strategies at a few budgets,
                     and the greedy budget search (`search`)
Perplexity (bitnest.eval.report.evaluate, ctx 256, non-overlapping windows) on C4 held-out (rows 1800–1999)
and WikiText-2 test, the first --limit-c4 / --limit-wiki windows (the same windows for every row); bits per
FFN weight count every stored bit (codes, fp16 scales and zeros, extra-precision index lists).
Intervals (issue 14): each row's per-window NLLs are kept in memory (never written); ci95_<text> = [lo, hi] is
the paired bootstrap 95 % interval of its NLL minus FP's (nats/token, 2000 resamples; FP [0, 0]), shown as
Δ NLL C4 [95 %] with "≈ FP" when it contains 0. The checks call one row better than another only when the
paired interval of their difference excludes 0; --from-json (no windows) shows saved intervals and leaves
those comparisons undecided.

Token budgets: every QAT training (MatQuant and each baseline) sees the same qat_steps × batch × 256 C4
training tokens (rows 0–1799; default 96 × 4 × 256 = 98,304); every OmniQuant run reconstructs each block on
the same omni_steps × omni_batch × 256 tokens (default 32 × 4 × 256 = 32,768, from 64 calibration sequences).
The plan is printed first, and the projected QAT time after the first training.

Budget (measured on 2 shared, busy cores, 1 thread, batch 4 × 256: 1.5 s per single-precision QAT step,
4.9 s per MatQuant step with R = {8, 4, 2}; ≈ 5 s per 4k evaluated tokens): on 2 quiet cores the table
should take ≈ 35–45 min (QAT ≈ 20, OmniQuant ≈ 5, evaluation ≈ 10, searches ≈ 3).

    python bench/matquant.py              # the full table (budgeted for < 60 min on 2 quiet CPU cores)
    python bench/matquant.py --smoke      # a ≤ 90 s smoke run with tiny budgets
    python bench/matquant.py --write      # also append the table to BENCHMARKS.md

Writes bench/results/matquant.json (rows) and bench/results/matquant.png (perplexity vs bits per FFN weight).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from bitnest.api import quantize
from bitnest.calib.data import CalibOptions, calibration_tokens
from bitnest.eval.report import evaluate
from bitnest.mixnmatch import STRATEGIES, apply_mix, mix_summary, search_mix, strategy_mix
from bitnest.models.blocks import select_linears
from bitnest.models.hf import load_model
from bitnest.paths import data_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, add_interval, header, interval_cell, pair_text, paired, write_json,  # noqa: E402
                    write_section)
MODEL = "ref-10m"
CTX = 256
SLICES = (8, 6, 4, 3, 2)
TRAINED = (8, 4, 2)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny budgets and few evaluation windows (≤ 90 s)")
    ap.add_argument("--write", action="store_true", help="append the markdown table to BENCHMARKS.md")
    ap.add_argument("--flavours", default="qat,omniquant")
    ap.add_argument("--qat-steps", type=int, default=96)
    ap.add_argument("--batch", type=int, default=4, help="QAT sequences of 256 tokens per step")
    ap.add_argument("--lr", type=float, default=3e-4, help="QAT peak LR (5%% warm-up, cosine)")
    ap.add_argument("--omni-steps", type=int, default=32, help="OmniQuant steps per block")
    ap.add_argument("--omni-batch", type=int, default=4)
    ap.add_argument("--omni-lr", type=float, default=1e-2, help="OmniQuant LR, constant (clipping logits: ×10)")
    ap.add_argument("--n-calib", type=int, default=64, help="OmniQuant calibration sequences")
    ap.add_argument("--limit-c4", type=int, default=48, help="C4 held-out windows of 256 tokens (all: 391)")
    ap.add_argument("--limit-wiki", type=int, default=16, help="WikiText-2 windows of 256 tokens (all: 1437)")
    ap.add_argument("--budgets", default="3.0,4.0,5.5", help="Mix'n'Match strategy budgets (bits per FFN weight), qat")
    ap.add_argument("--omni-budgets", default="3.0,4.5")
    ap.add_argument("--search-budgets", default="3.0,3.5", help="greedy search budgets, qat (omniquant: the first)")
    ap.add_argument("--search-samples", type=int, default=8, help="C4 training sequences the search measures NLL on")
    ap.add_argument("--search-levels", default="8,6,4,3,2", help="widths the greedy search may give a block")
    ap.add_argument("--no-g128", action="store_true", help="skip the group-128 QAT run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir")
    ap.add_argument("--from-json", help="rebuild the table, plot and (with --write) the section from saved rows; "
                    "pass the run's budget options so the header states them")
    ap.add_argument("--times", help="with --from-json: the training-time line to record")
    a = ap.parse_args(argv)
    if a.smoke:
        a.qat_steps, a.batch, a.omni_steps, a.omni_batch, a.n_calib = 2, 2, 1, 2, 4
        a.limit_c4, a.limit_wiki, a.search_samples = 2, 1, 1
        a.budgets, a.omni_budgets, a.search_budgets, a.search_levels = "3.0", "", "3.0", "8,4,2"
        a.no_g128 = True
    return a


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


class Bench:
    def __init__(self, args):
        self.args = args
        loaded = load_model(data_file(f"models/{MODEL}", args.data_dir))
        self.fp, self.tok, self.storage = loaded.model, loaded.tokenizer, loaded.storage_dtype
        self.ffn = select_linears(self.fp, "ffn")
        self.rows: list[dict] = []
        self.fp_row: dict | None = None  # the FP row with its per-window NLLs: every row's interval is against it
        self.t0 = time.time()
        a = args
        # one set of training tokens for every QAT run, one set of calibration sequences for every OmniQuant run
        self.qat_ids = calibration_tokens(self.fp, CalibOptions("c4", a.qat_steps * a.batch, CTX, seed=0), self.tok,
                                          a.data_dir)
        self.omni_ids = calibration_tokens(self.fp, CalibOptions("c4", a.n_calib, CTX, seed=1), self.tok, a.data_dir)
        self.search_ids = calibration_tokens(self.fp, CalibOptions("c4", a.search_samples, CTX, seed=2), self.tok,
                                             a.data_dir)
        self.train_seconds: list[tuple[str, float, int]] = []

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, **row) -> dict:
        a = self.args
        out = {"model": MODEL, "granularity": "channel", **row}
        for data, limit in (("wikitext2", a.limit_wiki), ("c4", a.limit_c4)):
            r = evaluate(model, self.tok, data, data_dir=a.data_dir, ctx=CTX, limit=limit, storage_dtype=self.storage,
                         progress=False, only=self.ffn, keep_windows=True)
            out[f"nll_{data}"], out[f"ppl_{data}"], out[f"eval_tokens_{data}"] = r["nll"], r["ppl"], r["tokens"]
            out[f"_win_{data}"] = r["window_nll"]  # in memory only (write_json drops it)
            out["bits_per_ffn_weight"] = r["bits_per_weight"] if r["quantized_weights"] else 16.0
            out["model_bytes"] = r["model_bytes"]
        out.setdefault("bits", out["bits_per_ffn_weight"])
        self.fp_row = out if out["method"] == "fp" else self.fp_row
        add_interval(out, self.fp_row)
        self.rows.append(out)
        print(f"  [{time.time() - self.t0:6.0f}s] {out['flavour']:<9} {out['method']:<26} {out['granularity']:<7} "
              f"r={str(out.get('r', '')):<3} bits/FFN {out['bits_per_ffn_weight']:6.3f}  C4 {out['ppl_c4']:9.2f}  "
              f"Wiki {out['ppl_wikitext2']:9.2f}  ΔNLL C4 {interval_cell(out, self.fp_row, 'c4') or '-'}", flush=True)
        return out

    def served(self, model, r):
        for n in self.ffn:
            model.get_submodule(n).serve_bits = r
        return model

    # ------------------------------------------------------------------ training
    def train(self, flavour: str, label: str, group_size=None, **kw):
        a = self.args
        if flavour == "qat":
            cfg = dict(flavour="qat", steps=a.qat_steps, batch=a.batch, lr=a.lr, n_calib=a.qat_steps * a.batch)
            ids = self.qat_ids
        else:
            cfg = dict(flavour="omniquant", steps=a.omni_steps, batch=a.omni_batch, lr=a.omni_lr, n_calib=a.n_calib)
            ids = self.omni_ids
        t = time.time()
        m = quantize(copy.deepcopy(self.fp), "matquant", progress=False, calib=ids, group_size=group_size,
                     **cfg, **kw)
        dt = time.time() - t
        res = m.bitnest_train
        self.train_seconds.append((f"{flavour} {label}", dt, res.steps))
        if len(self.train_seconds) == 1 and flavour == "qat":
            a, per = self.args, dt / max(res.steps, 1)  # one precision per step; MatQuant/extra run three
            est = per * a.qat_steps * (6 + 3 * (2 + (0 if a.no_g128 else 1)))
            print(f"  measured {per:.2f} s per single-precision QAT step: ≈ {est / 60:.0f} min for the QAT trainings",
                  flush=True)
        print(f"  [{time.time() - self.t0:6.0f}s] trained {flavour} {label}: {res.steps} steps, {res.tokens:,} tokens, "
              f"{dt:.0f} s ({dt / max(res.steps, 1):.2f} s/step)", flush=True)
        return m, res.tokens

    # ------------------------------------------------------------------ the table
    def run(self):
        a = self.args
        flavours = [f for f in a.flavours.split(",") if f]
        self.print_plan(flavours)
        fp_row = self.evaluate(self.fp, flavour="none", method="fp", bits=16.0, r=None, train_tokens=0)
        fp_row["bits_per_ffn_weight"] = 16.0
        for g in ([None] if a.no_g128 else [None, 128]):
            base = quantize(copy.deepcopy(self.fp), "sliced", bits=8, group_size=g, targets="ffn", progress=False)
            for r in SLICES:
                self.evaluate(self.served(base, r), flavour="none", method="minmax", r=r, bits=r,
                                               train_tokens=0, granularity="channel" if g is None else f"g{g}")
        for flavour in flavours:
            self.flavour_rows(flavour)
        if "qat" in flavours and not a.no_g128:
            m, tok = self.train("qat", "matquant g128", group_size=128)
            for r in SLICES:
                self.evaluate(self.served(m, r), flavour="qat", method="matquant", r=r, bits=r, train_tokens=tok,
                              granularity="g128")
        # fp and minmax need no training: evaluated once, listed under every flavour (group 128: the qat run)
        shared = [r for r in self.rows if r["flavour"] == "none"]
        self.rows = [r for r in self.rows if r["flavour"] != "none"]
        for f in flavours:
            self.rows += [{**r, "flavour": f} for r in shared if r["granularity"] == "channel" or f == "qat"]
        return self.rows

    def flavour_rows(self, flavour: str):
        a = self.args
        ev = lambda m, method, r, tok, **kw: self.evaluate(m, flavour=flavour, method=method, r=r, train_tokens=tok, **kw)
        # Sliced int8 (and the int8 Baseline: the same training)
        m, tok = self.train(flavour, "int8 alone", precisions=(8,))
        for r in SLICES:
            row = ev(self.served(m, r), "sliced_int8", r, tok, bits=r)
            if r == 8:
                self.rows.append({**row, "method": "baseline"})
        # Baselines: each r alone on its own r-bit grid
        for r in (4, 2, 6, 3):
            m, tok = self.train(flavour, f"baseline int{r}", precisions=(r,), parent_bits=r)
            ev(m, "baseline", r, tok, bits=r)
        # MatQuant (+ interpolation, Mix'n'Match)
        m, tok = self.train(flavour, "matquant R={8,4,2}")
        for r in SLICES:
            ev(self.served(m, r), "matquant", r, tok, bits=r)
        budgets = floats(a.budgets if flavour == "qat" else a.omni_budgets)
        for strategy in STRATEGIES:
            for b in budgets:
                mix = strategy_mix(m, strategy, b)
                apply_mix(m, mix)
                row = ev(m, f"mixnmatch_{strategy}", None, tok, budget=b, mix=mix_summary(mix))
                row["bits"] = row["bits_per_ffn_weight"]
        searches = floats(a.search_budgets)
        for b in (searches if flavour == "qat" else searches[:1] if budgets else []):
            self.served(m, 8)
            mix, path = search_mix(m, self.search_ids, b, levels=[int(x) for x in floats(a.search_levels)],
                                   progress=False)
            row = ev(m, "mixnmatch_search", None, tok, budget=b, mix=mix_summary(mix))
            row["bits"] = row["bits_per_ffn_weight"]
        del m
        # Single Precision MatQuant: R = {2} on the int8 parameterization
        m, tok = self.train(flavour, "single precision R={2}", precisions=(2,))
        for r in TRAINED:
            ev(self.served(m, r), "single_precision", r, tok, bits=r)
        # Extra Precision MatQuant: no clamp, λ = (1, 1, 1)
        m, tok = self.train(flavour, "extra precision", extra_precision=True)
        for r in TRAINED:
            row = ev(self.served(m, r), "extra_precision", r, tok)
            row["bits"] = row["bits_per_ffn_weight"]
        del m

    def print_plan(self, flavours):
        a = self.args
        qat_tok = a.qat_steps * a.batch * CTX
        omni_tok = a.omni_steps * a.omni_batch * CTX
        print(f"bitnest MatQuant benchmark on {MODEL} (FFN only), ctx {CTX}, {torch.get_num_threads()} threads")
        print(f"  evaluation: C4 held-out first {a.limit_c4} windows, WikiText-2 first {a.limit_wiki} windows")
        n_train = {"qat": 9 + (0 if a.no_g128 else 1), "omniquant": 9}
        for f in flavours:
            if f == "qat":
                print(f"  qat: {n_train[f]} trainings × {a.qat_steps} steps × {a.batch} × {CTX} tokens = {qat_tok:,} tokens each "
                      f"(int8 alone, baselines int4/2/6/3, matquant, single precision, extra precision"
                      f"{', matquant g128' if not a.no_g128 else ''}); MatQuant/extra run 3 forward+backward per step")
            else:
                print(f"  omniquant: {n_train[f]} runs × 10 blocks × {a.omni_steps} steps × {a.omni_batch} × {CTX} tokens "
                      f"= {omni_tok:,} tokens per block each, {a.n_calib} calibration sequences, LR {a.omni_lr} constant")
        print(f"  Mix'n'Match: strategies {', '.join(STRATEGIES)} at {a.budgets} (omniquant: {a.omni_budgets or 'none'}) bits per FFN "
              f"weight; greedy search at {a.search_budgets} on {a.search_samples} C4 training sequences", flush=True)


# ------------------------------------------------------------------ output


def summary_table(rows: list[dict], args) -> str:
    fp = next(r for r in rows if r["method"] == "fp")
    lines = [f"### MatQuant on {MODEL} (FFN only; C4 held-out {args.limit_c4} × {CTX} tokens, WikiText-2 "
             f"{args.limit_wiki} × {CTX}; QAT {args.qat_steps} steps × {args.batch} × {CTX} tokens per training, "
             f"OmniQuant {args.omni_steps} steps × {args.omni_batch} × {CTX} tokens per block)", "",
             f"FP: C4 PPL {fp['ppl_c4']:.2f} (NLL {fp['nll_c4']:.4f}), WikiText-2 PPL {fp['ppl_wikitext2']:.2f}", ""]
    methods = ["minmax", "sliced_int8", "baseline", "matquant", "single_precision", "extra_precision"]
    ci = any(r.get("ci95_c4") for r in rows)  # rows saved before the intervals: the old Δ NLL cells

    def delta(x):
        """Δ NLL C4 vs FP with its paired 95 % interval; rows saved before the intervals: the old 3-digit Δ."""
        return interval_cell(x, fp, "c4") if ci else f"{x['nll_c4'] - fp['nll_c4']:+.3f}"

    for flavour in ("qat", "omniquant"):
        sel = [r for r in rows if r["flavour"] == flavour and r["granularity"] == "channel"]
        if not sel:
            continue
        lines += [f"**{flavour}**, per channel: C4 PPL (Δ NLL vs FP{' [95 %]; ≈ FP = the interval contains 0' if ci else ''})"
                  " / WikiText-2 PPL", "", "| r | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for r in SLICES:
            cells = []
            for m in methods:
                hit = [x for x in sel if x["method"] == m and x.get("r") == r]
                cells.append(f"{hit[0]['ppl_c4']:.1f} ({delta(hit[0])}) / {hit[0]['ppl_wikitext2']:.0f}"
                             + (f" @{hit[0]['bits_per_ffn_weight']:.2f}b" if m == "extra_precision" else "")
                             if hit else "–")
            lines.append(f"| int{r} | " + " | ".join(cells) + " |")
        mixes = [x for x in sel if x["method"].startswith("mixnmatch")]
        if mixes:
            lines += ["", "| Mix'n'Match | budget | bits/FFN weight | per block | C4 PPL | "
                      + ("Δ NLL C4 [95 %] | " if ci else "") + "WikiText-2 PPL |", "|---|---|---|---|---|" + ("---|" if ci else "") + "---|"]
            for x in mixes:
                lines.append(f"| {x['method'][10:]} | {x['budget']} | {x['bits_per_ffn_weight']:.3f} | {x['mix']} | "
                             f"{x['ppl_c4']:.2f} | " + (f"{interval_cell(x, fp, 'c4')} | " if ci else "")
                             + f"{x['ppl_wikitext2']:.1f} |")
        lines.append("")
    g = [r for r in rows if r["granularity"] == "g128" and r["flavour"] == "qat"]
    if g:
        lines += [f"**group 128** (qat): C4 PPL{' (Δ NLL vs FP [95 %])' if ci else ''}", "", "| r | minmax | matquant |",
                  "|---|---|---|"]
        for r in SLICES:
            cells = [next((f"{x['ppl_c4']:.1f}" + (f" ({delta(x)})" if ci else "") for x in g
                           if x["method"] == m and x.get("r") == r), "–") for m in ("minmax", "matquant")]
            lines.append(f"| int{r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    flavours = [f for f in ("qat", "omniquant") if any(r["flavour"] == f for r in rows)]
    fp = next(r for r in rows if r["method"] == "fp")
    fig, axes = plt.subplots(1, len(flavours), figsize=(7 * len(flavours), 5), squeeze=False)
    styles = {"minmax": ("k", "x", ":"), "sliced_int8": ("tab:gray", "s", "--"), "baseline": ("tab:blue", "o", "-"),
              "matquant": ("tab:red", "D", "-"), "single_precision": ("tab:purple", "v", ""),
              "extra_precision": ("tab:orange", "^", "")}
    mix_markers = {"pyramid": "P", "reverse_pyramid": "X", "increasing": ">", "decreasing": "<", "search": "*"}
    for ax, flavour in zip(axes[0], flavours):
        sel = [r for r in rows if r["flavour"] == flavour and r["granularity"] == "channel"]
        for m, (c, mk, ls) in styles.items():
            pts = sorted((r["bits_per_ffn_weight"], r["ppl_c4"]) for r in sel if r["method"] == m)
            if pts:
                ax.plot(*zip(*pts), color=c, marker=mk, ls=ls or "none", label=m)
        for s, mk in mix_markers.items():
            pts = [(r["bits_per_ffn_weight"], r["ppl_c4"]) for r in sel if r["method"] == f"mixnmatch_{s}"]
            if pts:
                ax.scatter(*zip(*pts), marker=mk, s=70, color="tab:green", alpha=0.8, label=f"mix'n'match {s}",
                           edgecolors="k", linewidths=0.4)
        ax.axhline(fp["ppl_c4"], color="k", lw=0.8, label="fp")
        ppl = [r["ppl_c4"] for r in sel]
        if max(ppl) > 3 * min(ppl):  # log only for a wide range (a narrow log axis has no labelled ticks)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("bits per FFN weight (every stored bit)")
        ax.set_ylabel("C4 held-out perplexity")
        ax.set_title(f"{MODEL}, MatQuant {flavour}, per channel")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def claims(rows: list[dict]) -> str:
    """The issue's done-when checks, computed from the rows (per channel, C4 held-out). One row is better than
    another only when the paired bootstrap 95 % interval of their NLL difference over the evaluation windows
    excludes 0 (rows read back from JSON keep no windows: those comparisons are reported without a verdict)."""
    def get(flavour, method, r):
        hit = [x for x in rows if x["flavour"] == flavour and x["granularity"] == "channel" and x["method"] == method
               and x.get("r") == r]
        return hit[0] if hit else None

    def ci(x):
        c = x.get("ci95_c4")
        return f" [{c[0]:+.4f}, {c[1]:+.4f}]" if c else ""

    out = []
    for flavour in ("qat", "omniquant"):
        fp, mq2, bl2 = get(flavour, "fp", None), get(flavour, "matquant", 2), get(flavour, "baseline", 2)
        if not (fp and mq2 and bl2):
            continue
        ratio = (mq2["nll_c4"] - fp["nll_c4"]) / (bl2["nll_c4"] - fp["nll_c4"])
        out.append(f"- {flavour}: int2 gap to FP (Δ NLL, C4) MatQuant {mq2['nll_c4'] - fp['nll_c4']:+.4f}{ci(mq2)} vs Baseline "
                   f"{bl2['nll_c4'] - fp['nll_c4']:+.4f}{ci(bl2)}: ratio {ratio:.2f} (paper's claim: ≤ 0.7 on QAT); "
                   f"MatQuant − Baseline int2 Δ NLL [paired 95 %] {pair_text(paired(mq2, bl2, 'c4'), 'MatQuant')}")
        for r in (8, 4, 3):
            mq, bl, sl = get(flavour, "matquant", r), get(flavour, "baseline", r), get(flavour, "sliced_int8", r)
            if mq and bl:
                out.append(f"  - int{r}: MatQuant {mq['ppl_c4']:.2f} vs Baseline {bl['ppl_c4']:.2f} "
                           f"({100 * (mq['ppl_c4'] / bl['ppl_c4'] - 1):+.2f} %; Δ NLL "
                           f"{pair_text(paired(mq, bl, 'c4'), 'MatQuant')})"
                           + (f"; Sliced int8 {sl['ppl_c4']:.2f} (MatQuant − Sliced int8 Δ NLL "
                              f"{pair_text(paired(mq, sl, 'c4'), 'MatQuant')})" if sl and r == 3 else ""))
        i3 = get(flavour, "matquant", 3)
        mixes = [x for x in rows if x["flavour"] == flavour and x["granularity"] == "channel"
                 and x["method"].startswith("mixnmatch") and x["bits_per_ffn_weight"] <= 3.0 + 1e-9]
        if i3 and mixes:
            best, who = min(mixes, key=lambda x: x["ppl_c4"]), "Mix'n'Match"
            out.append(f"  - best Mix'n'Match at ≤ 3.0 bits/FFN weight: {best['method'][10:]} {best['mix']} "
                       f"({best['bits_per_ffn_weight']:.3f} b) C4 {best['ppl_c4']:.2f} vs interpolated int3 "
                       f"({i3['bits_per_ffn_weight']:.3f} b) {i3['ppl_c4']:.2f} (Δ NLL {pair_text(paired(best, i3, 'c4'), who)})")
    return "\n".join(out) + "\n"


def report(rows: list[dict], args, name: str, times: str = "") -> None:
    """Plot, table and (with --write) the `matquant` section of BENCHMARKS.md."""
    plot(rows, RESULTS / f"{name}.png")
    table = summary_table(rows, args)
    checks = claims(rows)
    print("\n" + table + "\n" + checks)
    if args.write and not args.smoke:
        extra = (f"Model ref-10m, FFN projections only (as the paper), MinMax asymmetric grids; every QAT training "
                 f"(MatQuant and each baseline) sees the same {args.qat_steps} × {args.batch} × {CTX} = "
                 f"{args.qat_steps * args.batch * CTX:,} C4-training tokens (rows 0–1799; 5 % warm-up, cosine, LR "
                 f"{args.lr}); every OmniQuant run reconstructs each block for {args.omni_steps} steps × "
                 f"{args.omni_batch} × {CTX} tokens from {args.n_calib} calibration sequences. Rows: "
                 f"`bench/results/{name}.json`; plot: `bench/results/{name}.png`.\n")
        section = header("MatQuant (issue 3)", extra) + "\n" + table + "\nThe issue's checks, from these rows:\n\n" + checks
        if times:
            section += "\nTraining time: " + times + "\n"
        section += f"\n![MatQuant perplexity vs bits](bench/results/{name}.png)\n"
        write_section("matquant", section)
        print("wrote the matquant section of BENCHMARKS.md")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    name = "matquant_smoke" if args.smoke else "matquant"
    if args.from_json:  # redraw the table, plot and section from saved rows; nothing is trained
        report(json.loads(Path(args.from_json).read_text()), args, name, args.times or "")
        return 0
    t0 = time.time()
    bench = Bench(args)
    rows = bench.run()
    write_json(f"{name}.json", rows)
    times = "; ".join(f"{k} {s:.0f} s ({s / max(n, 1):.2f} s/step)" for k, s, n in bench.train_seconds)
    report(rows, args, name, times)
    print("training time: " + times)
    print(f"wrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.png')}; total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
