"""How lpfit's default p was chosen: the ℓp exponent scored on text that no quality table uses.

    python bench/lpfit_select.py                       # ≈ 9 min on 2 cores; BENCHMARKS.md + results JSON
    python bench/lpfit_select.py --p 0.7,0.95 --models stories260K --limit 8 --no-write   # smoke run

Selection texts (never the test texts of bench/datafree.py): WikiText-2 *validation* (the word-level file
`data/wikitext2_tokens/valid.txt`, `<unk>` tokens included) and C4 rows 1600–1799 of the 2k sample (ref-10m trained
on rows 0–1799, so for ref-10m these are training documents; the tables score rows 1800–1999). Per model and setting
(every Linear of the decoder blocks, asymmetric grids): FP, HQQ's optimizer (`hqq_opt`, its defaults, p = 0.7) and
lpfit at each --p with every other option at its default; ΔNLL vs FP (nats/token) on the first --limit windows at
the model's training context, and lpfit's paired bootstrap 95 % interval against hqq_opt.
Writes bench/results/lpfit_select.json and the `lpfit_select` section of BENCHMARKS.md.
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
from common import header, load, write_json, write_section  # noqa: E402

SETTINGS = {"ref-10m": ((3, None), (2, None), (3, 64), (2, 64)), "stories260K": ((3, None), (2, None))}
LIMITS = {"ref-10m": 128, "stories260K": 64}
C4_SELECT = range(1600, 1800)
TEXTS = ("wikitext2_valid", "c4_1600")


def selection_ids(tok, data_dir) -> dict:
    from bitnest.eval.data import C4_SAMPLE, _read_jsonl_texts, read_utf8, tokenize_eval_text
    from bitnest.paths import data_file
    wiki = read_utf8(data_file("data/wikitext2_tokens/valid.txt", data_dir), "WikiText-2 validation text", newline=None)
    c4 = "\n\n".join(_read_jsonl_texts(data_file(C4_SAMPLE, data_dir), C4_SELECT))
    return {"wikitext2_valid": tokenize_eval_text(tok, wiki), "c4_1600": tokenize_eval_text(tok, c4)}


def model_rows(name: str, ps, limit: int, data_dir, log=print) -> list[dict]:
    from bitnest.api import quantize
    from bitnest.eval.perplexity import paired_interval, score
    from bitnest.models.blocks import select_linears
    from foundation import hqq_quantize

    loaded, ctx = load(name, data_dir)
    fp, tok = loaded.model, loaded.tokenizer
    names = select_linears(fp, "all")
    ids = selection_ids(tok, data_dir)

    def ev(m):
        return {t: score(m, ids[t], ctx, limit=limit, progress=False)[0] for t in TEXTS}

    base = ev(fp)
    rows = []
    for b, g in SETTINGS[name]:
        m = copy.deepcopy(fp)
        hqq_quantize(m, names, b, g, True)
        hq = ev(m)
        common = {"model": name, "bits": b, "group_size": g or "channel", "limit": limit, "ctx": ctx}
        rows.append({**common, "method": "hqq_opt", "p": 0.7,
                     **{f"d_nll_{t}": hq[t].nll - base[t].nll for t in TEXTS}})
        for p in ps:
            t0 = time.time()
            r = ev(quantize(copy.deepcopy(fp), "lpfit", bits=b, group_size=g, p=p, progress=False))
            row = {**common, "method": "lpfit", "p": p, "seconds_quantize_and_eval": time.time() - t0}
            for t in TEXTS:
                row[f"d_nll_{t}"] = r[t].nll - base[t].nll
                row[f"vs_hqq_opt_{t}"] = list(paired_interval(r[t], hq[t]))
            rows.append(row)
            log(f"  {name} int{b} {g or 'channel'} p={p}: " + "  ".join(
                f"{t} {row[f'd_nll_{t}']:+.4f} (vs hqq_opt {row[f'vs_hqq_opt_{t}'][0]:+.4f})" for t in TEXTS))
    return rows


def table(rows, ps) -> tuple[str, list[str]]:
    head = "| model | bits | group | text | hqq_opt | " + " | ".join(f"p = {p}" for p in ps) + " |"
    out = [head, "|" + "---|" * (5 + len(ps))]
    wins: dict[float, int] = {p: 0 for p in ps}
    cells = 0
    keys = sorted({(r["model"], r["bits"], str(r["group_size"])) for r in rows}, key=lambda k: (k[0], k[2], -k[1]))
    for model, b, g in keys:
        rs = [r for r in rows if (r["model"], r["bits"], str(r["group_size"])) == (model, b, g)]
        hq = next(r for r in rs if r["method"] == "hqq_opt")
        lp = {r["p"]: r for r in rs if r["method"] == "lpfit"}
        for t in TEXTS:
            cells += 1
            ref = lp.get(0.7)
            for p in ps:
                if ref is not None and p != 0.7 and lp[p][f"d_nll_{t}"] < ref[f"d_nll_{t}"]:
                    wins[p] += 1
            best = min(ps, key=lambda p: lp[p][f"d_nll_{t}"])
            cells_txt = []
            for p in ps:
                m, lo, hi = lp[p][f"vs_hqq_opt_{t}"]
                c = f"{lp[p][f'd_nll_{t}']:+.4f} ({m:+.4f} [{lo:+.4f}, {hi:+.4f}])"
                cells_txt.append(f"**{c}**" if p == best else c)
            out.append(f"| {model} | {b} | {g} | {t} | {hq[f'd_nll_{t}']:+.4f} | " + " | ".join(cells_txt) + " |")
    lines = [f"p = {p}: lower ΔNLL than p = 0.7 in {wins[p]} of {cells} cells" for p in ps if p != 0.7 and 0.7 in ps]
    return "\n".join(out), lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="stories260K,ref-10m")
    ap.add_argument("--p", default="0.5,0.7,0.85,0.9,0.95,1.0", help="the ℓp exponents tried")
    ap.add_argument("--limit", type=int, default=None,
                    help="windows per text (default: 128 for ref-10m, 64 for stories260K; 0: every window)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ps = sorted({float(x) for x in a.p.split(",")})
    models = a.models.split(",")
    bad = [n for n in models if n not in SETTINGS]
    if bad:
        print(f"error: unknown model {bad[0]!r}; choose from {', '.join(SETTINGS)}", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = []
    limits = {n: LIMITS[n] if a.limit is None else (a.limit or None) for n in models}
    for name in models:
        rows += model_rows(name, ps, limits[name], a.data_dir)
    text, lines = table(rows, ps)
    print(text + "\n" + "\n".join(lines))
    if a.no_write:
        return 0
    write_json("lpfit_select.json", rows)
    note = ("Selection of lpfit's default ℓp exponent on text no quality table uses: WikiText-2 validation (the "
            "word-level file, `<unk>` included) and C4 rows 1600–1799 (ref-10m's training documents; the tables "
            "score rows 1800–1999). Every Linear of the decoder blocks, asymmetric grids; first "
            + ", ".join(f"{limits[n] or 'all'} windows for {n}" for n in models)
            + " at each model's training context. Cells: ΔNLL vs FP (nats/token) and, in brackets, lpfit − hqq_opt "
            "with its paired bootstrap 95 % interval; bold = the lowest ΔNLL among the p columns. lpfit's other options at "
            f"their defaults. Run time {(time.time() - t0) / 60:.1f} min.\n")
    write_section("lpfit_select", header("Data-free grids: choosing lpfit's p on validation text", note) + "\n"
                  + text + "\n\n" + "\n".join(f"- {x}" for x in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
