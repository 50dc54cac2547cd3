"""Survey benchmark (issue 5): every bitnest method against the peer libraries, side by side, one table.

    python bench/survey.py                          # the default budget (≈ 40 min on 2 quiet CPU cores)
    python bench/survey.py --plan-only              # the rows and the time estimate, nothing run
    python bench/survey.py --models stories260K --limit 4 --no-write     # a smoke run (≤ 1 min)
    python bench/survey.py --quick --limit 2 --no-write                  # the quick smoke, both models (≈ 1 min)
    python bench/survey.py --transcription-check    # GPTQ vs a transcription of IST-DASLab/gptq, one real layer
    python bench/survey.py --plot-from bench/results/survey.json         # redraw the plot only

Rows, on ref-10m (per channel, group 128, group 64) and stories260K (per channel only: its widths 64 and
172 admit no group of 128 or 64), at 8, 4, 3 and 2 bits where the method has that width:
  bitnest   rtn; gptq; gptq+clip; kmeans; share (one table per layer); nf / log (4, 3 bits);
            mixed (sensitivity-driven per-layer widths, base gptq with clipping) at 2.5 and 3.0 bits/weight;
            matquant (if registered: int8 codes trained jointly for 8/4/2, served at each; small budget,
            marked); onebit at 1 bit (a saved checkpoint from runs/ when one exists, else a short run, marked);
            W8A8 dynamic, W8A8 static (minmax / percentile / mse observers), W4A8 dynamic (rtn and gptq
            weights) and integer-only W8A8.
  peers     HQQ (plain MinMax RTN and its half-quadratic optimizer), torchao IntxWeightOnly, optimum-quanto
            (its own granularity, no 3 bits) — the functions of bench/foundation.py; and the peer GPTQs,
            llm-compressor (GPTQModifier) and GPTQModel, on ref-10m (they load Hugging Face directories).

The peer GPTQs cannot share bitnest's venv (GPTQModel 7.7 needs torch ≥ 2.14.1 and 7.6 pins numpy 2.2.6;
llm-compressor 0.14 pins transformers ≤ 5.17), so they run in an overlay venv that reuses this venv's torch
2.13 and shadows only those packages; each peer run is a subprocess of this script (`--peer-worker`) that
receives the same calibration tokens as bitnest's GPTQ and returns the weights its quantized layers serve
(layer(I)ᵀ) and the bytes it stores. Build the overlay once (about 2 minutes, no compiling):

    python -m venv /tmp/peer-venv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/peer-venv/lib/python3.11/site-packages/zz_main_venv.pth
    /tmp/peer-venv/bin/python -m pip install "torch==2.13.0" gptqmodel==7.6.0 llmcompressor==0.14.0.1

and pass --peer-python /tmp/peer-venv/bin/python (the default when it exists; without it the peer-GPTQ rows
are skipped with a note). GPTQModel needs GPTQMODEL_CPU_WORKERS=2 on a 2-core machine (set here).

Evaluation: bench/common.eval_row — the same bitnest evaluator for every row, non-overlapping windows at
the model's training context, the first --limit windows of WikiText-2 raw test and of C4 held-out rows
1800–1999. Calibration: --n-calib windows of C4 training rows 0–1799 (never the held-out rows), tokenized
once per model and shared by every calibrated method, bitnest and peer alike. bits_per_weight counts every
stored bit (codes, scales, zeros, tables, g_idx) per quantized weight, floats at the model's storage dtype.
`seconds` is quantization time (calibration, search or training included; evaluation excluded).
Intervals (issue 14): every row keeps its per-window NLLs in memory (the same windows for every row of a
model); ci95_<text> = [lo, hi] is the paired bootstrap 95 % interval of its NLL minus its model's FP row's
(nats/token, 2000 resamples; FP rows [0, 0]), shown as Δ NLL [95 %] with "≈ FP" when it contains 0. In the
checks a row beats another only when the paired interval of their NLL difference excludes 0 on its side;
the windows are not written, so --from-json shows the saved ci95 but leaves the row-vs-row checks undecided.

Writes bench/results/survey.json (rows), bench/results/survey.png (C4 held-out PPL, log scale, against
bits per weight, every method) and the `survey` section of BENCHMARKS.md; with --no-write, only the JSON and
the plot, into a scratch directory (printed).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (MODELS, RESULTS, ROOT, Timer, add_interval, eval_row, fmt_table, header,  # noqa: E402
                    interval_cell, load, pair_text, paired, strip_windows, write_json, write_section)

BITS = (8, 4, 3, 2)
GROUPS = (None, 128, 64)  # None: per output channel
MIXED_BUDGETS = (2.5, 3.0)
MIXED_CANDIDATES = (2, 3, 4, 8)
ACT_OBSERVERS = ("minmax", "percentile", "mse")
PEER_GPTQ = ("llmcompressor", "gptqmodel")
DEFAULT_PEER_PYTHON = "/tmp/peer-venv/bin/python"
JSON_KEYS = ("model", "library", "method", "bits", "group_size", "bits_per_weight", "ppl_wikitext2", "ppl_c4", "seconds")

# Measured costs in CPU seconds of one thread (time.process_time of each step, on this machine, 2026-11): one
# evaluation window; a fixed part plus a part per calibration sequence (…_seq) or per training step (…_step);
# `fwd` is one model forward over one window (the mixed-precision sensitivities run 1 + layers × widths of
# them per sequence). Peer GPTQs run in their own process: wall seconds (imports and model load included).
# The estimate printed with the plan is Σ cost × THREADS_FACTOR (2 threads on 2 quiet cores).
COST = {
    "ref-10m": {"window": 0.094, "row": 0.15, "rtn": 0.25, "codebook": 0.4, "kmeans": 2.2, "share": 2.2, "hqq_opt": 1.1,
                "gptq": 1.2, "gptq_seq": 0.30, "gptq_clip": 3.5, "gptq_clip_seq": 0.35, "static": 0.5, "static_seq": 0.38,
                "fwd": 0.094, "matquant": 1.6, "matquant_step": 7.7, "onebit": 0.6, "onebit_step": 3.05,
                "peer": {"llmcompressor": (14.0, 0.35), "gptqmodel": (25.0, 0.35)}},
    "stories260K": {"window": 0.025, "row": 0.05, "rtn": 0.03, "codebook": 0.04, "kmeans": 0.12, "share": 0.35, "hqq_opt": 0.08,
                    "gptq": 0.1, "gptq_seq": 0.106, "gptq_clip": 0.15, "gptq_clip_seq": 0.106, "static": 0.2, "static_seq": 0.12,
                    "fwd": 0.025, "matquant": 0.6, "matquant_step": 2.45, "onebit": 0.2, "onebit_step": 1.05, "peer": {}},
}
THREADS_FACTOR = {1: 1.0, 2: 0.7}


# ----------------------------------------------------------------------------------------------- the plan
@dataclass
class Made:
    """What a row maker returns: the quantized model, quantization seconds, the peer's (bits per weight,
    model bytes) when bitnest's accounting cannot see its storage, a note, the granularity the peer chose."""
    model: torch.nn.Module
    seconds: float
    bb: tuple | None = None
    note: str | None = None
    group: int | str | None = None


