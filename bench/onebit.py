"""OneBit benchmark (issue 4): 1-bit layers by distillation against the FP model and the 2-bit / BitNet baselines.

For ref-10m (ctx 256) and stories260K (ctx 512), one table each:
  fp                          the full-precision model
  w2_rtn                      2-bit RTN, per channel, no groups
  onebit × {svd, nmf, sign} × {hidden-state loss on, off}     the paper's layer (post-LayerNorm on)
  onebit nmf, post-LN off     ablation: the layer without its output LayerNorm
  onebit-default              bitnest's default layer (NMF SVID, no post-LayerNorm: the best measured here)
  bitnet                      Sign(W − mean W) · mean|W − mean W|, the same distillation (hidden loss on)
  onebit svd / bitnet, -emb   the same two with the 16-bit embeddings trained too (the reference's full
                              fine-tune); opt-in: --resume --variants onebit-svd-emb bitnet-emb (≈ 10 min more)
Perplexity on WikiText-2 and the held-out C4 rows (stories260K also on text sampled from the FP model,
its own TinyStories domain), bits per weight, model bytes, training tokens and time. Every trained run
distills on the same teacher-generated sequences (generated once per model, LLM-QAT style) for the same
number of steps.

Writes bench/results/onebit.json (rows) and bench/results/onebit_curves.png (training loss per step).

    python bench/onebit.py                      # the default budget (≈ 45 min on 2 CPU cores)
    python bench/onebit.py --resume             # after an interruption: only the rows not yet in onebit.json
    python bench/onebit.py --steps 3 --limit 2 --samples 8 --no-write   # a smoke run
    python bench/onebit.py --variants onebit-default bitnet --name onebit_default   # the default vs the baselines

Each row keeps its per-window NLLs (windows_<text>); tables give Δ NLL vs FP with a paired bootstrap 95 % interval,
and the default layer's paired differences to BitNet-style and W2 RTN when those rows are present.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from bitnest.api import quantization_config, quantize
from bitnest.eval.report import evaluate
from bitnest.formats.checkpoint import save_quantized
from bitnest.models.hf import load_model
from bitnest.paths import data_dir
from bitnest.train.data import self_generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, RESULTS, fmt_table, header, write_json, write_section  # noqa: E402

# name, method, config overrides
VARIANTS = [
    ("onebit-svd", "onebit", {"init": "svd", "hidden_loss": True, "post_ln": True}),
    ("onebit-nmf", "onebit", {"init": "nmf", "hidden_loss": True, "post_ln": True}),
    ("onebit-sign", "onebit", {"init": "sign", "hidden_loss": True, "post_ln": True}),
    ("onebit-svd-nohidden", "onebit", {"init": "svd", "hidden_loss": False, "post_ln": True}),
    ("onebit-nmf-nohidden", "onebit", {"init": "nmf", "hidden_loss": False, "post_ln": True}),
    ("onebit-sign-nohidden", "onebit", {"init": "sign", "hidden_loss": False, "post_ln": True}),
    ("onebit-nmf-noln", "onebit", {"init": "nmf", "hidden_loss": True, "post_ln": False}),
    ("bitnet", "bitnet", {"hidden_loss": True}),
    # bitnest's default OneBit layer (no post-LayerNorm since issue 14; the same config as onebit-nmf-noln)
    ("onebit-default", "onebit", {"hidden_loss": True}),
    # the reference code fine-tunes the whole student: the 16-bit (tied) embeddings train too
    ("onebit-svd-emb", "onebit", {"init": "svd", "hidden_loss": True, "post_ln": True, "train_embeddings": True}),
    ("bitnet-emb", "bitnet", {"hidden_loss": True, "train_embeddings": True}),
]


def model_specs(root: Path) -> dict:
    """bench/common's models; stories260K is also scored on its own domain (text sampled from the FP model)."""
    return {name: {"path": root / rel, "ctx": ctx,
                   "evals": ["wikitext2", "c4"] + (["sampled"] if name == "stories260K" else [])}
            for name, (rel, ctx) in MODELS.items()}


