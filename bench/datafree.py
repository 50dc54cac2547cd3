"""Data-free grids (issue 14): bitnest's `lpfit` vs HQQ's own optimizer, no calibration data anywhere.

    python bench/datafree.py [--limit 64] [--models ref-10m,stories260K] [--bits 2,3,4] [--data-dir DIR]
    python bench/datafree.py --quick          # smoke run (2 windows, 2 bits, stories260K; writes nothing)
    python bench/datafree.py --bits 3 --limit 0 --no-nested --name datafree_whole   # 3 bits on the whole texts
    python bench/datafree.py --groups channel,128 ...   # other granularities (default channel,64)

Rows per model, every Linear of the decoder blocks (FFN + attention), asymmetric grids, per output channel and
groups of 64 (where 64 divides every layer's inputs; stories260K's 172-wide FFN admits none), at 2, 3 and 4 bits:
  fp; bitnest `rtn` (MinMax); HQQ round-to-nearest (`hqq`/`rtn`, optimize=False) and HQQ's half-quadratic optimizer
  (`hqq`/`hqq_opt`, its defaults: p = 0.7, β = 10 ×1.01, ≤ 20 iterations, zero only) through bench/foundation.py;
  bitnest `lpfit` (ℓp half-quadratic fit of scale and zero, grids/lpfit.py);
  and the int8 Matryoshka parents served at 8/4/3/2 by MatQuant slicing: plain `sliced` (MinMax int8) vs
  `lpfit_nested` (the int8 α, z fitted to the summed ℓp error of the 8/4/3/2 slices).
Evaluation: the first --limit windows of WikiText-2 test and of C4 held-out (rows 1800–1999) at the model's training
context, the same windows for every row; ΔNLL vs FP with a paired bootstrap 95 % interval (windows resampled, 2000
resamples), and for each lpfit row its paired ΔNLL vs hqq_opt at the same bits and granularity; for each hqq_opt
row also the paired ΔNLL of lpfit's row with the most bits per weight not above hqq_opt's (same storage or less).
bits_per_weight: every stored bit (codes, fp16 scales and zeros) per quantized weight; HQQ's from its packed codes
(3-bit codes are packed 10 per int32: 3.2 bits) and its scale and zero counted at 16 bits each, as it ships them.

`datafree_rows(model_name, ...)` returns the rows (with per-window NLLs when asked) for other benches.
Writes bench/results/datafree.json and the `datafree` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import Timer, header, load, write_json, write_section  # noqa: E402

TEXTS = ("wikitext2", "c4")


def _score(model, tok, ctx, storage, limit, data_dir) -> dict:
    """eval_row's fields plus each window's NLL per text (for paired intervals)."""
    from bitnest.eval.report import evaluate
    out = {}
    for d in TEXTS:
        r = evaluate(model, tok, d, data_dir=data_dir, ctx=ctx, limit=limit, storage_dtype=storage, progress=False,
                     keep_windows=True)
        out[f"ppl_{d}"], out[f"nll_{d}"], out[f"tokens_{d}"], out[f"_win_{d}"] = r["ppl"], r["nll"], r["tokens"], r["window_nll"]
        out["bits_per_weight"], out["model_bytes"] = r["bits_per_weight"], r["model_bytes"]
    return out


def _ci(a: dict, b: dict, d: str) -> list[float]:
    from bitnest.eval.perplexity import paired_interval
    m, lo, hi = paired_interval(a[f"_win_{d}"], b[f"_win_{d}"])
    return [m, lo, hi]


def datafree_rows(model_name: str, *, bits=(2, 3, 4), groups=(None, 64), slices=(8, 4, 3, 2), limit: int | None = 128,
                  data_dir=None, lpfit_options: dict | None = None, hqq: bool = True, keep_windows: bool = False,
                  log=print) -> list[dict]:
    """Rows {model, library, method, bits, group_size, bits_per_weight, nll_c4, ppl_c4, nll_wikitext2,
    ppl_wikitext2, ci95_c4, ci95_wikitext2 ([lo, hi] of ΔNLL vs FP), d_nll_c4/d_nll_wikitext2, seconds} and, on
    lpfit rows, vs_hqq_opt_{text} = [ΔNLL, lo, hi] against hqq_opt at the same setting. `groups`: None = per
    channel; a group that does not divide every layer's inputs is skipped."""
    from bitnest.api import quantize
    from bitnest.models.blocks import select_linears
    from bitnest.nn.qlinear import QuantLinear
    from foundation import hqq_quantize, peer_bits

    opts = dict(lpfit_options or {})
    loaded, ctx = load(model_name, data_dir)
    fp, tok, storage = loaded.model, loaded.tokenizer, loaded.storage_dtype
    names = select_linears(fp, "all")
    dims = {fp.get_submodule(n).in_features for n in names}
    groups = [g for g in groups if g is None or all(d % g == 0 for d in dims)]
    rows: list[dict] = []
    fp_row: dict = {}

    def add(library, method, b, g, model, seconds, peer_bytes=None, served=None):
        r = _score(model, tok, ctx, storage, limit, data_dir)
        if peer_bytes is not None:
            r["bits_per_weight"], r["model_bytes"] = peer_bits(model, names, storage, peer_bytes)
        row = {"model": model_name, "library": library, "method": method, "bits": b,
               "group_size": None if b is None else (g if g else "channel"), "ctx": ctx, "limit": limit,
               "seconds": seconds, **r}
        if served is not None:
            row["parent_bits"] = served
        if fp_row:
            for d in TEXTS:
                m, lo, hi = _ci(row, fp_row, d)
                row[f"d_nll_{d}"], row[f"ci95_{d}"] = m, [lo, hi]
        rows.append(row)
        log(f"  {model_name:<12}{library:<8}{method:<14}{str(b):>4} {str(row['group_size']):>8}  bpw {row['bits_per_weight']:.3f}  "
            f"wiki {r['ppl_wikitext2']:9.2f}  c4 {r['ppl_c4']:9.2f}  ({seconds:.1f} s)")
        return row

    log(f"{model_name}: ctx {ctx}, {len(names)} linears (FFN + attention), groups {groups}, limit {limit}")
    fp_row.update(add("-", "fp", None, None, fp, 0.0))
    for g in groups:
        for b in bits:
            hq = None
            with Timer() as t:
                m = quantize(copy.deepcopy(fp), "rtn", bits=b, group_size=g, progress=False)
            add("bitnest", "rtn", b, g, m, t.seconds)
            if hqq:
                for method, opt in (("rtn", False), ("hqq_opt", True)):
                    m = copy.deepcopy(fp)
                    with Timer() as t:
                        qb = hqq_quantize(m, names, b, g, opt)
                    r = add("hqq", method, b, g, m, t.seconds, peer_bytes=qb)
                    hq = r if opt else hq
            with Timer() as t:
                m = quantize(copy.deepcopy(fp), "lpfit", bits=b, group_size=g, progress=False, **opts)
            r = add("bitnest", "lpfit", b, g, m, t.seconds)
            if hq is not None:
                for d in TEXTS:
                    r[f"vs_hqq_opt_{d}"] = _ci(r, hq, d)
        for method, kw in (("sliced", {}), ("lpfit_nested", {**opts, "nested": True})) if slices else ():
            with Timer() as t:
                parent = quantize(copy.deepcopy(fp), "sliced" if method == "sliced" else "lpfit", bits=8, group_size=g,
                                  progress=False, **kw)
            for r_ in slices:
                for q in parent.modules():
                    if isinstance(q, QuantLinear):
                        q.set_serve_bits(r_)
                add("bitnest", method, r_, g, parent, t.seconds, served=8)
    for h in rows:  # lpfit's best row using at most the bits per weight HQQ's optimizer spent, where that is another grid
        if h["method"] != "hqq_opt":
            continue
        fits = [r for r in rows if r["method"] == "lpfit" and r["bits"] == h["bits"]
                and r["bits_per_weight"] <= h["bits_per_weight"]]
        best = max(fits, key=lambda r: r["bits_per_weight"], default=None)
        if best is not None and best["group_size"] != h["group_size"]:
            h["lpfit_at_bpw"] = {"group_size": best["group_size"], "bits_per_weight": best["bits_per_weight"],
                                 **{f"ppl_{d}": best[f"ppl_{d}"] for d in TEXTS},
                                 **{f"vs_{d}": _ci(best, h, d) for d in TEXTS}}
    if not keep_windows:
        for r in rows:
            for d in TEXTS:
                r.pop(f"_win_{d}", None)
    return rows