@dataclass
class Spec:
    """One run of the plan: `make(fp)` -> Made; `rows` > 1 when one run is served at several widths."""
    library: str
    method: str
    bits: float | int
    group: int | str | None
    make: Callable
    kind: str  # cost class for the time estimate
    note: str = ""
    rows: list = field(default_factory=lambda: [None])  # >1 entries: one run serves several rows (matquant)


def group_label(g):
    return "channel" if g is None else ("tensor" if g == -1 else g)


def model_groups(fp, names) -> list:
    ins = {fp.get_submodule(n).in_features for n in names}
    return [g for g in GROUPS if g is None or all(d % g == 0 for d in ins)]


class Survey:
    def __init__(self, name: str, args):
        self.name, self.args = name, args
        loaded, self.ctx = load(name, args.data_dir)
        self.fp, self.tok, self.storage = loaded.model, loaded.tokenizer, loaded.storage_dtype
        self.fp.eval()
        from foundation import block_linears
        self.names = block_linears(self.fp)
        self.groups = model_groups(self.fp, self.names)
        if args.quick:
            self.groups = [self.groups[1] if len(self.groups) > 1 else None]
        self.hf_dir = self._hf_dir()
        self._calib = None
        self._sens = {}
        self.fp_row = None  # this model's FP row with its per-window NLLs: every row's interval is against it

    # -- inputs shared by the rows
    def _hf_dir(self):
        from bitnest.paths import data_file
        p = data_file(MODELS[self.name][0], self.args.data_dir)
        return p if p.is_dir() else None

    def c4_windows(self, n: int) -> torch.LongTensor:
        """(n, ctx) windows of C4 training rows 0-1799 (bitnest's calibration reader, seed 0: the first k of
        n windows are the same for every n ≥ k), cached."""
        if self._calib is None or len(self._calib) < n:
            from bitnest.calib.data import CalibOptions, calibration_tokens
            opts = CalibOptions(calib_data="c4", n_calib=n, calib_len=self.ctx, seed=0)
            self._calib = calibration_tokens(self.fp, opts, tokenizer=self.tok, data_dir=self.args.data_dir)
        return self._calib[:n]

    @property
    def calib(self) -> torch.LongTensor:
        """The --n-calib calibration windows shared by every calibrated row, bitnest's and the peers'."""
        return self.c4_windows(self.args.n_calib)

    # -- row makers
    def bitnest(self, method, **kw):
        """A bitnest method through the public API. Every row gets the shared calibration tokens; the methods
        that need no data (rtn, nf, log, kmeans, share, dynamic W8A8 on RTN weights) ignore them."""
        from bitnest.api import quantize

        def make(fp):
            m = copy.deepcopy(fp)
            calib = self.calib
            with Timer() as t:
                quantize(m, method, progress=False, calib=calib, **kw)
            return Made(m, t.seconds)
        return make

    def peer(self, fn, group_of=None):
        from foundation import peer_bits

        def make(fp):
            m = copy.deepcopy(fp)
            with Timer() as t:
                qb = fn(m)
            return Made(m, t.seconds, peer_bits(m, self.names, self.storage, qb),
                        group=group_of(m) if group_of else None)
        return make

    def mixed(self, budget, group):
        """Sensitivities (KL when one layer alone is RTN-quantized at each candidate width) on the first
        --mixed-calib sequences, computed once per grid and shared by both budgets; then GPTQ with the
        allocated per-layer widths on the full calibration set, with data-adaptive clipping (= method `mixed`
        with base gptq, plus -o clip=true)."""
        from bitnest.api import quantize
        from bitnest.calib.sensitivity import allocate_bits, as_overrides, layer_sensitivity
        from bitnest.grids.affine import AffineSpec
        from bitnest.nn.qlinear import QuantLinear

        def make(fp):
            if group not in self._sens:
                m = copy.deepcopy(fp)
                with Timer() as t:
                    ids = self.calib[:self.args.mixed_calib, :self.args.mixed_len]
                    sens, cost = layer_sensitivity(m, self.names, ids, self.args.mixed_candidates,
                                                   lambda lin, b: QuantLinear.from_linear(lin, AffineSpec(b, group)),
                                                   progress=False)
                self._sens[group] = (sens, cost, t.seconds)
            sens, cost, s_sec = self._sens[group]
            sizes = {n: fp.get_submodule(n).weight.numel() for n in self.names}
            m = copy.deepcopy(fp)
            with Timer() as t:
                bits, overrides = as_overrides(allocate_bits(sens, cost, sizes, budget))
                quantize(m, "gptq", progress=False, calib=self.calib, bits=bits, group_size=group, overrides=overrides,
                         clip=True)
            return Made(m, s_sec + t.seconds)
        return make

    def matquant(self, group):
        from bitnest.api import quantize
        steps, batch = self.args.matquant_steps, 8

        def make(fp):
            m = copy.deepcopy(fp)
            ids = self.c4_windows(steps * batch)  # one epoch of C4 training windows
            with Timer() as t:
                quantize(m, "matquant", progress=False, calib=ids, targets="all", group_size=group, flavour="qat",
                         steps=steps, batch=batch, n_calib=steps * batch, calib_len=self.ctx)
            return Made(m, t.seconds)
        return make

    def onebit(self):
        from bitnest.api import quantize
        steps, batch = self.args.onebit_steps, 8

        def make(fp):
            ckpt = find_onebit_checkpoint(self.args.onebit_ckpt, self.source_path())
            if ckpt is not None:
                from bitnest.models.hf import load_model
                m = load_model(ckpt).model
                cfg = json.loads((Path(ckpt) / "config.json").read_text())["quantization_config"]["config"]
                return Made(m, float("nan"), note=f"loaded {ckpt} ({cfg.get('steps')} steps)")
            m = copy.deepcopy(fp)
            ids = self.c4_windows(steps * batch)  # one epoch of C4 training windows
            with Timer() as t:
                quantize(m, "onebit", progress=False, calib=ids, steps=steps, batch=batch, seq_len=self.ctx,
                         post_ln=True)  # the paper's layer, as in the published table
            return Made(m, t.seconds, note=f"short run: {steps} steps × {batch} × {self.ctx} C4 tokens, no checkpoint in runs/")
        return make

    def peer_gptq(self, lib, bits, group):
        def make(fp):
            m = copy.deepcopy(fp)
            res = run_peer_gptq(self.args.peer_python, lib, self.hf_dir, bits, group, self.calib, self.args.threads)
            for n, W in res["weights"].items():
                m.get_submodule(n).weight.data.copy_(W)
            from foundation import peer_bits
            missing = set(self.names) - set(res["weights"])
            if missing:
                raise RuntimeError(f"{lib} left {sorted(missing)[0]} (and {len(missing) - 1} more) unquantized")
            return Made(m, res["seconds"], peer_bits(m, self.names, self.storage, res["qbytes"]), res["note"])
        return make

    def source_path(self):
        from bitnest.paths import data_file
        return data_file(MODELS[self.name][0], self.args.data_dir)

    # -- the plan
    def plan(self) -> list[Spec]:
        """Every row of the survey. --quick (the smoke test of the code paths) keeps one grouping, 4/3/2 bits
        for rtn, gptq and HQQ-RTN, one row of kmeans, nf, mixed, each activation mode, HQQ-opt, torchao, quanto
        and llm-compressor, and leaves out gptq+clip, share, log, MatQuant and OneBit."""
        from foundation import hqq_quantize, quanto_quantize, torchao_quantize
        a, S, names = self.args, [], self.names
        quick = a.quick
        bits = (4, 3, 2) if quick else BITS
        low = [b for b in bits if b <= 4]
        one = (lambda xs, pick: [x for x in xs if x == pick]) if quick else (lambda xs, pick: list(xs))
        g4 = 128 if 128 in self.groups else None  # the W4A8 row's grouping

        def add(lib, method, b, g, make, kind, **kw):
            S.append(Spec(lib, method, b, g, make, kind, **kw))

        add("-", "fp", 16 if self.storage != torch.float32 else 32, None, lambda fp: Made(fp, 0.0), "fp")
        for g in self.groups:
            for b in bits:
                add("bitnest", "rtn", b, g, self.bitnest("rtn", bits=b, group_size=g), "rtn")
            for b in bits:
                add("bitnest", "gptq", b, g, self.bitnest("gptq", bits=b, group_size=g), "gptq")
            for b in ([] if quick else low):
                add("bitnest", "gptq+clip", b, g, self.bitnest("gptq", bits=b, group_size=g, clip=True), "gptq_clip")
            for b in one(low, 3):
                add("bitnest", "kmeans", b, g, self.bitnest("kmeans", bits=b, group_size=g), "kmeans")
            for b in one((4, 3), 3):
                for cb in one(("nf", "log"), "nf"):
                    add("bitnest", cb, b, g, self.bitnest(cb, bits=b, group_size=g), "codebook")
        for b in ([] if quick else low):
            add("bitnest", "share", b, "tensor", self.bitnest("share", bits=b), "share")
        for g in [g4]:  # one grid: group 128 where the widths allow it (ref-10m), else per channel
            for budget in one(MIXED_BUDGETS, 2.5):
                add("bitnest", "mixed(gptq+clip)", budget, g, self.mixed(budget, g), "mixed",
                    note=f"sensitivity on {a.mixed_calib}×{min(a.mixed_len, self.ctx)} tokens, candidates {a.mixed_candidates}")
        if a.matquant_steps > 0 and matquant_available() and not quick:
            add("bitnest", "matquant", 8, None, self.matquant(None), "matquant", rows=[8, 4, 2],
                note=f"small budget: {a.matquant_steps} QAT steps × 8 × {self.ctx} tokens, R={{8,4,2}}, all layers")
        if not quick and (a.onebit_steps > 0 or find_onebit_checkpoint(a.onebit_ckpt, self.source_path()) is not None):
            add("bitnest", "onebit", 1, None, self.onebit(), "onebit")
        # activation quantization and integer-only
        add("bitnest", "w8a8_dynamic", 8, None, self.bitnest("actquant", bits=8, act_mode="dynamic"), "rtn")
        for obs in one(ACT_OBSERVERS, "minmax"):
            add("bitnest", f"w8a8_static_{obs}", 8, None, self.bitnest("actquant", bits=8, act_mode="static", observer=obs), "static")
        add("bitnest", "w4a8_dynamic", 4, g4, self.bitnest("actquant", bits=4, group_size=g4, act_mode="dynamic"), "rtn")
        if not quick:
            add("bitnest", "w4a8_dynamic_gptq", 4, g4,
                self.bitnest("actquant", bits=4, group_size=g4, act_mode="dynamic", weights="gptq"), "gptq")
        add("bitnest", "intonly_w8a8", 8, None, self.bitnest("intonly"), "static")
        # peers: the functions of bench/foundation.py
        for g in self.groups:
            for b in bits:
                add("hqq", "rtn", b, g, self.peer(lambda m, b=b, g=g: hqq_quantize(m, names, b, g, False)), "rtn")
            for b in one(low, 3):
                add("hqq", "hqq_opt", b, g, self.peer(lambda m, b=b, g=g: hqq_quantize(m, names, b, g, True)), "hqq_opt")
            for b in one(bits, 4):
                add("torchao", "rtn_intx", b, g, self.peer(lambda m, b=b, g=g: torchao_quantize(m, names, b, g)), "rtn")
        for b in one([b for b in bits if b in (8, 4, 2)], 4):  # quanto has no 3-bit type
            add("optimum-quanto", "rtn", b, "auto", self.peer(lambda m, b=b: quanto_quantize(m, names, b),
                                                              lambda m: quanto_group(m, names)), "rtn")
        if self.hf_dir is not None and a.peer_python:
            for lib in PEER_GPTQ:
                if quick:  # one run of the fast peer
                    settings = [(4, self.groups[0])] if lib == "llmcompressor" else []
                elif lib == "gptqmodel":  # the second peer: group 128 (the bar is W4 and W3 g128)
                    settings = [(b, 128) for b in low if 128 in self.groups] or [(b, self.groups[0]) for b in low]
                else:  # 8-bit GPTQ is indistinguishable from FP: 4, 3, 2 bits at every grouping
                    settings = [(b, g) for g in self.groups for b in low]
                for b, g in settings:
                    add(lib, "gptq", b, g, self.peer_gptq(lib, b, g), f"peer:{lib}")
        return S

    def estimate(self, specs: list[Spec]) -> float:
        """Seconds the plan should take on 2 quiet cores, from the measured COST table."""
        c, a = COST[self.name], self.args
        n, win, nlay = a.n_calib, self.windows(), len(self.names)
        sens = (1 + nlay * len(a.mixed_candidates)) * a.mixed_calib * min(a.mixed_len, self.ctx) / self.ctx * c["fwd"]
        per = {"fp": 0.0, "rtn": c["rtn"], "codebook": c["codebook"], "kmeans": c["kmeans"], "share": c["share"],
               "hqq_opt": c["hqq_opt"], "gptq": c["gptq"] + n * c["gptq_seq"],
               "gptq_clip": c["gptq_clip"] + n * c["gptq_clip_seq"], "static": c["static"] + n * c["static_seq"],
               "mixed": sens / len(MIXED_BUDGETS) + c["gptq_clip"] + n * c["gptq_clip_seq"],
               "matquant": c["matquant"] + a.matquant_steps * c["matquant_step"],
               "onebit": c["onebit"] + a.onebit_steps * c["onebit_step"]}
        cpu, wall = 0.0, 0.0
        for s in specs:
            if s.kind.startswith("peer:"):
                fixed, per_seq = c["peer"].get(s.kind[5:], (30.0, 0.35))
                wall += fixed + n * per_seq
            else:
                cpu += per[s.kind]
            cpu += len(s.rows) * (c["row"] + win * c["window"])
        return cpu * THREADS_FACTOR.get(a.threads, 0.7) + wall

    def windows(self) -> int:
        """Evaluation windows per row (both datasets)."""
        from bitnest.eval.report import eval_tokens
        tot = 0
        for d in ("wikitext2", "c4"):
            nw = eval_tokens(self.tok, d, self.args.data_dir).numel() // self.ctx
            tot += min(nw, self.args.limit) if self.args.limit else nw
        return tot

    # -- running
    def run(self, specs: list[Spec], on_row) -> list[dict]:
        rows, t0 = [], time.perf_counter()
        for i, s in enumerate(specs):
            c0 = time.process_time()
            try:
                out = s.make(self.fp)
            except Exception as e:  # one broken row must not cost the table: record it, say why
                print(f"  !! {s.library} {s.method} {s.bits} {group_label(s.group)}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                row = self.row(s, None, float("nan"), None, f"failed: {type(e).__name__}: {str(e)[:200]}")
                rows.append(row)
                on_row(row)
                continue
            m, note = out.model, out.note or s.note
            qcpu = time.process_time() - c0
            for r in s.rows:
                if r is not None:  # a nested (Matryoshka) model served at r bits, as bench/matquant.py does
                    for n in self.names:
                        m.get_submodule(n).serve_bits = r
                e0, c0 = time.perf_counter(), time.process_time()
                row = self.row(s, m, out.seconds, out.bb, note, bits=r, group=out.group)
                row["eval_seconds"], ecpu = time.perf_counter() - e0, time.process_time() - c0
                self.fp_row = row if s.method == "fp" else self.fp_row
                add_interval(row, self.fp_row)
                rows.append(row)
                on_row(row)
                el = time.perf_counter() - t0
                print(f"  [{el:5.0f}s] {row['library']:<14} {row['method']:<20} {str(row['bits']):>4} {str(row['group_size']):>8}"
                      f"  bpw {row['bits_per_weight']:6.3f}  wiki {row['ppl_wikitext2']:10.2f}  c4 {row['ppl_c4']:10.2f}"
                      f"  quant {row['seconds']:6.2f}s (cpu {qcpu:6.2f})  eval {row['eval_seconds']:5.2f}s (cpu {ecpu:5.2f})"
                      f"  ΔNLL c4 {interval_cell(row, self.fp_row, 'c4') or '-'}"
                      f"{'  ' + note if note else ''}", flush=True)
                qcpu = 0.0
            del m
        return rows

    def row(self, s: Spec, m, sec, bb, note, bits=None, group=None) -> dict:
        base = {"model": self.name, "library": s.library, "method": s.method, "bits": bits if bits is not None else s.bits,
                "group_size": group or (group_label(s.group) if s.method != "fp" else None), "ctx": self.ctx, "seconds": sec,
                "note": note}
        if m is None:
            return {**base, "bits_per_weight": float("nan"), "model_bytes": None, "ppl_wikitext2": float("nan"),
                    "ppl_c4": float("nan")}
        r = eval_row(m, self.tok, self.ctx, data_dir=self.args.data_dir, limit=self.args.limit, storage=self.storage,
                     keep_windows=True)
        if bb is not None:
            r["bits_per_weight"], r["model_bytes"] = bb
        return {**base, **r}


def quanto_group(m, names):
    """The granularity quanto chose for itself (group 128 at int4/int2 when it divides, else per channel)."""
    w = m.get_submodule(names[0]).weight
    g = w.__tensor_flatten__()[1].get("group_size") if hasattr(w, "__tensor_flatten__") else None
    return int(g) if g not in (None, "None") else "channel"  # quanto serializes None as the string 'None'


def matquant_available() -> bool:
    try:
        from bitnest.methods import get_method
        get_method("matquant")
        return True
    except Exception:
        return False


def find_onebit_checkpoint(explicit, source) -> str | None:
    """--onebit-ckpt, else the newest bitnest onebit checkpoint under runs/ quantized from this model."""
    if explicit:
        return explicit
    runs = ROOT / "runs"
    if not runs.is_dir():
        return None
    found = []
    for cfg in runs.rglob("config.json"):
        try:
            qc = json.loads(cfg.read_text()).get("quantization_config", {})
        except (OSError, ValueError):
            continue
        if qc.get("quant_method") == "bitnest" and qc.get("method") == "onebit" and \
                Path(qc.get("source_model", "")).resolve() == Path(source).resolve():
            found.append(cfg.parent)
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


# ---------------------------------------------------------------------------------------- the peer GPTQs
def run_peer_gptq(python, lib, model_dir, bits, group, calib, threads) -> dict:
    """Run `--peer-worker lib` under the overlay venv's python; returns its result dict."""
    with tempfile.TemporaryDirectory() as d:
        cpath, opath = Path(d) / "calib.pt", Path(d) / "out.pt"
        torch.save(calib.clone(), cpath)
        cmd = [python, str(Path(__file__).resolve()), "--peer-worker", lib, "--peer-model", str(model_dir),
               "--peer-bits", str(bits), "--peer-group", str(group or -1), "--peer-calib", str(cpath),
               "--peer-out", str(opath), "--threads", str(threads)]
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "TOKENIZERS_PARALLELISM": "false"}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0 or not opath.exists():
            tail = (p.stdout + p.stderr).strip().splitlines()[-6:]
            raise RuntimeError(f"{lib} worker exited {p.returncode}: " + " | ".join(tail))
        return torch.load(opath, weights_only=False)


