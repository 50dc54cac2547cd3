"""What integer zero points cost: real-valued z (the paper's) vs z rounded to a code (GPTQ / compressed-tensors / GGUF).

    python bench/int_zero.py [--limit 64] [--mq-steps 48] [--n-calib 64] [--data-dir DIR]

ref-10m, asymmetric grids, g64. Each pair of rows differs only in `int_zero`: RTN and GPTQ at 8/4/3/2 bits, the
sliced-int8 RTN checkpoint served at 8/4/3/2 (MatQuant's untrained baseline) and MatQuant QAT (8, 4, 2 trained
together, FFN) at 8/4/2. Perplexity on the first --limit windows of WikiText-2 test and of C4 held-out (256 tokens,
the same windows for every row); Δ NLL = int − real over all those windows with its paired bootstrap 95 % interval
(windows resampled, the same resample for both rows). "inside" = the interval contains 0: no measurable cost.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, load, write_json, write_section  # noqa: E402

G = 64


def pairs(fp, a):
    """(family, bits, build(int_zero) -> model) for every row pair."""
    from bitnest import runtime
    from bitnest.api import quantize

    def plain(method, b):
        def build(iz):
            m = copy.deepcopy(fp)
            kw = dict(bits=b, group_size=G, int_zero=iz)
            if method == "gptq":
                kw.update(n_calib=a.n_calib, calib_len=256)
            return quantize(m, method, progress=False, **kw)
        return build

    parents = {}

    def nested(method, r):
        def build(iz):
            if (method, iz) not in parents:
                m = copy.deepcopy(fp)
                if method == "sliced":
                    quantize(m, "sliced", bits=8, group_size=G, int_zero=iz, progress=False)
                else:
                    quantize(m, "matquant", precisions=(8, 4, 2), steps=a.mq_steps, group_size=G, int_zero=iz,
                             progress=False)
                parents[(method, iz)] = m
            m = copy.deepcopy(parents[(method, iz)])
            runtime.set_precision(m, r)
            return m
        return build

    for method in ("rtn", "gptq"):
        for b in (8, 4, 3, 2):
            yield method.upper(), b, plain(method, b)
    for r in (8, 4, 3, 2):
        yield "sliced int8 (RTN)", r, nested("sliced", r)
    for r in (8, 4, 2):
        yield f"MatQuant QAT ({a.mq_steps} steps)", r, nested("matquant", r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=64, help="windows per dataset (default 64)")
    ap.add_argument("--mq-steps", type=int, default=48)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--data-dir")
    ap.add_argument("--quick", action="store_true", help="smoke run (2 windows, 2 steps; writes nothing)")
    a = ap.parse_args()
    if a.quick:
        a.limit, a.mq_steps, a.n_calib = 2, 2, 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    from bitnest.eval.perplexity import paired_interval
    from bitnest.eval.report import evaluate

    t0 = time.perf_counter()
    loaded, ctx = load("ref-10m", a.data_dir)
    fp, tok = loaded.model, loaded.tokenizer

    def score(m):
        rs = [evaluate(m, tok, d, data_dir=a.data_dir, ctx=ctx, limit=a.limit, progress=False, keep_windows=True)
              for d in ("wikitext2", "c4")]
        return {"ppl_wikitext2": rs[0]["ppl"], "ppl_c4": rs[1]["ppl"], "windows": rs[0]["window_nll"] + rs[1]["window_nll"]}

    fp_s = score(fp)
    rows = []
    print(f"FP: wiki {fp_s['ppl_wikitext2']:.2f}  c4 {fp_s['ppl_c4']:.2f}", flush=True)
    for family, b, build in pairs(fp, a):
        real, intz = score(build(False)), score(build(True))
        d, lo, hi = paired_interval(intz["windows"], real["windows"])
        dfp, lfp, hfp = paired_interval(real["windows"], fp_s["windows"])
        row = {"family": family, "bits": b, **{f"{k}_real": real[k] for k in ("ppl_wikitext2", "ppl_c4")},
               **{f"{k}_int": intz[k] for k in ("ppl_wikitext2", "ppl_c4")}, "d_nll": d, "lo": lo, "hi": hi,
               "inside": lo <= 0 <= hi, "d_nll_real_vs_fp": dfp, "lo_fp": lfp, "hi_fp": hfp}
        rows.append(row)
        print(f"{family:26s} int{b}  wiki {row['ppl_wikitext2_real']:8.2f} → {row['ppl_wikitext2_int']:8.2f}  "
              f"c4 {row['ppl_c4_real']:8.2f} → {row['ppl_c4_int']:8.2f}  ΔNLL {d:+.4f} [{lo:+.4f}, {hi:+.4f}]", flush=True)
    if a.quick:
        return 0
    write_json("int_zero.json", [{"family": "FP", "ppl_wikitext2": fp_s["ppl_wikitext2"], "ppl_c4": fp_s["ppl_c4"]}] + rows)
    lines = ["| rows | bits | WikiText-2 ppl real z → integer z | C4 ppl real z → integer z | Δ NLL int − real [95 %] | "
             "cost? | real z − FP Δ NLL [95 %] |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "none measurable" if r["inside"] else ("**costs**" if r["lo"] > 0 else "gains")
        lines.append(f"| {r['family']} | {r['bits']} | {r['ppl_wikitext2_real']:.2f} → {r['ppl_wikitext2_int']:.2f} | "
                     f"{r['ppl_c4_real']:.2f} → {r['ppl_c4_int']:.2f} | {r['d_nll']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}] | "
                     f"{verdict} | {r['d_nll_real_vs_fp']:+.4f} [{r['lo_fp']:+.4f}, {r['hi_fp']:+.4f}] |")
    costs = [r for r in rows if not r["inside"] and r["lo"] > 0]
    note = (f"ref-10m, asymmetric g{G}, FP ppl {fp_s['ppl_wikitext2']:.2f} (WikiText-2) / {fp_s['ppl_c4']:.2f} (C4) on the "
            f"first {a.limit} windows of each (256 tokens; the same windows for every row). Δ NLL (nats/token) over all "
            f"{2 * a.limit} windows with a paired bootstrap 95 % interval (2000 resamples). GPTQ: {a.n_calib} × 256 C4 "
            f"calibration tokens. Integer z costs something measurable in {len(costs)} of {len(rows)} pairs"
            + (": " + ", ".join(f"{r['family']} int{r['bits']}" for r in costs) if costs else "")
            + f". Run time {(time.perf_counter() - t0) / 60:.1f} min.\n")
    write_section("int_zero", header("Integer zero points: what they cost", note) + "\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