def _fmt_ci(r, d):
    if "ci95_" + d not in r:
        return ""
    lo, hi = r["ci95_" + d]
    return f"{r['d_nll_' + d]:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _fmt_vs(r, d):
    return _fmt_diff(r.get(f"vs_hqq_opt_{d}"))


def _fmt_diff(v):
    """[ΔNLL, lo, hi] of lpfit − hqq_opt, marked by where the interval lies."""
    if not v:
        return ""
    m, lo, hi = v
    mark = "**better**" if hi < 0 else ("worse" if lo > 0 else "inside")
    return f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}] {mark}"


def table(rows: list[dict]) -> str:
    head = ("| model | library | method | bits | group | bits/weight | WikiText-2 PPL | ΔNLL vs FP [95 %] | C4 PPL | "
            "ΔNLL vs FP [95 %] | lpfit − hqq_opt ΔNLL wiki [95 %] | lpfit − hqq_opt ΔNLL C4 [95 %] | quant s |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        name = r["method"] + (f" (int{r['parent_bits']}→{r['bits']})" if r.get("parent_bits") else "")
        lines.append(f"| {r['model']} | {r['library']} | {name} | {r['bits'] or '-'} | {r['group_size'] or '-'} | "
                     f"{r['bits_per_weight']:.3f} | {r['ppl_wikitext2']:.2f} | {_fmt_ci(r, 'wikitext2')} | {r['ppl_c4']:.2f} | "
                     f"{_fmt_ci(r, 'c4')} | {_fmt_vs(r, 'wikitext2')} | {_fmt_vs(r, 'c4')} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """Done-when check: lpfit ≤ hqq_opt at 2 and 3 bits on both texts, every model and granularity."""
    out = []
    for r in rows:
        if r["method"] != "lpfit" or r["bits"] not in (2, 3) or "vs_hqq_opt_c4" not in r:
            continue
        hq = next(h for h in rows if h["model"] == r["model"] and h["method"] == "hqq_opt" and h["bits"] == r["bits"]
                  and h["group_size"] == r["group_size"])
        ok = all(r[f"ppl_{d}"] <= hq[f"ppl_{d}"] for d in TEXTS)
        sig = [d for d in TEXTS if r[f"vs_hqq_opt_{d}"][2] < 0]
        worse = [d for d in TEXTS if r[f"vs_hqq_opt_{d}"][1] > 0]
        out.append(f"{r['model']} int{r['bits']} {r['group_size']}: lpfit {'≤' if ok else '>'} hqq_opt on "
                   f"{'both texts' if ok else ', '.join(d for d in TEXTS if r[f'ppl_{d}'] > hq[f'ppl_{d}']) + ' (not ≤)'}"
                   f" at {r['bits_per_weight']:.3f} vs {hq['bits_per_weight']:.3f} bits/weight"
                   + (f"; better outside the interval on {', '.join(sig)}" if sig else "")
                   + (f"; worse outside the interval on {', '.join(worse)}" if worse else ""))
    for h in rows:  # the same comparison at (at most) the same bits per weight: lpfit on a finer grid
        m = h.get("lpfit_at_bpw")
        if not m or h["bits"] not in (2, 3):
            continue
        ok = all(m[f"ppl_{d}"] <= h[f"ppl_{d}"] for d in TEXTS)
        vs = "; ".join(f"{d} {_fmt_diff(m[f'vs_{d}'])}" for d in TEXTS)
        out.append(f"{h['model']} int{h['bits']} at ≤ the same bits per weight: lpfit g{m['group_size']} "
                   f"({m['bits_per_weight']:.3f}) {'≤' if ok else '>'} hqq_opt {h['group_size']} "
                   f"({h['bits_per_weight']:.3f}) on {'both texts' if ok else 'not both texts'}; lpfit − hqq_opt ΔNLL: {vs}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ref-10m,stories260K")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--limit", type=int, default=64, help="windows per text (default 64; 0 = all)")
    ap.add_argument("--data-dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="lpfit option (both variants)")
    ap.add_argument("--quick", action="store_true", help="smoke run: stories260K, 2 windows, 2 bits; writes nothing")
    ap.add_argument("--no-nested", action="store_true", help="skip the int8 parents served by slicing")
    ap.add_argument("--groups", default="channel,64",
                    help="granularities, comma-separated: channel and group sizes (default channel,64); each hqq_opt "
                         "row is also compared with lpfit's row of the most bits per weight that are ≤ its own")
    ap.add_argument("--name", default="datafree", help="results file bench/results/NAME.json and BENCHMARKS.md section")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from bitnest.commands import parse_options
    opts = parse_options("lpfit", a.option)
    models, bits, limit = a.models.split(","), tuple(int(b) for b in a.bits.split(",")), a.limit or None
    try:
        groups = tuple(None if g.strip() == "channel" else int(g) for g in a.groups.split(","))
    except ValueError:
        ap.error(f"--groups: expected 'channel' or group sizes, got {a.groups!r}")
    if a.quick:
        models, bits, limit, a.no_write = ["stories260K"], (2,), 2, True
    t0 = time.perf_counter()
    rows = []
    for name in models:
        rows += datafree_rows(name, bits=bits, groups=groups, limit=limit, data_dir=a.data_dir, lpfit_options=opts,
                              slices=() if a.no_nested else (8, 4, 3, 2) if not a.quick else (2,), log=lambda s: print(s, flush=True))
    minutes = (time.perf_counter() - t0) / 60
    text = table(rows)
    checks = verdict(rows)
    print("\n" + text + "\n\n" + "\n".join(checks) + f"\n\nrun time {minutes:.1f} min")
    if a.no_write:
        return 0
    write_json(f"{a.name}.json", rows)
    from bitnest.methods.lpfit import LpFitConfig
    d = LpFitConfig()  # the defaults the lpfit rows ran with (options above override them)
    note = (f"No calibration data. Every Linear of the decoder blocks (FFN + attention), asymmetric grids; embeddings "
            f"and lm_head unquantized. Evaluation: {f'the first {limit} windows' if limit else 'every window'} of WikiText-2 test and of C4 held-out "
            "(rows 1800–1999) at each model's training context, the same windows for every row. ΔNLL (nats/token) vs FP "
            "with a paired bootstrap 95 % interval over those windows (2000 resamples); the last two interval columns "
            "compare lpfit with HQQ's optimizer at the same bits and granularity (negative = lpfit better; **better** / "
            "worse = outside the interval, inside = not distinguishable); the lines under the table also compare each "
            "hqq_opt row with lpfit's row of the most bits per weight not above its own (HQQ packs 3-bit codes 10 per "
            "int32 and stores fp16 scale and zero, so per channel it spends more bits than lpfit's per-channel grid). `hqq_opt` = HQQ's `Quantizer.quantize(..., "
            "optimize=True)` (half-quadratic zero fitting, p = 0.7, its defaults), `hqq`/`rtn` the same call with "
            "optimize=False; HQQ dequantizes with fp32 scale/zero but is counted at 16 bits each (3-bit codes packed "
            "10 per int32). `lpfit` options: " + (", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults")
            + f" (p = {d.p}, β = {d.beta:g} step ×{d.kappa}, {d.iters} iterations, clip-ratio start, scale and zero, "
            f"every weight's error weighted by σ_group + {d.magnitude_weight}·|w|). `sliced` / `lpfit_nested` = one int8 checkpoint served at 8/4/3/2 by "
            "MatQuant slicing (quant s = the int8 fit, once). stories260K is a "
            f"TinyStories model (both texts out of domain; widths 64/172 admit no group of 64). Run time {minutes:.1f} min.\n")
    title = "Data-free grids: lpfit vs HQQ's optimizer" + ("" if a.name == "datafree" else f" ({a.name})")
    write_section(a.name, header(title, note) + "\n" + text + "\n\n"
                  + "\n".join(f"- {c}" for c in checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