def sampled_text(model, tokenizer, ctx: int, n: int, seed: int) -> Path:
    """Text sampled from the FP model from BOS (temperature 1), written to a file for `evaluate`.
    Its seed differs from the training data's, so the student never trained on it."""
    bos = getattr(model.config, "bos_token_id", None)
    ids = self_generate(model, n, ctx, batch_size=n, greedy=(0, 0), seed=seed, start_token=bos, progress=False)
    text = "\n\n".join(tokenizer.decode(row.tolist()) for row in ids)
    f = Path(tempfile.mkdtemp(prefix="bitnest-bench-")) / "sampled.txt"
    f.write_text(text, encoding="utf-8")
    return f


def run_evals(model, tok, spec, storage_dtype, args, sampled: Path | None) -> dict:
    out = {}
    for data in spec["evals"]:
        src = str(sampled) if data == "sampled" else data
        r = evaluate(model, tok, src, data_dir=args.data_dir, ctx=spec["ctx"], limit=args.limit,
                     batch_size=args.eval_batch, storage_dtype=storage_dtype, progress=False, keep_windows=True)
        out[f"ppl_{data}"], out[f"windows_{data}"] = r["ppl"], r["window_nll"]
        out[f"eval_tokens_{data}"] = r["tokens"]
        out["limited"] = out.get("limited", False) or r["limited"]
        out["bits_per_weight"], out["model_bytes"] = r["bits_per_weight"], r["model_bytes"]
    return out


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


COLS = [("run", "run", ""), ("init", "init", ""), ("hidden_loss", "hidden loss", ""), ("post_ln", "post-LN", ""),
        ("train_embeddings", "emb. trained", ""),
        ("bits_per_weight", "bits/weight", ".4f"), ("model_mib", "MiB", ".2f"), ("ppl_wikitext2", "WikiText-2 PPL", ".2f"),
        ("ppl_c4", "C4 PPL", ".2f"), ("ppl_sampled", "sampled PPL", ".2f"), ("final_kd", "final KD", ".3f"),
        ("train_tokens", "train tokens", ","), ("train_seconds", "train s", ".0f")]


def _interval(a: dict, b: dict, data: str) -> str | None:
    """a − b mean window NLL on `data` with its paired bootstrap 95 % interval, or None without windows."""
    from bitnest.eval.perplexity import paired_interval
    wa, wb = a.get(f"windows_{data}"), b.get(f"windows_{data}")
    if not wa or not wb or len(wa) != len(wb):
        return None
    d, lo, hi = paired_interval(wa, wb)
    return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" + (" ≈" if lo <= 0 <= hi else "")


def table(rows: list[dict], model: str) -> str:
    trained = ("onebit", "bitnet")  # rows written before the train_embeddings variants existed did not train them
    sel = [{"train_embeddings": False if r["method"] in trained else None, **r, "model_mib": r["model_bytes"] / 2**20}
           for r in rows if r["model"] == model]
    fp = next((r for r in sel if r["run"] == "fp"), None)
    cols = list(COLS)
    if fp is not None and fp.get("windows_c4"):
        for r in sel:
            for d in ("c4", "wikitext2"):
                r[f"d_{d}"] = _interval(r, fp, d) if r is not fp else None
        i = next(k for k, c in enumerate(cols) if c[0] == "ppl_sampled")
        cols[i:i] = [("d_c4", "C4 Δ NLL vs FP [95 %]", ""), ("d_wikitext2", "Wiki Δ NLL vs FP [95 %]", "")]
    cols = [c for c in cols if any(r.get(c[0]) is not None for r in sel)]
    out = fmt_table(sel, cols)
    by = {r["run"]: r for r in sel}
    if "onebit-default" in by:
        pairs = [(o, d, _interval(by["onebit-default"], by[o], d)) for o in ("bitnet", "w2_rtn") if o in by
                 for d in ("c4", "wikitext2")]
        out += "\n\nDefault OneBit layer minus baseline, Δ NLL (nats/token) [paired 95 %; ≈ = inside]: " + "; ".join(
            f"vs {o} on {d}: {t}" for o, d, t in pairs if t) + "\n"
    return out


