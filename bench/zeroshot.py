"""Zero-shot accuracy of quantized models next to full precision, lm-eval conventions (bitnest.eval.tasks).

    python bench/zeroshot.py [--limit 500] [--models ref-10m,stories260K] [--quick]

Rows per model: FP; RTN int4/int3/int2 (asymmetric; g64 on ref-10m, per channel on stories260K); GPTQ the same
(128 × ctx C4 calibration tokens); the sliced-int8 RTN checkpoint at 8/4/2 (MatQuant's untrained baseline); MatQuant QAT (8, 4, 2 trained
together, FFN, `--mq-steps` steps) at 8/4/2; OneBit (`--onebit-steps` distillation steps). Tasks: piqa, arc_easy,
arc_challenge, boolq, winogrande, lambada, openbookqa, copa (first `--limit` items each, the same for every row),
acc ± bootstrap s.e. (acc_norm where lm-eval reports it). ref-10m's training text includes BoolQ passages (marked †).
These are tiny models (10M and 260K parameters): most tasks sit near chance at full precision, so the table says
what quantization costs where there is signal (PIQA, LAMBADA perplexity) and that the scorer works.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, header, load, write_json, write_section  # noqa: E402

TASK_COLS = ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "lambada", "openbookqa", "copa")


def rows_for(name: str, fp, tok, ctx: int, a) -> list[tuple[str, object]]:
    """(label, model) pairs; quantized copies are built here."""
    from bitnest import runtime
    from bitnest.api import quantize

    out = [("FP", fp)]
    g = 64 if name == "ref-10m" else None  # stories260K's MLP width (172) takes no useful group size
    gl = f"g{g}" if g else "per-channel"
    for method in ("rtn", "gptq"):
        for b in (4, 3, 2):
            m = copy.deepcopy(fp)
            kw = dict(bits=b, group_size=g)
            if method == "gptq":
                kw.update(n_calib=a.n_calib, calib_len=ctx)
            quantize(m, method, progress=False, **kw)
            out.append((f"{method.upper()} int{b} {gl}", m))
    s8 = copy.deepcopy(fp)
    quantize(s8, "sliced", bits=8, progress=False)
    for r in (8, 4, 2):
        m = copy.deepcopy(s8)
        runtime.set_precision(m, r)
        out.append((f"sliced RTN int8 → int{r}", m))
    mq = copy.deepcopy(fp)
    quantize(mq, "matquant", precisions=(8, 4, 2), steps=a.mq_steps, progress=False)
    for r in (8, 4, 2):
        m = copy.deepcopy(mq)
        runtime.set_precision(m, r)
        out.append((f"MatQuant QAT ({a.mq_steps} steps) int{r}", m))
    ob = copy.deepcopy(fp)
    # 256 teacher-generated sequences, seen several times (generating steps × batch of them dominates otherwise)
    quantize(ob, "onebit", steps=a.onebit_steps, samples=min(256, a.onebit_steps * 8), post_ln=True,
             progress=False)  # the paper's layer, as in the published table
    out.append((f"OneBit ({a.onebit_steps} steps)", ob))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ref-10m,stories260K")
    ap.add_argument("--limit", type=int, default=300, help="items per task (default 300)")
    ap.add_argument("--mq-steps", type=int, default=48)
    ap.add_argument("--onebit-steps", type=int, default=150)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--data-dir")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 items, 4 training steps (not for the tables)")
    a = ap.parse_args()
    if a.quick:
        a.limit, a.mq_steps, a.onebit_steps, a.n_calib = 20, 4, 4, 4
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from bitnest.eval.tasks import evaluate_tasks

    t0 = time.perf_counter()
    results, sections = [], []
    for name in a.models.split(","):
        loaded, ctx = load(name, a.data_dir)
        fp, tok = loaded.model, loaded.tokenizer
        rows = []
        print(f"{name}: building the quantized rows ...", flush=True)
        for label, m in rows_for(name, fp, tok, ctx, a):
            t = time.perf_counter()
            res = evaluate_tasks(m, tok, TASK_COLS, data_dir=a.data_dir, limit=a.limit, ctx=ctx, progress=False)
            row = {"model": name, "row": label, "ctx": ctx, "limit": a.limit, "seconds": time.perf_counter() - t, "tasks": res}
            rows.append(row)
            results.append(row)
            print(f"{name:12s} {label:34s} " + "  ".join(f"{k} {v['acc']:.3f}" for k, v in res.items()), flush=True)
        sections.append(_table(name, rows))
    write_json("zeroshot.json" if not a.quick else "zeroshot_quick.json", results)
    if not a.quick:
        note = (f"Items per task: first {a.limit} (COPA has 100). acc ± bootstrap standard error (1000 resamples); "
                "acc_norm (÷ characters) in parentheses where lm-eval reports it; LAMBADA: acc and perplexity of the "
                "target word. Chance: PIQA/BoolQ/WinoGrande/COPA 0.50, ARC/OpenBookQA 0.25. † in the model's training "
                "text. Scores equal lm-eval 0.4.13's HFLM on the same requests (tests/test_tasks.py). "
                f"Run time {(time.perf_counter() - t0) / 60:.1f} min.\n")
        write_section("zeroshot", header("Zero-shot tasks (lm-eval conventions)", note) + "\n" + "\n\n".join(sections))
    return 0


def _table(name: str, rows: list[dict]) -> str:
    trained = {k for r in rows for k, v in r["tasks"].items() if name in v.get("trained_on", [])}
    head = "| row | " + " | ".join(k + (" †" if k in trained else "") for k in TASK_COLS) + " | LAMBADA ppl |"
    lines = [f"### {name} (ctx {rows[0]['ctx']})", "", head, "|" + "---|" * (len(TASK_COLS) + 2)]
    for r in rows:
        cells = []
        for k in TASK_COLS:
            v = r["tasks"][k]
            c = f"{v['acc']:.3f} ± {v['acc_stderr']:.3f}"
            if "acc_norm" in v:
                c += f" ({v['acc_norm']:.3f})"
            cells.append(c)
        lam = r["tasks"]["lambada"]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {lam['ppl']:.4g} ± {lam['ppl_stderr']:.2g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
