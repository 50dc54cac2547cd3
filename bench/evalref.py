"""Evaluation reference: ref-10m on the *whole* WikiText-2 test and C4 held-out texts (every window at ctx 256),
FP and what int8 costs — RTN int8 per channel, and the same int8 codes served at 4 and 2 bits by slicing.

Every row reports NLL / PPL over all tokens, its NLL difference to FP with a paired bootstrap 95 % interval over
the same windows (`bitnest.eval.perplexity.paired_interval`); with --kl also the KL of its next-token distribution to
FP's and how often its top-1 token is FP's. Writes the BENCHMARKS.md section "evaluation" and bench/results/evalref.json.

    python bench/evalref.py [--data-dir ../shared] [--limit N] [--no-write]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_interval, fmt_table, header, interval_cell, load, write_json, write_section  # noqa: E402

TEXTS = {"wikitext2": "WikiText-2", "c4": "C4 held-out"}


def row_for(label: str, model, fp_model, tok, ctx, storage, args) -> dict:
    from bitnest.eval.report import evaluate

    row = {"model": "ref-10m", "row": label, "method": "fp" if fp_model is None else label}
    for d in TEXTS:
        t = time.perf_counter()
        r = evaluate(model, tok, d, data_dir=args.data_dir, ctx=ctx, limit=args.limit, storage_dtype=storage,
                     teacher=fp_model if args.kl else None, progress=False, keep_windows=True)
        row.update({f"nll_{d}": r["nll"], f"ppl_{d}": r["ppl"], f"tokens_{d}": r["tokens"], f"_win_{d}": r["window_nll"],
                    f"kl_{d}": r.get("kl"), f"top1_{d}": r.get("top1"), f"seconds_{d}": time.perf_counter() - t,
                    "bits_per_weight": r["bits_per_weight"], "model_bytes": r["model_bytes"]})
    print(f"  {label:<28} wiki {row['ppl_wikitext2']:8.2f}  c4 {row['ppl_c4']:8.2f}", flush=True)
    return row


def main(argv=None) -> None:
    from bitnest.api import quantize
    from bitnest.runtime import set_precision

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir")
    ap.add_argument("--limit", type=int, help="windows per text (default: all of them)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--kl", action="store_true", help="also KL and top-1 agreement vs FP (runs FP beside every row: "
                    "≈ 10× the time on whole texts)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded, ctx = load("ref-10m", args.data_dir)
    fp, tok, storage = loaded.model, loaded.tokenizer, loaded.storage_dtype
    rows = [row_for("FP (bf16 weights, fp32 compute)", fp, None, tok, ctx, storage, args)]
    add_interval(rows[0], None)
    rtn = quantize(copy.deepcopy(fp), "rtn", bits=8, progress=False)
    rows.append(row_for("RTN int8 per channel", rtn, fp, tok, ctx, storage, args))
    del rtn
    nest = quantize(copy.deepcopy(fp), "sliced", bits=8, progress=False)
    for r in (4, 2):  # at 8 bits the sliced checkpoint is RTN int8's codes: the row above
        set_precision(nest, r)
        rows.append(row_for(f"RTN int8 sliced to {r} bits", nest, fp, tok, ctx, storage, args))
    for row in rows[1:]:
        add_interval(row, rows[0])

    table_rows = []
    for row in rows:
        for d, name in TEXTS.items():
            kl, top1 = row.get(f"kl_{d}"), row.get(f"top1_{d}")
            table_rows.append({
                "row": row["row"], "data": name, "tokens": f"{row[f'tokens_{d}']:,}", "nll": f"{row[f'nll_{d}']:.4f}",
                "ppl": f"{row[f'ppl_{d}']:.2f}", "dnll": interval_cell(row, rows[0], d) if row is not rows[0] else "",
                "kl": "" if kl is None else f"{kl:.1e}", "top1": "" if top1 is None else f"{top1:.4f}",
                "bpw": f"{row['bits_per_weight']:.3f}", "mib": f"{row['model_bytes'] / 2**20:.2f}",
                "sec": f"{row[f'seconds_{d}']:.1f}"})
    cols = [("row", "model", ""), ("data", "data", ""), ("tokens", "tokens", ""), ("nll", "NLL", ""),
            ("ppl", "PPL", ""), ("dnll", "Δ NLL vs FP [95 %]", ""), ("kl", "KL vs FP", ""),
            ("top1", "top-1 vs FP", ""), ("bpw", "bits/weight", ""), ("mib", "model MiB", ""),
            ("sec", "eval s", "")]
    scope = f"the first {args.limit} windows of each text" if args.limit else "every window of each text"
    text = header("Evaluation reference: ref-10m, whole texts, FP and int8", (
        f"ref-10m at ctx {ctx}, {scope} (non-overlapping windows; the same windows for every row). Δ NLL (nats/token) "
        "vs FP with a paired bootstrap 95 % interval over the windows (2000 resamples); “≈ FP” = the interval "
        "contains 0. " + ("KL: mean KL(FP ‖ row) of the next-token distributions; top-1: the share of positions whose "
        "most likely token is FP's; eval time includes FP's forward beside each quantized row. " if args.kl else
        "KL and top-1 vs FP: run with --kl (≈ 10× the time). ") + "Bits per weight over the quantized Linears "
        "(embeddings stay bf16). The sliced rows serve the RTN int8 codes at r bits (MatQuant slicing, no training).\n"))
    text += "\n" + fmt_table(table_rows, cols) + "\n"
    text += ("\nWikiText-2 is the GPTQ string (`\"\\n\\n\".join` of the HF rows, which keep their trailing newline); "
             "with the Llama-2 tokenizer this text is exactly the published 341,469 tokens. ref-10m's model card quotes "
             "≈ 401, which matches a join of the rows *without* their trailing newline (400.75); bitnest keeps the "
             "GPTQ convention. C4 held-out matches the card (≈ 159.0).\n")
    print(text)
    if not args.no_write:
        write_section("evaluation", text)
        write_json("evalref.json", rows)


if __name__ == "__main__":
    main()