@torch.no_grad()
def served_weight(mod, in_features: int) -> torch.Tensor:
    """The (out, in) weight a quantized layer computes with: its output on the identity, transposed (bias-free)."""
    I = torch.eye(in_features, dtype=torch.float32)
    dt = next((t.dtype for t in list(mod.parameters()) + list(mod.buffers()) if t.is_floating_point()), torch.float32)
    return mod(I.to(dt)).float().T.contiguous()  # (out, in)


def stored_bytes(tensors: list[torch.Tensor], float_bits: int = 16) -> int:
    """Integer tensors at their size, float tensors at the storage dtype (bf16 for ref-10m)."""
    return sum(t.numel() * (float_bits // 8 if t.is_floating_point() else t.element_size()) for t in tensors)


def peer_worker(a) -> int:
    """Runs inside the overlay venv: quantize the HF model at --peer-model with the peer's GPTQ on the given
    calibration tokens, save the served weights, the stored bytes and the quantization time."""
    torch.set_num_threads(a.threads)
    ids = torch.load(a.peer_calib)  # (n, T)
    bits, g = a.peer_bits, (None if a.peer_group == -1 else a.peer_group)
    res = {"weights": {}, "qbytes": {}}
    if a.peer_worker == "llmcompressor":
        import compressed_tensors
        import llmcompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(a.peer_model, dtype=torch.float32)
        wargs = QuantizationArgs(num_bits=bits, type="int", symmetric=False,
                                 strategy="group" if g else "channel", group_size=g)
        recipe = GPTQModifier(config_groups={"g0": QuantizationScheme(targets=["Linear"], weights=wargs)},
                              ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder="static")
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        t = time.perf_counter()
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
                shuffle_calibration_samples=False)
        res["seconds"] = time.perf_counter() - t
        for n, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and hasattr(mod, "weight_scale"):
                res["weights"][n] = served_weight(mod, mod.in_features)
                # pack-quantized storage: codes packed at `bits` (int32 words), zero points packed at `bits`,
                # scales in the storage dtype, the (2,) int64 shape
                codes = mod.in_features * mod.out_features * bits // 8
                zp = math.ceil(mod.weight_zero_point.numel() * bits / 8)
                res["qbytes"][n] = codes + zp + stored_bytes([mod.weight_scale]) + 16
        res["note"] = (f"llmcompressor {llmcompressor.__version__} (compressed-tensors {compressed_tensors.__version__}) "
                       f"GPTQModifier asym, actorder=static, damp 0.01, block 128, CPU")
    elif a.peer_worker == "gptqmodel":
        import gptqmodel
        from gptqmodel import GPTQModel, QuantizeConfig
        calib = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in ids]
        qc = QuantizeConfig(bits=bits, group_size=g or -1, sym=False, desc_act=True, act_group_aware=False,
                            static_groups=True, damp_percent=0.01)
        model = GPTQModel.load(a.peer_model, qc, device="cpu", dtype=torch.float32)
        t = time.perf_counter()
        model.quantize(calib, batch_size=1)
        res["seconds"] = time.perf_counter() - t
        # the in-memory model right after quantize() does not compute with its packed weights (its unpacking
        # buffers are left on the meta device: layer(I) is far from W); the deployment path is save, then load
        with tempfile.TemporaryDirectory() as d:
            model.save(d)
            model = GPTQModel.load(d, device="cpu", backend=gptqmodel.BACKEND.TORCH)
        for n, mod in model.model.named_modules():
            if hasattr(mod, "qweight"):
                res["weights"][n] = served_weight(mod, mod.in_features)
                res["qbytes"][n] = stored_bytes([getattr(mod, k) for k in ("qweight", "qzeros", "scales", "g_idx")
                                                 if getattr(mod, k, None) is not None])
        res["note"] = (f"gptqmodel {gptqmodel.__version__} asym, desc_act + static_groups, damp 0.01, CPU, saved and "
                       "reloaded with the torch kernel (g_idx counted)")
    else:
        raise SystemExit(f"unknown peer {a.peer_worker}")
    import transformers
    res["note"] += f"; transformers {transformers.__version__}, torch {torch.__version__}"
    torch.save(res, a.peer_out)
    return 0


