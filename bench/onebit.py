"""OneBit benchmark (issue 4): 1-bit layers by distillation against the FP model and the 2-bit / BitNet baselines.

For ref-10m (ctx 256) and stories260K (ctx 512), one table each:
  fp                          the full-precision model
  w2_rtn                      2-bit RTN, per channel, no groups
  onebit × {svd, nmf, sign} × {hidden-state loss on, off}     the paper's layer (post-LayerNorm on)
  onebit nmf, post-LN off     ablation: the layer without its output LayerNorm
  bitnet                      Sign(W − mean W) · mean|W − mean W|, the same distillation (hidden loss on)
Perplexity on WikiText-2 and the held-out C4 rows (stories260K also on text sampled from the FP model,
its own TinyStories domain), bits per weight, model bytes, training tokens and time. Every trained run
distills on the same teacher-generated sequences (generated once per model, LLM-QAT style) for the same
number of steps.

Writes bench/results/onebit.json (rows) and bench/results/onebit_curves.png (training loss per step).

    python bench/onebit.py                      # the default budget (≈ 45 min on 2 CPU cores)
    python bench/onebit.py --steps 3 --limit 2  # a smoke run
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

RESULTS = Path(__file__).resolve().parent / "results"

# name, method, config overrides
VARIANTS = [
    ("onebit-svd", "onebit", {"init": "svd", "hidden_loss": True}),
    ("onebit-nmf", "onebit", {"init": "nmf", "hidden_loss": True}),
    ("onebit-sign", "onebit", {"init": "sign", "hidden_loss": True}),
    ("onebit-svd-nohidden", "onebit", {"init": "svd", "hidden_loss": False}),
    ("onebit-nmf-nohidden", "onebit", {"init": "nmf", "hidden_loss": False}),
    ("onebit-sign-nohidden", "onebit", {"init": "sign", "hidden_loss": False}),
    ("onebit-nmf-noln", "onebit", {"init": "nmf", "hidden_loss": True, "post_ln": False}),
    ("bitnet", "bitnet", {"hidden_loss": True}),
]


def model_specs(root: Path) -> dict:
    return {
        "ref-10m": {"path": root / "models" / "ref-10m", "ctx": 256, "evals": ["wikitext2", "c4"]},
        "stories260K": {"path": root / "data" / "stories260K" / "stories260K.bin", "ctx": 512,
                        "evals": ["wikitext2", "c4", "sampled"]},
    }


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
                     batch_size=args.eval_batch, storage_dtype=storage_dtype, progress=False)
        out[f"ppl_{data}"] = r["ppl"]
        out[f"eval_tokens_{data}"] = r["tokens"]
        out["limited"] = out.get("limited", False) or r["limited"]
        out["bits_per_weight"], out["model_bytes"] = r["bits_per_weight"], r["model_bytes"]
    return out


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def print_table(rows: list[dict], model: str) -> None:
    cols = ["run", "bits_per_weight", "ppl_wikitext2", "ppl_c4", "ppl_sampled", "final_loss", "train_tokens",
            "train_seconds", "model_bytes"]
    sel = [r for r in rows if r["model"] == model]
    cols = [c for c in cols if any(c in r for r in sel)]
    print(f"\n{model}")
    print("  ".join(f"{c:>14}" for c in cols))
    for r in sel:
        print("  ".join(f"{fmt(r.get(c, '')):>14}" for c in cols))


def plot_curves(curves: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for m, _ in curves})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for (m, run), hist in curves.items():
            if m == model:
                ax.plot([h["step"] for h in hist], [h["kd"] for h in hist], label=run, lw=1)
        ax.set_title(f"{model}: KD loss (KL to the FP teacher, nats/token)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["ref-10m", "stories260K"])
    p.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS],
                   help="trained runs to include (default: all)")
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
    p.add_argument("--out", default=str(RESULTS / "onebit.json"))
    p.add_argument("--save-dir", default=None, help="also save every trained model here as a bitnest checkpoint")
    args = p.parse_args(argv)
    args.limit = args.limit or None
    torch.set_num_threads(args.threads)
    unknown = sorted(set(args.variants) - {v[0] for v in VARIANTS})
    if unknown:
        p.error(f"unknown variants {unknown}")

    root = data_dir(args.data_dir)
    specs = model_specs(root)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    t_all = time.perf_counter()
    total_runs, done = len(args.models) * len(args.variants), 0

    def emit(row):
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1))
        print(f"  {row['model']:<12} {row['run']:<22} " + "  ".join(
            f"{k}={fmt(row[k])}" for k in ("bits_per_weight", "ppl_wikitext2", "ppl_c4", "ppl_sampled", "train_seconds")
            if k in row), flush=True)

    for name in args.models:
        spec = specs[name]
        seq_len = args.seq_len or spec["ctx"]
        base = load_model(spec["path"])
        tok, storage = base.tokenizer, base.storage_dtype
        sampled = sampled_text(base.model, tok, spec["ctx"], 32, seed=args.seed + 1000) if "sampled" in spec["evals"] else None

        t0 = time.perf_counter()
        train_ids = self_generate(base.model, args.samples, seq_len, batch_size=min(64, args.samples),
                                  seed=args.seed, progress=True)
        gen_seconds = time.perf_counter() - t0
        print(f"{name}: generated {args.samples} × {seq_len} training tokens in {gen_seconds:.1f} s", flush=True)

        common = {"model": name, "ctx": spec["ctx"]}
        t0 = time.perf_counter()
        emit({**common, "run": "fp", "method": "fp", "init": "none", "hidden_loss": False, "post_ln": None,
              "train_tokens": 0, "train_seconds": 0.0, **run_evals(base.model, tok, spec, storage, args, sampled),
              "eval_seconds": time.perf_counter() - t0})

        m = load_model(spec["path"]).model
        t0 = time.perf_counter()
        quantize(m, "rtn", bits=2, group_size=None, progress=False)
        q_s = time.perf_counter() - t0
        emit({**common, "run": "w2_rtn", "method": "w2_rtn", "init": "none", "hidden_loss": False, "post_ln": None,
              "train_tokens": 0, "train_seconds": 0.0, "quantize_seconds": q_s,
              **run_evals(m, tok, spec, storage, args, sampled)})
        del m

        for run, method, over in VARIANTS:
            if run not in args.variants:
                continue
            m = load_model(spec["path"]).model
            cfg = {"steps": args.steps, "lr": args.lr, "batch": args.batch, "seq_len": seq_len, "seed": args.seed, **over}
            t0 = time.perf_counter()
            quantize(m, method, calib=train_ids, progress=True, **cfg)
            q_s = time.perf_counter() - t0
            tr = m.bitnest_train
            curves[(name, run)] = tr.history
            if args.save_dir:
                save_quantized(m, tok, Path(args.save_dir) / f"{name}-{run}",
                               quantization_config(method, m.bitnest_method[1], str(spec["path"])),
                               storage_dtype=storage, overwrite=True)
            emit({**common, "run": run, "method": method, "init": over.get("init", "none"),
                  "hidden_loss": over["hidden_loss"], "post_ln": over.get("post_ln", method == "onebit"),
                  "steps": tr.steps, "lr": args.lr, "batch": args.batch, "seq_len": seq_len,
                  "train_tokens": tr.tokens, "train_seconds": tr.seconds, "quantize_seconds": q_s,
                  "steps_per_second": tr.steps / tr.seconds if tr.seconds else None,
                  "first_loss": tr.history[0]["loss"], "final_loss": tr.final_loss,
                  "final_kd": tr.history[-1]["kd"], "datagen_seconds": gen_seconds,
                  **run_evals(m, tok, spec, storage, args, sampled)})
            del m
            done += 1
            left = total_runs - done
            if left:
                per_run = (time.perf_counter() - t_all) / done
                print(f"  {done}/{total_runs} trained runs; ≈ {per_run * left / 60:.0f} min left at this pace", flush=True)
        print_table(rows, name)

    if curves:
        plot_curves(curves, out.with_name("onebit_curves.png"))
    print(f"\nwrote {out} ({len(rows)} rows) in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
