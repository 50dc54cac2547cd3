"""Foundation benchmark: FP, bitnest RTN and sliced int8, and peer libraries' RTN at the same settings.

python bench/foundation.py [--models ref-10m,stories260K] [--limit N] [--no-peers] [--no-write]

Every row is evaluated by the same bitnest evaluator (non-overlapping windows at the model's training
context) on the full WikiText-2 raw test and C4 held-out rows 1800-1999 unless --limit is given.
Peers: HQQ with optimize=False is plain MinMax RTN (float zero, like bitnest) — the like-for-like check;
HQQ with its default half-quadratic optimizer, torchao IntxWeightOnly (asymmetric, integer zero point) and
optimum-quanto (its qint8/qint4/qint2 defaults) run side by side. Peer bits per weight count the tensors
the peer actually stores (torchao's CPU layout keeps one int8 per weight).
Every row keeps its per-window NLLs in memory (the same windows for FP and every row): ci95_<text> = [lo, hi]
is the paired bootstrap 95 % interval of its NLL minus its model's FP row's (nats/token, 2000 resamples; FP
rows [0, 0]); the table marks differences inside the interval "≈ FP". The windows are not written.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import (MODELS, RESULTS, Timer, add_interval, eval_row, fmt_table, header, interval_cell,  # noqa: E402
                    load, strip_windows, write_json, write_section)

BITS = (8, 6, 4, 3, 2)
SLICES = (6, 4, 3, 2)


def block_linears(model):
    from bitnest.models.blocks import select_linears
    return select_linears(model, "all")


def _inner_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly subclassed) tensor stores: recurse through __tensor_flatten__."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_inner_bytes(getattr(t, n)) for n in names)


def peer_bits(model, names, storage, quant_bytes: dict[str, int]) -> tuple[float, int]:
    """(bits per quantized weight, whole-model bytes) from the peer's stored tensors."""
    nw = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in names)
    qb = sum(quant_bytes.values())
    inside = {id(model.get_submodule(n).weight) for n in names}
    seen, other = set(), 0
    for p in model.parameters():
        if id(p) in inside or id(p) in seen:
            continue
        seen.add(id(p))
        other += p.numel() * torch.finfo(storage).bits // 8
    return qb * 8 / nw, qb + other


def hqq_quantize(model, names, bits, group, optimize):
    from hqq.core.quantize import Quantizer
    qbytes = {}
    for n in names:
        lin = model.get_submodule(n)
        W = lin.weight.data  # (out, in)
        g = group or W.shape[1]
        Wq, meta = Quantizer.quantize(W, nbits=bits, channel_wise=True, group_size=g, optimize=optimize,
                                      round_zero=False, axis=1, bitpack=True, compute_dtype=torch.float32, device="cpu")
        lin.weight.data = Quantizer.dequantize(Wq, meta).reshape(W.shape).to(W.dtype)
        # HQQ keeps scale and zero per group in the compute dtype; count them at 16 bits as it ships them
        qbytes[n] = Wq.numel() * Wq.element_size() + 2 * meta["scale"].numel() * 2
    return qbytes


def torchao_quantize(model, names, bits, group):
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType
    cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group) if group else PerAxis(0),
                               mapping_type=MappingType.ASYMMETRIC)
    wanted = set(names)
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn in wanted)
    return {n: _inner_bytes(model.get_submodule(n).weight) for n in names}


def quanto_quantize(model, names, bits):
    from optimum.quanto import freeze, qint2, qint4, qint8, quantize
    qt = {8: qint8, 4: qint4, 2: qint2}[bits]
    quantize(model, weights=qt, include=list(names))
    freeze(model)
    return {n: _inner_bytes(model.get_submodule(n).weight) for n in names}


PARTIAL = RESULTS / "foundation.partial.json"


def load_partial() -> dict:
    """Rows of an unfinished earlier run, by (model, library, method, bits, group, limit); they keep their ci95_*
    (computed then, against the same FP windows) but no per-window NLLs."""
    if not PARTIAL.exists():
        return {}
    rows = json.loads(PARTIAL.read_text())
    return {(r["model"], r["library"], r["method"], r["bits"], r["group_size"], r["limit"]): r for r in rows}


def save_partial(row: dict, limit) -> None:
    row = strip_windows([row])[0]  # the per-window NLLs stay in memory
    rows = list(load_partial().values()) + [{**row, "limit": limit}]
    PARTIAL.parent.mkdir(parents=True, exist_ok=True)
    tmp = PARTIAL.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, PARTIAL)