# ----------------------------------------------------------------------------- GPTQ transcription check
def fasterquant_reference(W, H, bits, group, *, blocksize=128, percdamp=0.01, actorder=True, static_groups=True,
                          grid=None):
    """IST-DASLab/gptq `GPTQ.fasterquant` (gptq.py) with its `Quantizer` (quant.py: asymmetric MinMax,
    perchannel, no MSE search), transcribed line for line; static_groups as in GPTQModel/AutoGPTQ
    (the group's quantizer fitted on the original W before the loop, which act-order with groups needs).
    `grid` = (groups, quantize) swaps the reference Quantizer for another grid: groups[k] = (scale, zero) of
    the k-th group of `group` columns, quantize(x, scale, zero) -> dequantized x."""
    W = W.clone().float()
    H = H.clone().float()
    maxq = torch.tensor(2 ** bits - 1)

    def find_params(x):  # quant.Quantizer.find_params, perchannel, sym=False
        xmin = torch.minimum(x.min(1)[0], torch.zeros(x.shape[0]))
        xmax = torch.maximum(x.max(1)[0], torch.zeros(x.shape[0]))
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp], xmax[tmp] = -1, +1
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale)
        return scale.unsqueeze(1), zero.unsqueeze(1)

    def quantize(x, scale, zero):  # quant.quantize
        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
        return scale * (q - zero)

    rows, columns = W.shape
    if grid is not None:
        static_groups, group = True, group or columns
    scale, zero = find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = []
    if grid is not None:
        groups, quantize = grid
    elif static_groups and group:
        groups = [find_params(W[:, i:i + group]) for i in range(0, columns, group)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if group:
                if not static_groups:
                    if (i1 + i) % group == 0:
                        scale, zero = find_params(W[:, (i1 + i):(i1 + i + group)])
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    scale, zero = groups[idx // group]
            q = quantize(w.unsqueeze(1), scale, zero).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q  # (out, in) dequantized


def transcription_check(args, layer="model.layers.3.mlp.down_proj", n_calib=None, verbose=True) -> list[dict]:
    """bitnest's GPTQ vs the transcription on one real ref-10m layer and its real Hessian (2XᵀX/n of the FP
    model's inputs to that layer on C4 training windows), act-order with static groups, damping 0.01, block 128.
    The two differ only in the grid: the reference widens [min, max] to include 0, rounds the zero point to an
    integer and keeps fp32 scales; bitnest keeps the real-valued zero point of the MatQuant grid and stores
    α, z in fp16. So the loop is also run on bitnest's fitted grid ('same grid'): the weights must then be
    identical, and bitnest's output error tr(ΔW H ΔWᵀ) must be within 1% of the reference's (or lower)."""
    from bitnest.calib.data import CalibOptions, calibration_tokens
    from bitnest.calib.driver import Hessian
    from bitnest.grids.affine import AffineSpec, dequantize, fit, quantize
    from bitnest.grids.affine import AffineGrid
    from bitnest.methods.gptq import gptq

    torch.set_num_threads(args.threads)
    loaded, ctx = load("ref-10m", args.data_dir)
    model = loaded.model.eval()
    lin = model.get_submodule(layer)
    n = n_calib or args.n_calib
    ids = calibration_tokens(model, CalibOptions(calib_data="c4", n_calib=n, calib_len=ctx), tokenizer=loaded.tokenizer,
                             data_dir=args.data_dir)
    h = Hessian(lin.in_features)
    hook = lin.register_forward_pre_hook(lambda m, a: h.add(a[0].detach()))
    with torch.no_grad():
        for x in ids.split(8):
            model(input_ids=x, use_cache=False)
    hook.remove()
    H, W = h.H, lin.weight.detach().float()
    err = lambda Wq: float(torch.trace((W - Wq) @ H @ (W - Wq).T))  # noqa: E731  output error tr(ΔW H ΔWᵀ)
    out = []
    for bits, group in ((4, 128), (3, 128), (4, None), (2, 64)):
        spec = AffineSpec(bits, group)
        grid = AffineGrid(spec)
        Q, alpha, z = gptq(W, H, grid, act_order=True)
        Wb = dequantize(Q, spec, alpha, z)
        Wr = fasterquant_reference(W, H, bits, group)
        a0, z0 = fit(W, spec)
        rtn_W = dequantize(quantize(W, spec, a0, z0), spec, a0, z0)
        # the reference loop on bitnest's grid (real z, fp16 α, z): isolates the algorithm from the grid
        Wsame = _reference_on_grid(W, H, spec, alpha, z)
        agree = float((Wsame - Wb).abs().le(1e-6 * W.abs().max()).float().mean())
        row = {"bits": bits, "group_size": group_label(group), "err_rtn": err(rtn_W), "err_bitnest": err(Wb),
               "err_reference": err(Wr), "err_reference_same_grid": err(Wsame), "identical_same_grid": agree}
        row["rel_vs_reference"] = row["err_bitnest"] / row["err_reference"] - 1
        row["rel_vs_same_grid"] = row["err_bitnest"] / row["err_reference_same_grid"] - 1
        out.append(row)
        if verbose:
            print(f"  W{bits} {str(group_label(group)):>7}: tr(ΔW H ΔWᵀ) rtn {row['err_rtn']:.4f}  bitnest {row['err_bitnest']:.4f}  "
                  f"reference {row['err_reference']:.4f} ({100 * row['rel_vs_reference']:+.2f}%)  reference on bitnest's grid "
                  f"{row['err_reference_same_grid']:.4f} ({100 * row['rel_vs_same_grid']:+.3f}%, {100 * agree:.3f}% of weights identical)",
                  flush=True)
    return out


def _reference_on_grid(W, H, spec, alpha, z, blocksize=128, percdamp=0.01):
    """The transcription's loop (act-order, static groups) with bitnest's stored grid (α, z per group)."""
    A, Z = alpha.float(), z.float()  # (out, G)
    groups = [(A[:, k:k + 1], Z[:, k:k + 1]) for k in range(A.shape[1])]

    def quantize(x, a, zz):  # bitnest's affine grid: real-valued z added before rounding
        return a * (torch.clamp(torch.round(x / a + zz), 0, spec.qmax) - zz)

    return fasterquant_reference(W, H, spec.bits, spec.group_size, blocksize=blocksize, percdamp=percdamp,
                                 grid=(groups, quantize))


def plot(rows: list[dict], out: Path) -> Path:
    """C4 held-out PPL (log) against bits per weight: one panel per model, one series per (library, method,
    group) joined in order of bits; bitnest filled markers, peers hollow; FP as a dashed line; points beyond
    the axis (30 × FP) drawn as ▲ on its top edge."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ok = [r for r in rows if isinstance(r.get("ppl_c4"), (int, float)) and r["ppl_c4"] == r["ppl_c4"]]
    models = list(dict.fromkeys(r["model"] for r in ok))
    panel_w, legend_w = 8.5, 3.4  # inches: the legend gets a fixed column on the right
    right = panel_w * len(models) / (panel_w * len(models) + legend_w)
    fig, axes = plt.subplots(1, len(models), figsize=(panel_w * len(models) + legend_w, 7.5), squeeze=False)
    ours = sorted({r["method"] for r in ok if r["library"] == "bitnest"})
    t20, t20b = plt.get_cmap("tab20"), plt.get_cmap("tab20b")  # bitnest: hues the peers' colours do not use
    palette = [t20(i) for i in (0, 2, 4, 6, 8, 18, 1, 3, 5, 7, 9, 19)] + [t20b(i) for i in (0, 4, 8, 12, 16, 2, 10, 14)]
    color = {("bitnest", m): palette[i % len(palette)] for i, m in enumerate(ours)}
    peer_color = {("hqq", "rtn"): "#8c564b", ("hqq", "hqq_opt"): "#bcbd22", ("torchao", "rtn_intx"): "#7f7f7f",
                  ("optimum-quanto", "rtn"): "#e377c2", ("llmcompressor", "gptq"): "#000000", ("gptqmodel", "gptq"): "#b8860b"}
    markers = {"bitnest": "o", "hqq": "s", "torchao": "D", "optimum-quanto": "P", "llmcompressor": "X", "gptqmodel": "*"}
    styles = {"channel": "-", 128: "--", 64: ":", "tensor": "-."}
    keys = [("bitnest", m) for m in ours] + sorted({(r["library"], r["method"]) for r in ok
                                                    if r["library"] not in ("bitnest", "-")})
    for k in keys:
        color.setdefault(k, peer_color.get(k, "#17becf"))
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, model in zip(axes[0], models):
        rs = [r for r in ok if r["model"] == model]
        fp = next((r["ppl_c4"] for r in rs if r["method"] == "fp"), None)
        q = [r for r in rs if r["method"] != "fp"]
        if not q:
            continue
        top = min(max(r["ppl_c4"] for r in q), 30 * fp if fp else float("inf"))
        lo = min([r["ppl_c4"] for r in q] + ([fp] if fp else []))
        series: dict = {}
        for r in q:
            series.setdefault((r["library"], r["method"], r["group_size"]), []).append(r)
        for (lib, meth, g), pts in series.items():
            pts = sorted(pts, key=lambda r: (float(r["bits"]), r["bits_per_weight"]))
            c, mk = color[(lib, meth)], markers.get(lib, "o")
            x = [r["bits_per_weight"] for r in pts]
            y = [min(r["ppl_c4"], top) for r in pts]
            ax.plot(x, y, linestyle=styles.get(g, "-"), color=c, linewidth=1.1, alpha=0.75)
            for xi, yi, r in zip(x, y, pts):
                ax.plot([xi], [yi], marker="^" if r["ppl_c4"] > top else mk, markersize=11 if mk == "*" else 7,
                        color=c, markerfacecolor=c if lib == "bitnest" else "white", markeredgewidth=1.4,
                        linestyle="none", clip_on=False, zorder=3)
        if fp:
            ax.axhline(fp, color="black", linestyle="--", linewidth=1)
            ax.text(16.2, fp, f"FP {fp:.1f}", va="bottom", ha="right", fontsize=9)
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.05, top * 1.12)
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt if top / lo < 20 else NullFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlim(0.8, 17)
        ax.set_xticks([1, 2, 3, 4, 5, 6, 8, 12, 16])
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bits per quantized weight (every stored bit counted; log scale)")
        ax.set_ylabel("C4 held-out perplexity (log scale)")
        ax.set_title(f"{model}: C4 held-out PPL vs bits per weight (▲: beyond the axis)", fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=color[k], marker=markers.get(k[0], "o"), linestyle="-", markersize=7,
                      markerfacecolor=color[k] if k[0] == "bitnest" else "white", label=f"{k[0]}: {k[1]}") for k in keys]
    used = {r["group_size"] for r in ok}
    handles += [Line2D([], [], color="gray", linestyle=st, label=f"group {g}") for g, st in styles.items() if g in used]
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(right + 0.005, 0.5), fontsize=8.5, frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------- main
COLS = [("model", "model", ""), ("library", "library", ""), ("method", "method", ""), ("bits", "bits", ""),
        ("group_size", "group", ""), ("bits_per_weight", "bits/weight", ".3f"), ("ppl_wikitext2", "WikiText-2 PPL", ".2f"),
        ("d_wikitext2", "Δ NLL Wiki [95 %]", ""), ("ppl_c4", "C4 held-out PPL", ".2f"), ("d_c4", "Δ NLL C4 [95 %]", ""),
        ("seconds", "quant s", ".1f"), ("note", "note", "")]


def table(rows: list[dict]) -> str:
    """The markdown table: Δ NLL = row − its model's FP row (nats/token) with the paired 95 % interval; blank for
    failed rows and rows saved without intervals."""
    fps = {r["model"]: r for r in rows if r["method"] == "fp"}
    shown = [{**r, **{f"d_{d}": interval_cell(r, fps.get(r["model"]), d) for d in ("wikitext2", "c4")}} for r in rows]
    return fmt_table(shown, COLS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--data-dir")
    ap.add_argument("--limit", type=int, default=48, help="windows per dataset (default 48; 0 = all)")
    ap.add_argument("--quick", action="store_true", help="fewer rows (the code-path smoke test): one grouping, 4/3/2 bits "
                    "for rtn/gptq/hqq, one row of the rest, no gptq+clip/share/log/matquant/onebit")
    ap.add_argument("--n-calib", type=int, help="calibration sequences (default 64; 4 when --limit <= 8, a smoke run)")
    ap.add_argument("--mixed-calib", type=int, help="sequences for the mixed-precision sensitivities (default 4; 1 in a smoke run)")
    ap.add_argument("--matquant-steps", type=int, help="MatQuant QAT steps (default 24; 2 in a smoke run; 0 = skip)")
    ap.add_argument("--onebit-steps", type=int,
                    help="OneBit steps when no checkpoint is found (default 40; 2 in a smoke run; 0 = skip)")
    ap.add_argument("--onebit-ckpt", help="a saved bitnest onebit checkpoint to evaluate instead of training")
    peer_default = os.environ.get("BITNEST_PEER_PYTHON") or (DEFAULT_PEER_PYTHON if Path(DEFAULT_PEER_PYTHON).exists() else None)
    ap.add_argument("--peer-python", default=peer_default,
                    help="python of the overlay venv with llmcompressor and gptqmodel (see the module doc)")
    ap.add_argument("--no-peer-gptq", action="store_true")
    ap.add_argument("--no-write", action="store_true",
                    help="leave BENCHMARKS.md and bench/results alone (JSON and plot go to a scratch dir)")
    ap.add_argument("--threads", type=int, help="torch threads (default 2; 1 in a smoke run, --limit <= 8)")
    ap.add_argument("--transcription-check", action="store_true",
                    help="only the GPTQ transcription check (ref-10m, one layer)")
    ap.add_argument("--plot-from", help="redraw the plot from a survey.json and exit")
    ap.add_argument("--plan-only", action="store_true", help="print the plan and its time estimate, run nothing")
    ap.add_argument("--from-json", help="rebuild the table, checks, plot and section from a saved survey.json "
                    "(pass the run's --limit / --n-calib so the note states them)")
    ap.add_argument("--peer-worker", choices=PEER_GPTQ, help=argparse.SUPPRESS)
    for k, t in (("peer-model", str), ("peer-bits", int), ("peer-group", int), ("peer-calib", str), ("peer-out", str)):
        ap.add_argument(f"--{k}", type=t, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    smoke = args.limit is not None and 0 < args.limit <= 8
    args.threads = args.threads or (1 if smoke else 2)
    if args.peer_worker:
        return peer_worker(args)
    torch.set_num_threads(args.threads)
    if args.plot_from:
        print(plot(json.loads(Path(args.plot_from).read_text()), Path(args.plot_from).with_suffix(".png")))
        return 0
    args.limit = args.limit or None
    args.n_calib = args.n_calib or (4 if smoke else 64)
    # a smoke run measures the sensitivities on one 64-token window, widths 2 and 8 only (each layer × width
    # is one forward of the whole model: 280 of them at the full setting)
    args.mixed_calib = min(args.mixed_calib or (1 if smoke else 4), args.n_calib)
    args.mixed_len = 64 if smoke else 10 ** 6
    args.mixed_candidates = (2, 8) if smoke else MIXED_CANDIDATES
    args.matquant_steps = args.matquant_steps if args.matquant_steps is not None else (2 if smoke else 24)
    args.onebit_steps = args.onebit_steps if args.onebit_steps is not None else (2 if smoke else 40)
    if args.no_peer_gptq:
        args.peer_python = None
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.transcription_check:
        res = transcription_check(args)
        ok = all(abs(r["rel_vs_same_grid"]) <= 0.01 and r["rel_vs_reference"] <= 0.01 and r["err_bitnest"] < r["err_rtn"]
                 for r in res)
        print("transcription check:", "PASS" if ok else "FAIL")
        return 0 if ok else 1
    out_dir = Path(tempfile.mkdtemp(prefix="survey_")) if args.no_write else RESULTS
    surveys = [Survey(n, args) for n in args.models.split(",")]
    plans = [(s, s.plan()) for s in surveys]
    total = sum(len(p) for _, p in plans)
    est = sum(s.estimate(p) for s, p in plans)
    print(f"plan: {total} runs ({sum(len(x.rows) for _, p in plans for x in p)} rows) on {', '.join(s.name for s in surveys)}; "
          f"limit {args.limit or 'all'} windows/dataset, {args.n_calib} calibration seqs, matquant {args.matquant_steps} "
          f"steps, onebit {args.onebit_steps} steps, peer GPTQ {'via ' + args.peer_python if args.peer_python else 'skipped'}; "
          f"estimated {est / 60:.1f} min ({args.threads} threads, quiet cores)", flush=True)
    for s, p in plans:
        kinds = {}
        for x in p:
            kinds[x.library] = kinds.get(x.library, 0) + len(x.rows)
        print(f"  {s.name}: ctx {s.ctx}, {len(s.names)} linears, groups {[group_label(g) for g in s.groups]}, "
              f"{s.windows()} eval windows/row, rows by library {kinds}, ≈ {s.estimate(p) / 60:.1f} min", flush=True)
    if args.plan_only:
        for s, p in plans:
            for x in p:
                g = group_label(x.group) if x.method != "fp" else "-"
                print(f"    {s.name:<12} {x.library:<14} {x.method:<20} {str(x.bits):>4} {str(g):>8}"
                      f"{'  ×' + str(len(x.rows)) + ' rows' if len(x.rows) > 1 else ''}")
        return 0
    rows: list[dict] = []
    t0 = time.perf_counter()
    if args.from_json:  # rebuild the table, checks, plot and section from saved rows; nothing is run
        rows = json.loads(Path(args.from_json).read_text())
        rows = [{k: (float("nan") if v is None and k.startswith("ppl") else v) for k, v in r.items()} for r in rows]
        return finish(rows, args, out_dir, None, None)

    def on_row(r):
        rows.append(r)
        write_json_to(out_dir, rows)

    for s, p in plans:
        print(f"{s.name}:", flush=True)
        s.run(p, on_row)
    return finish(rows, args, out_dir, time.perf_counter() - t0, est)


def finish(rows, args, out_dir: Path, wall, est) -> int:
    text = table(rows)
    print("\n" + text)
    if wall is not None:
        print(f"\n{len(rows)} rows in {wall / 60:.1f} min (estimated {est / 60:.1f})")
    try:
        check_text = checks(rows)
    except Exception as e:  # a summary bug must not cost the recorded table
        check_text = f"(checks failed: {e!r})\n"
    print("\n" + check_text)
    png = plot(rows, out_dir / "survey.png")
    print(f"wrote {out_dir / 'survey.json'} and {png}")
    if not args.no_write:
        note = ("Every row evaluated by the same bitnest evaluator: "
                f"{'first %d windows' % args.limit if args.limit else 'all windows'} of WikiText-2 raw test and C4 "
                f"held-out rows 1800-1999 at the model's training context; calibration: {args.n_calib} windows of C4 "
                "training rows 0-1799, shared by every calibrated method (bitnest and peers). bits/weight counts every "
                "stored bit per quantized weight (codes, scales, zeros, tables, g_idx), floats at the storage dtype; "
                "`quant s` is quantization time. Δ NLL = row − FP (nats/token) with its paired bootstrap 95 % "
                "interval over the evaluation windows (the same for every row); “≈ FP” = the interval contains 0. "
                "Peer GPTQs run in an overlay venv (see bench/survey.py). "
                + (f"Run time {wall / 60:.1f} min. " if wall is not None else "")
                + "![survey](bench/results/survey.png)")
        write_section("survey", header("Survey: every method vs the peers", note) + "\n" + text
                      + "\n\nThe issue's checks, from these rows:\n\n" + check_text)
    return 0


def checks(rows: list[dict]) -> str:
    """The issue's done-when, computed from the rows (C4 held-out unless said). A difference between two rows
    counts only outside the paired bootstrap 95 % interval of their NLL difference over the evaluation windows
    (common.paired); rows read back from JSON keep no windows, so those comparisons are reported undecided."""
    ok = lambda r: r.get("ppl_c4") is not None and r["ppl_c4"] == r["ppl_c4"]  # failed rows carry NaN / null
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model and ok(r)]
        fp = next((r for r in rs if r["method"] == "fp"), None)
        peers_gptq = [r for r in rs if r["library"] in PEER_GPTQ]
        for b in (4, 3):
            ours = next((r for r in rs if r["library"] == "bitnest" and r["method"] == "gptq" and r["bits"] == b
                         and r["group_size"] == 128), None)
            for pr in (r for r in peers_gptq if r["bits"] == b and r["group_size"] == 128):
                if ours:
                    pc, pw = paired(ours, pr, "c4"), paired(ours, pr, "wikitext2")
                    out.append(f"- {model} GPTQ W{b} g128: bitnest C4 {ours['ppl_c4']:.2f} / WikiText-2 "
                               f"{ours['ppl_wikitext2']:.2f} vs {pr['library']} {pr['ppl_c4']:.2f} / {pr['ppl_wikitext2']:.2f} "
                               f"({100 * (ours['ppl_c4'] / pr['ppl_c4'] - 1):+.2f} % / "
                               f"{100 * (ours['ppl_wikitext2'] / pr['ppl_wikitext2'] - 1):+.2f} %)"
                               + (f"; Δ NLL bitnest − {pr['library']} [paired 95 %] C4 {pair_text(pc, 'bitnest')}; "
                                  f"WikiText-2 {pair_text(pw, 'bitnest')}" if pc and pw else ""))
        ours_all = [r for r in rs if r["library"] == "bitnest"]
        for b in (3, 2):
            peers = [r for r in rs if r["library"] not in ("bitnest", "-") and r["bits"] == b]
            lost, undecided = [], []
            for pr in peers:
                best = min((r for r in ours_all if r["bits_per_weight"] <= pr["bits_per_weight"] + 1e-9),
                           key=lambda r: r["ppl_c4"], default=None)
                p = None if best is None else paired(best, pr, "c4")  # (best − peer, lo, hi)
                if p is not None and p[2] < 0:
                    continue  # beaten: lower C4 NLL, the whole interval below 0
                what = (f"{pr['library']} {pr['method']} g={pr['group_size']} {pr['ppl_c4']:.2f} @ "
                        f"{pr['bits_per_weight']:.3f} b (bitnest best there: "
                        + (f"{best['method']} {best['ppl_c4']:.2f}" if best else "none")
                        + (f", Δ NLL {pair_text(p, 'bitnest')})" if p is not None else ")"))
                (undecided if best is not None and p is None else lost).append(what)
            # undecided: rows read back from JSON (no per-window NLLs), so no interval to decide on
            out.append(f"- {model} {b}-bit: bitnest's best at ≤ each peer row's bits/weight beats "
                       f"{len(peers) - len(lost) - len(undecided)} of {len(peers)} "
                       "peer rows (beats = lower C4 NLL with the paired 95 % interval of the difference below 0)"
                       + ("" if not lost else "; not: " + "; ".join(lost))
                       + ("" if not undecided else f"; undecided (no per-window NLLs in these rows, e.g. read back "
                                                   f"from JSON): {len(undecided)}"))
        if fp:
            for m in ("w8a8_dynamic", "intonly_w8a8"):
                r = next((r for r in rs if r["method"] == m), None)
                if r:
                    dc, dw = interval_cell(r, fp, "c4"), interval_cell(r, fp, "wikitext2")
                    out.append(f"- {model} {m}: C4 {r['ppl_c4']:.2f} vs FP {fp['ppl_c4']:.2f} "
                               f"({100 * (r['ppl_c4'] / fp['ppl_c4'] - 1):+.2f} %), WikiText-2 "
                               f"{100 * (r['ppl_wikitext2'] / fp['ppl_wikitext2'] - 1):+.2f} %"
                               + (f"; Δ NLL vs FP [95 %] C4 {dc}, WikiText-2 {dw}" if dc and dw else ""))
    return "\n".join(out) + "\n"


def write_json_to(out_dir: Path, rows: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    def clean(v):  # NaN (a failed row, a loaded checkpoint's unknown time) is not JSON: null
        return None if isinstance(v, float) and v != v else v
    keep = [{**{k: clean(r.get(k)) for k in JSON_KEYS}, **{k: clean(v) for k, v in r.items() if k not in JSON_KEYS}}
            for r in strip_windows(rows)]  # the per-window NLLs stay in memory
    if out_dir == RESULTS:
        write_json("survey.json", keep)
    else:
        (out_dir / "survey.json").write_text(json.dumps(keep, indent=1))


if __name__ == "__main__":
    sys.exit(main())
