"""Matryoshka GPTQ (issue 14): one int8 parent, GPTQ-optimised for every slice at once, against GPTQ run for each
width alone, sliced RTN, and the trained MatQuant flavours (QAT, OmniQuant) — ref-10m, FFN + attention, per channel
and g64, one run, the same calibration sequences for every calibrated row.

    python bench/matgptq.py                  # the table (≈ 40 min on 2 quiet cores), BENCHMARKS.md + results JSON
    python bench/matgptq.py --quick          # smoke run: 2 windows, tiny budgets, writes nothing
    python bench/matgptq.py --skip-trained   # without the MatQuant QAT / OmniQuant rows

Rows (method): fp; rtn (each width alone, data-free); lpfit (bitnest's data-free ℓp grid fit) and hqq_opt (HQQ's
own optimizer, library hqq) at 4/3/2 bits; sliced (RTN int8 parent served at r); gptq (each width alone,
its own run); matgptq (one run, λ per width = --lambdas over --precisions, its slices; bitnest's default
compensation: one compensated copy of W per width); matgptq_shared (the same with the paper's shared compensation: one
W, the λ-mean error spread; --skip-shared drops it); matgptq_mix_greedy / matgptq_mix_evo (the per-channel MatGPTQ parent at --mix-budgets bits per weight:
the greedy per-block search on NLL vs the evolutionary per-layer search on KL to FP, 8 calibration sequences);
matquant_qat and
matquant_omniquant (R = {8, 4, 2}, the paper's λ = (0.1, 0.1, 1), served at 8, 4, 3 (interpolated), 2; --qat-steps
and --omni-steps). Perplexity on the first --limit windows (256 tokens) of C4 held-out and of WikiText-2 test, the same
windows for every row; ci95_* = the paired bootstrap 95 % interval of the row's mean window NLL minus FP's (nats/token);
rows whose interval contains 0 are marked "≈ FP". seconds = quantization time (calibration capture included).
calib: c4 (C4 training rows) or self (the same number of sequences sampled from the FP model, no corpus): GPTQ at
4 and 2 bits and MatGPTQ are run on both, so the dependence on calibration data is visible.
Checks printed and written: int8/int4 within 0.5 % ppl of GPTQ-alone, int2 gap to FP ≤ 1.3 × GPTQ-int2's, sliced
RTN's int2 gap ≥ 2 × MatGPTQ's, MatGPTQ time ≤ 2 × the mean GPTQ run.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, interval_cell, load, write_json, write_section  # noqa: E402

WIDTHS = (8, 4, 3, 2)
CALIBRATED = ("gptq", "matgptq", "matgptq_shared", "matquant_omniquant")
GROUPS = (None, 64)
# MatGPTQ's published settings: Llama-3.1-8B, widths {8, 4, 3}, weights (1, 1, 1), g128 symmetric (scripts/run_matgptq.sh)


def gname(g):
    return "channel" if g is None else g


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=40, help="windows per dataset (default 40)")
    ap.add_argument("--n-calib", type=int, default=128, help="calibration sequences of 256 tokens (default 128)")
    ap.add_argument("--precisions", default="8,4,3,2")
    ap.add_argument("--lambdas", default="", help="matgptq λ per precision (default: the method's)")
    ap.add_argument("--qat-steps", type=int, default=48)
    ap.add_argument("--omni-steps", type=int, default=24)
    ap.add_argument("--skip-trained", action="store_true")
    ap.add_argument("--no-clip", dest="clip", action="store_false", help="MatGPTQ without slice-aware clipping")
    ap.add_argument("--skip-self", action="store_true", help="without the rows calibrated on self-generated text")
    ap.add_argument("--skip-shared", action="store_true", help="without the rows of the paper's shared compensation")
    ap.add_argument("--groups", default="channel,64")
    ap.add_argument("--mix-budgets", default="3.0,3.5", help="Mix'n'Match budgets (bits per weight over all linears, "
                    "per channel only; '' for none)")
    ap.add_argument("--evo-generations", type=int, default=40)
    ap.add_argument("--name", default="matgptq", help="results name: bench/results/NAME.json and the NAME section")
    ap.add_argument("--data-dir")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.limit, a.n_calib, a.qat_steps, a.omni_steps, a.evo_generations = 2, 4, 2, 2, 2
    a.groups = [None if x == "channel" else int(x) for x in a.groups.split(",")]
    a.mix_budgets = [float(x) for x in a.mix_budgets.split(",") if x.strip()]
    return a


def _lpfit_p() -> float:
    from bitnest.methods.lpfit import LpFitConfig
    return LpFitConfig().p


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    from bitnest import runtime
    from bitnest.api import quantize
    from bitnest.calib.data import CalibOptions, calibration_tokens
    from bitnest.eval.perplexity import paired_interval
    from bitnest.eval.report import evaluate
    from bitnest.methods import REGISTRY
    from bitnest.mixnmatch import evo_mix, nested_modules, search_mix
    from bitnest.models.blocks import select_linears

    t_all = time.perf_counter()
    loaded, ctx = load("ref-10m", a.data_dir)
    fp, tok = loaded.model, loaded.tokenizer
    calib = calibration_tokens(fp, CalibOptions(n_calib=a.n_calib, calib_len=256))  # (n, 256), shared by every row
    # the same number of sequences sampled from the model itself (no data at all: what a user without a corpus gets)
    calib_self = None if a.skip_self else calibration_tokens(fp, CalibOptions(calib_data="generate", n_calib=a.n_calib,
                                                                              calib_len=256))

    def score(m):
        out = {}
        for d in ("c4", "wikitext2"):
            r = evaluate(m, tok, d, data_dir=a.data_dir, ctx=ctx, limit=a.limit, progress=False, keep_windows=True)
            out[d] = r
        return out

    fp_s = score(fp)
    rows = []

    def add(method, bits, g, s, seconds=None, note="", calib_src="c4", library="bitnest", bpw=None):
        row = {"model": "ref-10m", "library": library, "method": method, "bits": bits, "group_size": gname(g),
               "calib": calib_src if method in CALIBRATED else None,
               "bits_per_weight": bpw or (s["c4"]["bits_per_weight"] if method != "fp" else 16.0)}
        for d in ("c4", "wikitext2"):
            row[f"nll_{d}"], row[f"ppl_{d}"] = s[d]["nll"], s[d]["ppl"]
            if method == "fp":
                row[f"ci95_{d}"] = [0.0, 0.0]
            else:
                _, lo, hi = paired_interval(s[d]["window_nll"], fp_s[d]["window_nll"])
                row[f"ci95_{d}"] = [lo, hi]
        row["seconds"], row["note"] = seconds, note
        rows.append(row)
        print(f"{method:20s} {str(bits):>4s} {str(gname(g)):>7s} {calib_src if row['calib'] else '':>4s}  c4 {row['ppl_c4']:8.3f}  wiki {row['ppl_wikitext2']:8.3f}"
              + (f"  {seconds:6.1f}s" if seconds else ""), flush=True)

    add("fp", 16, None, fp_s)

    def timed(fn):
        t = time.perf_counter()
        m = fn()
        return m, time.perf_counter() - t

    def served(m, widths):
        for r in widths:
            runtime.set_precision(m, r)
            yield r, score(m)

    for g in a.groups:
        for b in WIDTHS:
            m, sec = timed(lambda: quantize(copy.deepcopy(fp), "rtn", bits=b, group_size=g, progress=False))
            add("rtn", b, g, score(m), sec)
        m, sec = timed(lambda: quantize(copy.deepcopy(fp), "sliced", bits=8, group_size=g, progress=False))
        for r, s in served(m, WIDTHS):
            add("sliced", r, g, s, sec)
        for b in WIDTHS:
            m, sec = timed(lambda: quantize(copy.deepcopy(fp), "gptq", bits=b, group_size=g, calib=calib, progress=False))
            add("gptq", b, g, score(m), sec)
        kw = {"lambdas": a.lambdas} if a.lambdas else {}
        m, sec = timed(lambda: quantize(copy.deepcopy(fp), "matgptq", precisions=a.precisions, group_size=g, calib=calib,
                                        clip=a.clip, progress=False, **kw))
        for r, s in served(m, WIDTHS):
            add("matgptq", r, g, s, sec)
        if not a.skip_shared:
            ms, sec_s = timed(lambda: quantize(copy.deepcopy(fp), "matgptq", precisions=a.precisions, group_size=g,
                                               calib=calib, clip=a.clip, compensation="shared", progress=False, **kw))
            for r, s in served(ms, WIDTHS):
                add("matgptq_shared", r, g, s, sec_s)
            del ms
        if g is None and a.mix_budgets:  # Mix'n'Match on the MatGPTQ parent: greedy (per block) vs evolutionary (per layer)
            mix_ids, names = calib[:8], list(nested_modules(m, ffn_only=False))
            for budget in a.mix_budgets:
                t0 = time.perf_counter()
                search_mix(m, mix_ids, budget, names=names, progress=False)
                add("matgptq_mix_greedy", budget, g, score(m), time.perf_counter() - t0)
                t0 = time.perf_counter()
                evo_mix(m, mix_ids, budget, teacher=fp, names=names, per_layer=True, generations=a.evo_generations,
                        progress=False)
                add("matgptq_mix_evo", budget, g, score(m), time.perf_counter() - t0)
        for b in (4, 3, 2):  # data-free: bitnest's ℓp grid fit next to HQQ's own optimizer
            if "lpfit" in REGISTRY:
                m, sec = timed(lambda: quantize(copy.deepcopy(fp), "lpfit", bits=b, group_size=g, progress=False))
                add("lpfit", b, g, score(m), sec)
            try:
                from foundation import hqq_quantize
                m = copy.deepcopy(fp)
                names = select_linears(m, "all")
                t0 = time.perf_counter()
                qbytes = hqq_quantize(m, names, b, g, True)
                sec = time.perf_counter() - t0
                nw = sum(m.get_submodule(n).weight.numel() for n in names)
                add("hqq_opt", b, g, score(m), sec, library="hqq", bpw=8 * sum(qbytes.values()) / nw)
            except ImportError as e:
                print(f"hqq_opt rows skipped: {e}", flush=True)
        if calib_self is not None:
            for b in (4, 2):
                m, sec = timed(lambda: quantize(copy.deepcopy(fp), "gptq", bits=b, group_size=g, calib=calib_self,
                                                progress=False))
                add("gptq", b, g, score(m), sec, calib_src="self")
            m, sec = timed(lambda: quantize(copy.deepcopy(fp), "matgptq", precisions=a.precisions, group_size=g,
                                            calib=calib_self, clip=a.clip, progress=False, **kw))
            for r, s in served(m, WIDTHS):
                add("matgptq", r, g, s, sec, calib_src="self")
        if a.skip_trained:
            continue
        m, sec = timed(lambda: quantize(copy.deepcopy(fp), "matquant", flavour="qat", targets="all", group_size=g,
                                        steps=a.qat_steps, batch=4, progress=False, tokenizer=tok))
        for r, s in served(m, WIDTHS):
            add("matquant_qat", r, g, s, sec, f"{a.qat_steps} steps × 4 × 256 tokens")
        m, sec = timed(lambda: quantize(copy.deepcopy(fp), "matquant", flavour="omniquant", targets="all", group_size=g,
                                        steps=a.omni_steps, calib=calib[:64], progress=False))
        for r, s in served(m, WIDTHS):
            add("matquant_omniquant", r, g, s, sec, f"{a.omni_steps} steps per block")

    checks = verdicts(rows, a.groups)
    for c in checks:
        print(("PASS " if c[1] else "FAIL ") + c[0], flush=True)
    if a.quick:
        return 0
    kept = kept_trained_rows(a) if a.skip_trained else []
    write_json(f"{a.name}.json", rows + kept)
    write_section(a.name, report(rows, checks, a, (time.perf_counter() - t_all) / 60, kept))
    return 0


def pick(rows, method, bits, g, calib="c4"):
    return next(r for r in rows if r["method"] == method and r["bits"] == bits and r["group_size"] == gname(g)
                and r.get("calib") in (calib, None))


def verdicts(rows, groups) -> list[tuple[str, bool]]:
    """The issue's done-when, per granularity and text."""
    fp = rows[0]
    out = []
    for g in groups:
        gl = "per channel" if g is None else f"g{g}"
        for d, dn in (("c4", "C4"), ("wikitext2", "WikiText-2")):
            k = f"ppl_{d}"
            for b in (8, 4):
                m, o = pick(rows, "matgptq", b, g)[k], pick(rows, "gptq", b, g)[k]
                out.append((f"{gl} {dn}: MatGPTQ int{b} {m:.3f} within 0.5 % of GPTQ-int{b} {o:.3f} ({100 * (m / o - 1):+.2f} %)",
                            m <= 1.005 * o))
            m2, o2, s2 = (pick(rows, x, 2, g)[k] - fp[k] for x in ("matgptq", "gptq", "sliced"))
            out.append((f"{gl} {dn}: MatGPTQ int2 gap to FP {m2:.2f} ≤ 1.3 × GPTQ-int2's {o2:.2f} (ratio {m2 / o2:.2f})",
                        m2 <= 1.3 * o2))
            out.append((f"{gl} {dn}: sliced RTN int2 gap {s2:.2f} far behind MatGPTQ's {m2:.2f} (≥ 2×: ratio {s2 / m2:.2f})",
                        s2 >= 2 * m2))
        tm = pick(rows, "matgptq", 8, g)["seconds"]
        tg = sum(pick(rows, "gptq", b, g)["seconds"] for b in WIDTHS) / len(WIDTHS)
        out.append((f"{gl}: MatGPTQ {tm:.1f} s ≤ 2 × one GPTQ run ({tg:.1f} s mean; ratio {tm / tg:.2f})", tm <= 2 * tg))
    return out


