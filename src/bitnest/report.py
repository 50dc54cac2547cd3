"""`bitnest report CKPT… --out DIR`: one HTML page (and its markdown twin) about one or more checkpoints.

What it shows, every number measured in this run on the same evaluation windows:
  - the quality table: the full-precision source model first, then each checkpoint (a Matryoshka checkpoint at
    every width it serves and at Mix'n'Match budgets), perplexity per dataset, bits per weight, model MiB, and
    zero-shot accuracy ± bootstrap s.e. when `tasks` are given;
  - perplexity vs bits per weight, with the Pareto front over every point (Mix'n'Match points included);
  - the per-layer precision map of each checkpoint as stored (and of each Mix'n'Match mix);
  - training curves (loss per step) when the checkpoint carries its `training_history.json`;
  - decode speed (tokens/s and × FP, greedy, batch 1) when `speed=True`.
Figures are PNGs written by matplotlib beside `report.html`; `report.json` holds every row.
"""
from __future__ import annotations

import html
import json
import math
import os
import time
from pathlib import Path

import torch

from .errors import BitnestError

WIDTHS = (8, 6, 4, 3, 2)
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rows_for(loaded, label: str, budgets) -> list[tuple[str, dict | None]]:
    """(row label, precision request) for a checkpoint: its widths and budgets when nested, else as stored."""
    from . import runtime

    qc = loaded.quantization_config or {}
    if not qc.get("nested") or not runtime.nested_layers(loaded.model):
        return [(label, None)]
    c = max(m.bits for m in runtime.nested_layers(loaded.model).values())
    rows = [(f"{label} @int{r}", {"bits": r}) for r in WIDTHS if r <= c]
    rows += [(f"{label} @mix≤{b:g}", {"budget": float(b)}) for b in budgets]
    return rows


def _layer_map(model) -> dict[str, int | float]:
    from .eval.bits import packed_modules

    out = {}
    for n, m in packed_modules(model).items():
        r = getattr(m, "serve_bits", None)
        out[n] = r if r is not None else round(m.served_bits() / (m.in_features * m.out_features), 3)
    return out


def _speed(model, tok, tokens: int = 32) -> float:
    from .generate import generate

    generate(model, tok, "The history of", max_new_tokens=4, stop_at_eos=False)  # warm-up
    return max(generate(model, tok, "The history of", max_new_tokens=tokens, stop_at_eos=False).decode_tok_s
               for _ in range(2))


def _history(path: Path) -> list[dict] | None:
    f = path / "training_history.json"
    if not f.is_file():
        return None
    try:
        h = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return h if isinstance(h, list) and h and all(isinstance(x, dict) and "loss" in x for x in h) else None


