"""Shared bench plumbing: models, the evaluation of one row, tables, BENCHMARKS.md sections."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# name -> (path under the data dir, eval ctx: the length the model was trained at)
MODELS = {"ref-10m": ("models/ref-10m", 256), "stories260K": ("data/stories260K/stories260K.bin", 512)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def command() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute() else sys.argv[0]] + sys.argv[1:])


def load(name: str, data_dir=None):
    from bitnest.models.hf import load_model
    from bitnest.paths import data_file
    rel, ctx = MODELS[name]
    return load_model(data_file(rel, data_dir)), ctx


def eval_row(model, tok, ctx, *, data_dir=None, limit=None, storage=torch.bfloat16, only=None, progress=False,
             keep_windows=False) -> dict:
    """PPL/NLL on WikiText-2 and C4 held-out, bits per quantized weight, model bytes; with keep_windows, each
    window's NLL under `_win_<text>` (in memory only: write_json drops them)."""
    from bitnest.eval.report import evaluate
    out = {}
    for data in ("wikitext2", "c4"):
        r = evaluate(model, tok, data, data_dir=data_dir, ctx=ctx, limit=limit, storage_dtype=storage,
                     progress=progress, only=only, keep_windows=keep_windows)
        out[f"ppl_{data}"], out[f"nll_{data}"], out[f"tokens_{data}"] = r["ppl"], r["nll"], r["tokens"]
        out["bits_per_weight"], out["model_bytes"] = r["bits_per_weight"], r["model_bytes"]
        if keep_windows:
            out[f"_win_{data}"] = r["window_nll"]
    return out


# ------------------------------------------------------------------ paired intervals (issue 14)
# A row's per-window NLLs live under `_win_<text>` while a bench runs (same windows for every row); only the
# interval [lo, hi] of its NLL difference to FP is kept (`ci95_<text>`), never the windows themselves.

def strip_windows(rows):
    """Copies of the rows (dicts) without their in-memory per-window NLLs (`_win_*`); anything else unchanged."""
    if not isinstance(rows, list):
        return rows
    return [{k: v for k, v in r.items() if not k.startswith("_win_")} if isinstance(r, dict) else r for r in rows]


def paired(a: dict, b: dict, text: str) -> tuple[float, float, float] | None:
    """(mean NLL a − b, lo, hi): paired bootstrap 95 % interval over the windows both rows kept (`_win_<text>`);
    None when either kept none (a failed row, rows read back from JSON)."""
    wa, wb = a.get(f"_win_{text}"), b.get(f"_win_{text}")
    if not wa or not wb:
        return None
    from bitnest.eval.perplexity import paired_interval
    return paired_interval(wa, wb)


def add_interval(row: dict, fp: dict | None, texts=("wikitext2", "c4")) -> dict:
    """row[ci95_<text>] = [lo, hi] of its ΔNLL vs `fp` (nats/token); [0, 0] on an FP row; None without windows."""
    for d in texts:
        if row.get("method") == "fp":
            row[f"ci95_{d}"] = [0.0, 0.0]
        else:
            p = None if fp is None else paired(row, fp, d)
            row[f"ci95_{d}"] = None if p is None else [p[1], p[2]]
    return row


def interval_cell(row: dict, fp: dict | None, text: str) -> str:
    """`+0.0123 [+0.0050, +0.0190]`: the row's NLL − FP's (nats/token) with its paired 95 % interval, " ≈ FP"
    appended when the interval contains 0; blank for rows without an interval (failed, or saved before them)."""
    ci = row.get(f"ci95_{text}")
    a, b = row.get(f"nll_{text}"), (fp or {}).get(f"nll_{text}")
    if not ci or a is None or b is None:
        return ""
    lo, hi = ci
    mark = " ≈ FP" if lo <= 0 <= hi and row.get("method") != "fp" else ""
    return f"{a - b:+.4f} [{lo:+.4f}, {hi:+.4f}]{mark}"


def pair_text(p: tuple[float, float, float] | None, a: str = "the first row") -> str:
    """`paired(x, y, text)` in words: `+0.0123 [+0.0050, +0.0190]: <a> worse outside the interval` (negative =
    `a`, the first row, has the lower NLL), or `inside the interval: not distinguishable`; a difference counts
    only outside the interval. 'no paired interval' when the windows are missing."""
    if p is None:
        return "no paired interval (rows without per-window NLLs, e.g. read back from JSON)"
    d, lo, hi = p
    word = (f"{a} better outside the interval" if hi < 0 else f"{a} worse outside the interval" if lo > 0
            else "inside the interval: not distinguishable")
    return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]: {word}"


def fmt_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table; cols = (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for k, _, f in cols:
            v = r.get(k)
            cells.append("" if v is None else (format(v, f) if f else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def write_section(name: str, text: str) -> None:
    """Replace (or append) the section between `<!-- name:start -->` and `<!-- name:end -->` in BENCHMARKS.md."""
    f = ROOT / "BENCHMARKS.md"
    doc = f.read_text() if f.exists() else "# bitnest benchmarks\n\nEvery table: the exact command, date and machine. Speed is always a ratio measured side by side in one run.\n"
    block = f"<!-- {name}:start -->\n{text.rstrip()}\n<!-- {name}:end -->"
    pat = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    doc = pat.sub(lambda _: block, doc) if pat.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    tmp = f.with_suffix(".md.tmp")
    tmp.write_text(doc)
    os.replace(tmp, f)


def write_json(name: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / name
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(strip_windows(rows), indent=1))  # per-window NLLs stay in memory
    os.replace(tmp, p)
    return p


def header(title: str, extra: str = "") -> str:
    return (f"## {title}\n\nCommand: `{command()}`  \nDate: {_dt.date.today().isoformat()}  \n"
            f"Machine: {machine()}\n{extra}\n")


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.seconds = time.perf_counter() - self.t