def rows_for(name: str, args) -> list[dict]:
    from bitnest.api import quantize
    from bitnest.nn.qlinear import QuantLinear

    done = {} if args.no_write else load_partial()  # --no-write leaves results/ alone: no partial file either
    loaded, ctx = load(name, args.data_dir)
    fp, tok, storage = loaded.model, loaded.tokenizer, loaded.storage_dtype
    names = block_linears(fp)
    in_dims = {fp.get_submodule(n).in_features for n in names}
    groups = [None] + [g for g in (128,) if all(d % g == 0 for d in in_dims)]
    rows = []
    fp_row = None  # this model's FP row, with its per-window NLLs (always evaluated, never taken from a partial file)

    def add(library, method, bits, group, model, seconds, bpw_bytes=None):
        nonlocal fp_row
        key = (name, library, method, bits, group if group else ("channel" if bits < 16 else None), args.limit)
        if key in done and method != "fp":  # finished by an earlier run that died: keep its row (and its ci95_*)
            rows.append(done[key])
            return
        r = eval_row(model, tok, ctx, data_dir=args.data_dir, limit=args.limit, storage=storage, keep_windows=True)
        if bpw_bytes is not None:
            r["bits_per_weight"], r["model_bytes"] = bpw_bytes
        row = {"model": name, "library": library, "method": method, "bits": bits,
               "group_size": group if group else ("channel" if bits < 16 else None), "ctx": ctx, "seconds": seconds, **r}
        fp_row = row if method == "fp" else fp_row
        add_interval(row, fp_row)
        rows.append(row)
        if not args.no_write:
            save_partial(row, args.limit)
        print(f"  {library:<14}{method:<12}{bits:>3} {str(row['group_size']):>8}  wiki {r['ppl_wikitext2']:>9.2f}  "
              f"c4 {r['ppl_c4']:>9.2f}  bpw {r['bits_per_weight']:.3f}  {r['model_bytes'] / 2**20:.2f} MiB"
              f"  ΔNLL c4 {interval_cell(row, fp_row, 'c4') or '-'}", flush=True)

    print(f"{name}: ctx {ctx}, {len(names)} linears, groups {groups}", flush=True)
    add("-", "fp", 16 if storage != torch.float32 else 32, None, fp, 0.0)
    for g in groups:
        for b in BITS:
            with Timer() as t:
                m = quantize(copy.deepcopy(fp), "rtn", bits=b, group_size=g, progress=False)
            add("bitnest", "rtn", b, g, m, t.seconds)
        with Timer() as t:
            m = quantize(copy.deepcopy(fp), "sliced", bits=8, group_size=g, progress=False)
        for r_ in SLICES:
            for q in m.modules():
                if isinstance(q, QuantLinear):
                    q.serve_bits = r_  # the same int8 codes served at r bits
            add("bitnest", "sliced_int8", r_, g, m, t.seconds)
    if args.no_peers:
        return rows
    # HQQ-RTN at every setting (the like-for-like check); the other peers at 8/4/2 (and HQQ's optimizer at
    # 4/3/2, where it matters) to keep the table under half an hour on 2 cores.
    for g in groups:
        for b in BITS:
            runs = [("hqq", "rtn", lambda m: hqq_quantize(m, names, b, g, False))]
            if b <= 4:
                runs.append(("hqq", "hqq_opt", lambda m: hqq_quantize(m, names, b, g, True)))
            if b in (8, 4, 2):
                runs.append(("torchao", "rtn_intx", lambda m: torchao_quantize(m, names, b, g)))
            for library, method, fn in runs:
                m = copy.deepcopy(fp)
                with Timer() as t:
                    qb = fn(m)
                add(library, method, b, g, m, t.seconds, peer_bits(m, names, storage, qb))
    for b in (8, 4, 2):
        m = copy.deepcopy(fp)
        with Timer() as t:
            qb = quanto_quantize(m, names, b)
        # quanto picks its own granularity (group 128 for int4/int2 when it divides, else per channel)
        gs = m.get_submodule(names[0]).weight.__tensor_flatten__()[1].get("group_size")
        g = int(gs) if gs not in (None, "None") else None  # quanto writes a missing group as the string 'None'
        add("optimum-quanto", "rtn", b, g, m, t.seconds, peer_bits(m, names, storage, qb))
    return rows


COLS = [("model", "model", ""), ("library", "library", ""), ("method", "method", ""), ("bits", "bits", ""),
        ("group_size", "group", ""), ("bits_per_weight", "bits/weight", ".3f"), ("model_bytes_mib", "MiB", ".2f"),
        ("ppl_wikitext2", "WikiText-2 PPL", ".2f"), ("d_wikitext2", "Δ NLL Wiki [95 %]", ""),
        ("ppl_c4", "C4 held-out PPL", ".2f"), ("d_c4", "Δ NLL C4 [95 %]", ""), ("seconds", "quant s", ".2f")]


def table(rows: list[dict]) -> str:
    """The markdown table: Δ NLL = row − its model's FP row (nats/token) with the paired 95 % interval."""
    fps = {r["model"]: r for r in rows if r["method"] == "fp"}
    shown = [{**r, **{f"d_{d}": interval_cell(r, fps.get(r["model"]), d) for d in ("wikitext2", "c4")}} for r in rows]
    return fmt_table(shown, COLS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--data-dir")
    ap.add_argument("--limit", type=int, help="windows per dataset (default: all)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results/ alone")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows, t0 = [], time.perf_counter()
    for name in args.models.split(","):
        rows += rows_for(name, args)
    for r in rows:
        r["model_bytes_mib"] = r["model_bytes"] / 2**20
    text = table(rows)
    minutes = (time.perf_counter() - t0) / 60
    print("\n" + text + f"\n\nrun time {minutes:.1f} min")
    if not args.no_write:
        write_json("foundation.json", rows)
        PARTIAL.unlink(missing_ok=True)
        note = ("RTN = MinMax round-to-nearest, asymmetric, all Linear layers of the decoder blocks; embeddings and "
                "lm_head unquantized. `sliced_int8` = bitnest RTN int8, served at r bits by MatQuant slicing of the "
                "same codes (no training). bits/weight counts every stored bit (codes, scales, zeros) per quantized "
                "weight; MiB is the whole model with unquantized tensors at the model's storage dtype. "
                f"Evaluation: {'first %d windows' % args.limit if args.limit else 'all windows'} of WikiText-2 raw "
                "test and C4 rows 1800-1999; stories260K is a TinyStories model, so both texts are out of domain "
                "for it, and its widths (64, 172) admit no group of 128. Δ NLL = row − FP (nats/token) with its "
                "paired bootstrap 95 % interval over those windows (the same for every row); “≈ FP” = the interval "
                f"contains 0. Run time {minutes:.1f} min.")
        write_section("foundation", header("Foundation: RTN and sliced int8 vs peers", note) + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