def build(ckpts: list[str], out: str | os.PathLike, *, data: tuple[str, ...] = ("wikitext2", "c4"), data_dir=None,
          ctx: int | None = None, limit: int | None = 16, budgets: tuple[float, ...] = (3.0, 5.0),
          tasks: str | None = None, task_limit: int | None = 200, speed: bool = False, progress: bool = True) -> Path:
    """Evaluate and write report.html / report.md / report.json / *.png into `out`; returns the HTML path."""
    from . import runtime
    from .eval.bits import bits_report
    from .eval.report import evaluate
    from .models.hf import load_model

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BitnestError(f"--out {out} exists and is not a directory")
    loaded = [load_model(c) for c in ckpts]
    srcs = {ld.quantization_config.get("source_model") for ld in loaded if ld.quantization_config}
    srcs.discard(None)
    fp_src = next(iter(srcs)) if len(srcs) == 1 else None
    t0 = time.perf_counter()
    models: list[tuple[str, object, str | None]] = []  # (label, Loaded, checkpoint path)
    if fp_src and Path(fp_src).exists():
        models.append(("FP", load_model(fp_src), None))
    models += [(Path(c).name, ld, c) for c, ld in zip(ckpts, loaded)]
    if ctx is None:  # 0 is an error (eval.perplexity.check_ctx), not the default
        ctx = min(256, getattr(loaded[0].model.config, "max_position_embeddings", 256))
    rows, maps, curves = [], {}, {}
    fp_speed = None
    for label, ld, path in models:
        if path is not None:
            maps[label] = _layer_map(ld.model)
            if (h := _history(Path(path))) is not None:
                curves[label] = h
        for row_label, req in _rows_for(ld, label, budgets) if path else [(label, None)]:
            if req is not None:
                runtime.set_precision(ld.model, req.get("bits"), budget=req.get("budget"))
                if "budget" in req:
                    maps[row_label] = _layer_map(ld.model)
            row = {"row": row_label, "checkpoint": path, "method": (ld.quantization_config or {}).get("method", "fp")}
            for d in data:
                r = evaluate(ld.model, ld.tokenizer, d, data_dir=data_dir, ctx=ctx, limit=limit,
                             storage_dtype=ld.storage_dtype, progress=progress)
                row[f"ppl_{d}"] = r["ppl"]
            b = bits_report(ld.model, ld.storage_dtype)
            row["bits_per_weight"] = b.bits_per_weight if path else float(torch.finfo(ld.storage_dtype).bits)
            row["model_mib"] = b.model_bytes / 2**20
            if tasks:
                from .eval.tasks import evaluate_tasks
                res = evaluate_tasks(ld.model, ld.tokenizer, tasks, data_dir=data_dir, limit=task_limit, ctx=ctx,
                                     progress=progress)
                row["tasks"] = {k: {m: v[m] for m in ("acc", "acc_stderr", "n") if m in v} for k, v in res.items()}
            if speed:
                row["tok_s"] = _speed(ld.model, ld.tokenizer)
                fp_speed = fp_speed or (row["tok_s"] if path is None else None)
            rows.append(row)
    if speed and fp_speed:
        for row in rows:
            row["speedup_fp"] = row["tok_s"] / fp_speed
    out.mkdir(parents=True, exist_ok=True)
    figs = _figures(rows, maps, curves, data, out)
    meta = {"checkpoints": ckpts, "fp": fp_src, "ctx": ctx, "limit": limit, "data": list(data),
            "seconds": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M")}
    (out / "report.json").write_text(json.dumps({"meta": meta, "rows": rows, "layer_maps": maps}, indent=1))
    md = _markdown(rows, figs, meta)
    (out / "report.md").write_text(md)
    page = out / "report.html"
    page.write_text(_html(rows, figs, meta))
    return page


# ------------------------------------------------------------------------------------------- figures


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with fewer (or equal) bits and lower (or equal) perplexity."""
    front, best = [], math.inf
    for b, p in sorted(points):
        if p < best:
            front.append((b, p))
            best = p
    return front


def _figures(rows, maps, curves, data, out: Path) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    d = data[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [(r["bits_per_weight"], r[f"ppl_{d}"]) for r in rows if r["checkpoint"]]
    for ck in dict.fromkeys(r["checkpoint"] for r in rows if r["checkpoint"]):
        rr = [r for r in rows if r["checkpoint"] == ck]
        fixed = [r for r in rr if "mix≤" not in r["row"]]
        mix = [r for r in rr if "mix≤" in r["row"]]
        name = Path(ck).name
        ax.plot([r["bits_per_weight"] for r in fixed], [r[f"ppl_{d}"] for r in fixed], "o-", label=name)
        if mix:
            ax.plot([r["bits_per_weight"] for r in mix], [r[f"ppl_{d}"] for r in mix], "s", label=f"{name} Mix'n'Match")
    front = _pareto(pts)
    if front:
        ax.plot(*zip(*front), "k--", lw=1, label="Pareto front")
    fp = next((r for r in rows if not r["checkpoint"]), None)
    if fp:
        ax.axhline(fp[f"ppl_{d}"], color="grey", lw=1, label=f"FP ({fp[f'ppl_{d}']:.1f})")
    ax.set_xlabel("bits per quantized weight")
    ax.set_ylabel(f"perplexity ({d})")
    ys = [r[f"ppl_{d}"] for r in rows]
    if max(ys) / min(ys) > 3:  # a log axis only when the range needs one
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Perplexity vs bits")
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_bits.png", dpi=110)
    plt.close(fig)
    figs["Perplexity vs bits per weight"] = "ppl_vs_bits.png"

    for i, (label, lm) in enumerate(maps.items()):
        layers = sorted({_layer_index(n) for n in lm if _layer_index(n) is not None})
        mods = [m for m in MODULE_ORDER if any(n.endswith(m) for n in lm)]
        if not layers or not mods:
            continue
        grid = torch.full((len(mods), len(layers)), float("nan"))
        for n, b in lm.items():
            li, mod = _layer_index(n), n.rsplit(".", 1)[-1]
            if li is not None and mod in mods:
                grid[mods.index(mod), layers.index(li)] = float(b)
        fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(layers) + 2), 0.4 * len(mods) + 1.5))
        im = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto", vmin=1, vmax=8)
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_yticks(range(len(mods)), mods)
        ax.set_xlabel("decoder layer")
        for (y, x), v in ((yx, grid[yx].item()) for yx in [(a, b) for a in range(len(mods)) for b in range(len(layers))]):
            if not math.isnan(v):
                ax.text(x, y, f"{v:g}", ha="center", va="center", fontsize=7, color="w" if v < 5 else "k")
        fig.colorbar(im, ax=ax, label="bits")
        ax.set_title(f"Precision per layer: {label}", fontsize=10)
        fig.tight_layout()
        name = f"layers_{i}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        figs[f"Precision per layer: {label}"] = name

    for i, (label, h) in enumerate(curves.items()):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([x.get("step", j) for j, x in enumerate(h)], [x["loss"] for x in h], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"Training: {label}", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"training_{i}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        figs[f"Training curve: {label}"] = name

    if all("tok_s" in r for r in rows) and rows:
        fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.2))
        ax.barh([r["row"] for r in rows][::-1], [r["tok_s"] for r in rows][::-1])
        ax.set_xlabel("decode tokens/s (batch 1, greedy)")
        ax.set_title("Speed")
        fig.tight_layout()
        fig.savefig(out / "speed.png", dpi=110)
        plt.close(fig)
        figs["Decode speed"] = "speed.png"
    return figs


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks") and b.isdigit():
            return int(b)
    return None


# ------------------------------------------------------------------------------------------- tables


def _columns(rows) -> list[tuple[str, str]]:
    cols = [("row", "model"), ("bits_per_weight", "bits/weight"), ("model_mib", "MiB")]
    cols += [(k, k.replace("ppl_", "ppl ")) for k in rows[0] if k.startswith("ppl_")]
    tasks = list(dict.fromkeys(t for r in rows for t in r.get("tasks", {})))
    cols += [(f"task:{t}", f"{t} acc") for t in tasks]
    if any("tok_s" in r for r in rows):
        cols += [("tok_s", "tok/s"), ("speedup_fp", "×FP")]
    return cols


def _cell(r, key) -> str:
    if key.startswith("task:"):
        t = r.get("tasks", {}).get(key[5:])
        return f"{t['acc']:.3f} ± {t['acc_stderr']:.3f}" if t else "—"
    v = r.get(key)
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}" if key != "bits_per_weight" else f"{v:.3f}"
    return str(v)


def _markdown(rows, figs, meta) -> str:
    cols = _columns(rows)
    lines = [f"# bitnest report", "", f"{meta['date']} · ctx {meta['ctx']} · first {meta['limit']} windows per dataset "
             f"· FP: {meta['fp'] or '(not found)'}", "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, k) for k, _ in cols) + " |" for r in rows]
    for title, f in figs.items():
        lines += ["", f"## {title}", "", f"![{title}]({f})"]
    return "\n".join(lines) + "\n"


def _html(rows, figs, meta) -> str:
    cols = _columns(rows)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for _, h in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(_cell(r, k))}</td>" for k, _ in cols) + "</tr>" for r in rows)
    fig_html = "".join(f'<figure><img src="{esc(f)}" alt="{esc(t)}"><figcaption>{esc(t)}</figcaption></figure>'
                       for t, f in figs.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bitnest report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}</style></head>
<body><h1>bitnest report</h1>
<p>{esc(meta['date'])} · ctx {meta['ctx']} · first {meta['limit']} windows per dataset · FP: {esc(str(meta['fp']))}</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{fig_html}
<script>
// how many figures the browser decoded (a headless check reads this attribute)
window.addEventListener("load", () => document.body.setAttribute("data-figures-loaded",
  String([...document.images].filter(i => i.complete && i.naturalWidth > 0).length)));
</script>
</body></html>
"""