def kept_trained_rows(a) -> list[dict]:
    """With --skip-trained: the MatQuant QAT / OmniQuant rows of an earlier run (marked with its `run` name) carried
    over from the results file, so the table keeps the trained flavours beside the one-shot ones."""
    import json
    from common import RESULTS
    path = RESULTS / f"{a.name}.json"
    old = json.loads(path.read_text()) if path.exists() else []
    return [r for r in old if r.get("run") and r["method"].startswith("matquant_")]


def report(rows, checks, a, minutes, kept=()) -> str:
    fp = rows[0]
    lines = ["| method | calib | group | bits | bits/weight | C4 ppl | Δ NLL C4 [95 %] | WikiText-2 ppl | Δ NLL Wiki [95 %] | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    for r in rows:
        sec = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['method']} | {r.get('calib') or ''} | {r['group_size']} | {r['bits']} | {r['bits_per_weight']:.3f} | {r['ppl_c4']:.3f} | "
                     f"{interval_cell(r, fp, 'c4')} | {r['ppl_wikitext2']:.3f} | {interval_cell(r, fp, 'wikitext2')} | {sec} |")
    lam = a.lambdas or "the method's default"
    note = (f"ref-10m, FFN + attention (all 70 Linears of the 10 blocks), asymmetric MinMax int8 parent; {a.n_calib} × 256 C4 "
            f"training tokens shared by every calibrated row; MatGPTQ precisions {a.precisions}, λ {lam}, one compensated copy "
            f"of W per width (matgptq_shared: the paper's one W, λ-mean error), slice-aware clip "
            f"{'on (max side stretched up to 4/3, scored on H’s 128-input diagonal blocks, per group with groups)' if a.clip else 'off'} "
            f"(GPTQ rows: plain, no clip); lpfit at its defaults (p = {_lpfit_p()}); "
            + ("MatQuant QAT / OmniQuant not rerun (below). " if a.skip_trained else
               f"MatQuant QAT {a.qat_steps} steps × 4 × 256 tokens, OmniQuant {a.omni_steps} steps per block on 64 of "
               "the calibration sequences (R = 8, 4, 2; int3 interpolated). ")
            + f"Perplexity on the first {a.limit} windows × 256 tokens of each text; "
            f"Δ NLL = row − FP (nats/token) with its paired bootstrap 95 % interval over those windows; “≈ FP” = the interval "
            f"contains 0. Run time {minutes:.1f} min.\n\n"
            + "\n".join(("- PASS " if ok else "- **FAIL** ") + t for t, ok in checks) + "\n")
    title = "Matryoshka GPTQ" + ("" if a.name == "matgptq" else f" ({a.name})")
    tail = ""
    if kept:
        runs = sorted({r["run"] for r in kept})
        cell = lambda m, g: " / ".join(f"{r['ppl_c4']:.1f}" for b in WIDTHS for r in kept
                                       if r["method"] == m and r["group_size"] == gname(g) and r["bits"] == b)
        tail = ("\n\nThe MatQuant QAT / OmniQuant rows (R = 8, 4, 2) are not rerun here (--skip-trained): they come from "
                f"run {', '.join(runs)} (section \"Matryoshka GPTQ ({runs[0]})\", its own windows and training budgets) and are "
                f"kept in `bench/results/{a.name}.json` with their `run` name. C4 ppl at int8 / 4 / 3 / 2 there: "
                + "; ".join(f"{gl} QAT {cell('matquant_qat', g)}, OmniQuant {cell('matquant_omniquant', g)}"
                            for g, gl in ((None, "per channel"), (64, "g64"))) + ".")
    tail += ("\n\nMatGPTQ's published numbers could not be read here (the stored paper pages stop at the abstract); its "
             "repository's settings are widths {8, 4, 3}, λ = 1, 1, 1, g128 symmetric (Llama-3.1-8B).")
    return header(title, note) + "\n" + "\n".join(lines) + tail


if __name__ == "__main__":
    sys.exit(main())