def plot_curves(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {(r["model"], r["run"]): r["curve"] for r in rows if r.get("curve")}
    models = sorted({m for m, _ in curves})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for (m, run), hist in curves.items():
            if m == model:
                ax.plot([h[0] for h in hist], [h[1] for h in hist], label=run, lw=1)
        ax.set_title(f"{model}: KD loss (KL to the FP teacher, nats/token)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def report(rows: list[dict], args, budget: str) -> None:
    """Print the tables; unless --no-write, also the training-curve plot and the NAME section of BENCHMARKS.md."""
    ctx = {r["model"]: r["ctx"] for r in rows}
    text = "\n".join(f"**{model}** (ctx {c})\n\n{table(rows, model)}\n" for model, c in ctx.items())
    print("\n" + text)
    if not args.no_write:
        png = RESULTS / f"{args.name}_curves.png"
        plot_curves(rows, png)
        extra = (budget + f" Rows: `bench/results/{args.name}.json`; training curves: `bench/results/{png.name}`.\n")
        title = "OneBit (issue 4)" if args.name == "onebit" else f"OneBit (issue 4): {args.name}"
        write_section(args.name, header(title, extra) + "\n" + text
                      + f"\n![OneBit training curves](bench/results/{png.name})\n")
        print(f"wrote the {args.name} section of BENCHMARKS.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["ref-10m", "stories260K"])
    p.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS if not v[0].endswith("-emb")],
                   help="trained runs to include (default: all but the -emb ones, which keep the default run under "
                        "45 min; add them with --resume --variants onebit-svd-emb bitnet-emb)")
    p.add_argument("--steps", type=int, default=160, help="optimizer steps per trained run (all runs equal)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: the eval ctx)")
    p.add_argument("--samples", type=int, default=256, help="teacher-generated training sequences per model")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, default=64, help="evaluation windows per text (0 = the whole text)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--resume", action="store_true", help="keep the rows already in bench/results/onebit.json and "
                   "run only the missing ones (a run that died loses at most the model in training)")
    p.add_argument("--no-write", action="store_true", help="print only: no JSON, plot or BENCHMARKS.md section")
    p.add_argument("--from-json", action="store_true", help="rebuild the tables, plot and section from onebit.json")
    p.add_argument("--name", default="onebit", help="results name: bench/results/NAME.json, NAME_curves.png and "
                   "the NAME section of BENCHMARKS.md (e.g. onebit_long for a longer-budget run)")
    p.add_argument("--save-dir", default=None, help="also save every trained model here as a bitnest checkpoint")
    args = p.parse_args(argv)
    args.limit = args.limit or None
    torch.set_num_threads(args.threads)
    unknown = sorted(set(args.variants) - {v[0] for v in VARIANTS})
    if unknown:
        p.error(f"unknown variants {unknown}")
    budget = (f"Every trained run: {args.steps} steps × {args.batch} sequences of the eval ctx (ref-10m 256, "
              f"stories260K 512) from {args.samples} teacher-generated sequences per model, Adam β = (0.9, 0.98), "
              f"LR {args.lr}, 5 % warm-up + cosine; perplexity over "
              + (f"the first {args.limit} windows of each text." if args.limit else "every window of each text (the whole text)."))
    json_path = RESULTS / f"{args.name}.json"
    if args.from_json:
        report(json.loads(json_path.read_text()), args, budget)
        return 0

    root = data_dir(args.data_dir)
    specs = model_specs(root)
    rows = json.loads(json_path.read_text()) if args.resume and json_path.exists() else []
    have = {(r["model"], r["run"]) for r in rows}
    t_all = time.perf_counter()
    todo = [(m, v[0]) for m in args.models for v in VARIANTS if v[0] in args.variants and (m, v[0]) not in have]
    done = 0

    def emit(row):
        rows.append(row)
        if not args.no_write:
            write_json(json_path.name, rows)  # after every row: a dead run keeps what it finished
        print(f"  {row['model']:<12} {row['run']:<22} " + "  ".join(
            f"{k}={fmt(row[k])}" for k in ("bits_per_weight", "ppl_wikitext2", "ppl_c4", "ppl_sampled", "train_seconds")
            if k in row), flush=True)

    for name in args.models:
        spec = specs[name]
        seq_len = args.seq_len or spec["ctx"]
        base = load_model(spec["path"])
        tok, storage = base.tokenizer, base.storage_dtype
        sampled = sampled_text(base.model, tok, spec["ctx"], 32, seed=args.seed + 1000) if "sampled" in spec["evals"] else None
        common = {"model": name, "ctx": spec["ctx"]}
        if (name, "fp") not in have:
            t0 = time.perf_counter()
            emit({**common, "run": "fp", "method": "fp", "init": "none", "hidden_loss": False, "post_ln": None,
                  "train_tokens": 0, "train_seconds": 0.0, **run_evals(base.model, tok, spec, storage, args, sampled),
                  "eval_seconds": time.perf_counter() - t0})
        if (name, "w2_rtn") not in have:
            m = load_model(spec["path"]).model
            t0 = time.perf_counter()
            quantize(m, "rtn", bits=2, group_size=None, progress=False)
            q_s = time.perf_counter() - t0
            emit({**common, "run": "w2_rtn", "method": "w2_rtn", "init": "none", "hidden_loss": False, "post_ln": None,
                  "train_tokens": 0, "train_seconds": 0.0, "quantize_seconds": q_s,
                  **run_evals(m, tok, spec, storage, args, sampled)})
            del m
        if not any(m == name for m, _ in todo):
            continue
        t0 = time.perf_counter()
        train_ids = self_generate(base.model, args.samples, seq_len, batch_size=min(64, args.samples),
                                  seed=args.seed, progress=True)
        gen_seconds = time.perf_counter() - t0
        print(f"{name}: generated {args.samples} × {seq_len} training tokens in {gen_seconds:.1f} s", flush=True)

        for run, method, over in VARIANTS:
            if (name, run) not in todo:
                continue
            m = load_model(spec["path"]).model
            cfg = {"steps": args.steps, "lr": args.lr, "batch": args.batch, "seq_len": seq_len, "seed": args.seed, **over}
            t0 = time.perf_counter()
            quantize(m, method, calib=train_ids, progress=True, **cfg)
            q_s = time.perf_counter() - t0
            tr = m.bitnest_train
            if args.save_dir:
                save_quantized(m, tok, Path(args.save_dir) / f"{name}-{run}",
                               quantization_config(method, m.bitnest_method[1], str(spec["path"])),
                               storage_dtype=storage, overwrite=True)
            emit({**common, "run": run, "method": method, "init": getattr(m.bitnest_method[1], "init", "none"),
                  "hidden_loss": over["hidden_loss"], "post_ln": getattr(m.bitnest_method[1], "post_ln", None),
                  "train_embeddings": over.get("train_embeddings", False),
                  "steps": tr.steps, "lr": args.lr, "batch": args.batch, "seq_len": seq_len,
                  "train_tokens": tr.tokens, "train_seconds": tr.seconds, "quantize_seconds": q_s,
                  "steps_per_second": tr.steps / tr.seconds if tr.seconds else None,
                  "first_loss": tr.history[0]["loss"], "final_loss": tr.final_loss,
                  "final_kd": tr.history[-1]["kd"], "datagen_seconds": gen_seconds,
                  "curve": [(h["step"], h["kd"]) for h in tr.history],
                  **run_evals(m, tok, spec, storage, args, sampled)})
            del m
            done += 1
            if done < len(todo):
                per_run = (time.perf_counter() - t_all) / done
                print(f"  {done}/{len(todo)} trained runs; ≈ {per_run * (len(todo) - done) / 60:.0f} min left at this pace",
                      flush=True)

    report(rows, args, budget)
    print(f"\n{len(rows)} rows in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
