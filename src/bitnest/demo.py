"""`bitnest demo`: the default model at several precisions, side by side with full precision.

Each row also decodes 64 greedy tokens at batch 1 (HF generate with the KV cache, on the packed kernels) and
shows tokens/s beside the quality: speed next to what it cost. RTN rows quantize in memory. The Matryoshka rows quantize once to int8, save one checkpoint, and load that
same checkpoint back at r = 8, 6, 4, 3, 2 — one file, every precision. "Sliced int8" is that checkpoint
without training; "MatQuant" trains the int8 codes so that their int4 and int2 slices work too (QAT on C4
training text, a short budget: --matquant-steps), saves one checkpoint and loads it at every r (int6 and int3
are interpolated: never trained). "OneBit" distills 1-bit layers for --onebit-steps on the same text, or loads
a saved OneBit checkpoint (--onebit-ckpt, e.g. one that `bench/onebit.py --save-dir runs/onebit` wrote).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

from .api import quantization_config, quantize
from .calib.data import CalibOptions, calibration_tokens
from .eval.report import evaluate
from .formats.checkpoint import load_quantized, save_quantized
from .models.hf import load_model
from .paths import default_model

RTN_BITS = (8, 4, 3, 2)
SLICE_BITS = (8, 6, 4, 3, 2)
MATQUANT_BITS = (8, 4, 3, 2)


DECODE_TOKENS = 64


def decode_speed(model, tok) -> float:
    """Greedy decode tokens/s at batch 1 (the best of two runs of DECODE_TOKENS tokens after a warm-up)."""
    from .generate import generate
    generate(model, tok, "The history of", max_new_tokens=8, stop_at_eos=False)
    return max(generate(model, tok, "The history of", max_new_tokens=DECODE_TOKENS, stop_at_eos=False).decode_tok_s
               for _ in range(2))


def _row(label, model, tok, fp, args, storage):
    ev = lambda data, teacher: evaluate(model, tok, data, data_dir=args.data_dir, ctx=args.ctx, limit=args.limit,
                                        teacher=teacher, storage_dtype=storage, progress=not args.no_progress)
    c4 = ev("c4", fp)  # KL / top-1 against the FP model on the in-domain text
    wiki = ev("wikitext2", None)
    return {"label": label, "bits_per_weight": c4["bits_per_weight"], "model_bytes": c4["model_bytes"],
            "ppl_c4": c4["ppl"], "ppl_wikitext2": wiki["ppl"], "kl": c4.get("kl"), "top1": c4.get("top1"),
            "c4_tokens": c4["tokens"], "wiki_tokens": wiki["tokens"], "tok_s": decode_speed(model, tok)}


def _print(rows):
    fp = rows[0]
    print(f"\n{'model':<28}{'bits/w':>7}{'MiB':>7}{'C4 ppl':>9}{'Δ%':>7}{'Wiki ppl':>10}{'Δ%':>7}{'KL':>8}{'top-1':>7}"
          f"{'tok/s':>8}{'×FP':>6}")
    for r in rows:
        d4 = 100 * (r["ppl_c4"] / fp["ppl_c4"] - 1)
        dw = 100 * (r["ppl_wikitext2"] / fp["ppl_wikitext2"] - 1)
        kl = "" if r["kl"] is None else f"{r['kl']:.4f}" if r["kl"] >= 1e-3 else f"{r['kl']:.1e}"  # int8's KL is ~1e-5
        t1 = "" if r["top1"] is None else f"{r['top1']:.3f}"
        print(f"{r['label']:<28}{r['bits_per_weight']:>7.2f}{r['model_bytes'] / 2**20:>7.2f}{r['ppl_c4']:>9.2f}"
              f"{d4:>+7.1f}{r['ppl_wikitext2']:>10.2f}{dw:>+7.1f}{kl:>8}{t1:>7}{r['tok_s']:>8.0f}{r['tok_s'] / fp['tok_s']:>6.2f}")


def _nested_rows(rows, method, label, bits, src, fp, tok, storage, args, options) -> Path:
    """Quantize once to int8 codes, save one checkpoint, load it back once and switch it to each r in memory
    (model.set_precision: the same logits as loading the checkpoint at r); returns the checkpoint."""
    nested = quantize(copy.deepcopy(fp), method, bits=8, progress=not args.no_progress, **options)
    ck = Path(args.out) / f"{method}-int8"
    save_quantized(nested, tok, ck, quantization_config(method, nested.bitnest_method[1], src),
                   storage_dtype=storage, overwrite=True)
    del nested
    m = load_model(ck).model
    for r in bits:
        m.set_precision(r)
        rows.append(_row(f"{label} → int{r}", m, tok, fp, args, storage))
    return ck


def run_demo(args) -> int:
    t0 = time.time()
    src = args.model or str(default_model(args.data_dir))
    loaded = load_model(src)
    fp, tok, storage = loaded.model, loaded.tokenizer, loaded.storage_dtype
    print(f"bitnest demo: {src} ({sum(p.numel() for p in fp.parameters()):,} params), ctx {args.ctx}; "
          f"first {args.limit} windows of C4 held-out (rows 1800-1999) and of WikiText-2 test "
          f"(bitnest eval evaluates whole texts)")
    rows = [_row(f"FP ({str(storage).replace('torch.', '')})", fp, tok, None, args, storage)]
    for b in RTN_BITS:
        m = quantize(copy.deepcopy(fp), "rtn", bits=b, progress=False)
        rows.append(_row(f"RTN int{b} per-channel", m, tok, fp, args, storage))
    ck = _nested_rows(rows, "sliced", "Sliced int8", SLICE_BITS, src, fp, tok, storage, args, {})
    steps = max(args.matquant_steps, args.onebit_steps if not args.onebit_ckpt else 0)
    # all layers, as the rows above; 4 sequences of ctx tokens per step from the C4 training rows
    ids = calibration_tokens(fp, CalibOptions("c4", 4 * steps, args.ctx), tok, args.data_dir) if steps else None
    cks = [ck]
    if args.matquant_steps:
        cks += [_nested_rows(rows, "matquant", f"MatQuant ({args.matquant_steps} steps)", MATQUANT_BITS, src, fp, tok,
                     storage, args, dict(targets="all", steps=args.matquant_steps, batch=4, lr=3e-4,
                                                 calib=ids))]
    if args.onebit_ckpt:
        rows.append(_row(f"OneBit ({Path(args.onebit_ckpt).name})", load_quantized(args.onebit_ckpt).model, tok, fp,
                         args, storage))
    elif args.onebit_steps:
        # the paper's layer (post-LayerNorm, NMF SVID), distilled from the FP model on the same C4 text
        m = quantize(copy.deepcopy(fp), "onebit", steps=args.onebit_steps, batch=4, lr=1e-3, seq_len=args.ctx, post_ln=True,
                     calib=ids[: 4 * args.onebit_steps], progress=not args.no_progress)
        rows.append(_row(f"OneBit ({args.onebit_steps} steps)", m, tok, fp, args, storage))
        del m
    _print(rows)
    print(f"\nMatryoshka checkpoints (int8 codes, servable at any r in 1..8): {', '.join(map(str, cks))}")
    print(f"  try: bitnest eval --model {ck} --bits 3 --data c4 --ctx {args.ctx}")
    print(f"done in {time.time() - t0:.0f} s")
    return 0
