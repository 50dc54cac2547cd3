"""Shared bench plumbing: models, the evaluation of one row, tables, BENCHMARKS.md sections."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
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


def eval_row(model, tok, ctx, *, data_dir=None, limit=None, storage=torch.bfloat16, only=None, progress=False) -> dict:
    """PPL/NLL on WikiText-2 and C4 held-out, bits per quantized weight, model bytes."""
    from bitnest.eval.report import evaluate
    out = {}
    for data in ("wikitext2", "c4"):
        r = evaluate(model, tok, data, data_dir=data_dir, ctx=ctx, limit=limit, storage_dtype=storage,
                     progress=progress, only=only)
        out[f"ppl_{data}"], out[f"nll_{data}"], out[f"tokens_{data}"] = r["ppl"], r["nll"], r["tokens"]
        out["bits_per_weight"], out["model_bytes"] = r["bits_per_weight"], r["model_bytes"]
    return out


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
    tmp.write_text(json.dumps(rows, indent=1))
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
