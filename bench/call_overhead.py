"""Python time around a kernel call: a packed layer's forward, kernels.linear and the bare C++ call, per format.

    python bench/call_overhead.py [--shape 64x256] [--rows 1]

A decoded token runs every Linear once (154 in a 1.1B Llama), so what a forward spends outside the kernel is paid
per layer per token. At a tiny shape the kernel itself is a few µs and the difference between the rows is the
Python: `module` (the nn layer: its packed view, kernels.linear, the CPU path), `kernels.linear` on a packed view
held by the caller, `packed` (building or re-using the layer's view) and `C++` (the extension call alone, affine
formats). Best of 7 timings of 3000 calls each, one process; nothing is written.
"""
from __future__ import annotations

import os

os.environ.setdefault("KMP_BLOCKTIME", "0")

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_table  # noqa: E402
from speed import bitnest_formats, threads  # noqa: E402


def best_us(fn, n: int = 3000) -> float:
    for _ in range(200):
        fn()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t) / n * 1e6)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="64x256", help="out×in")
    ap.add_argument("--rows", type=int, default=1)
    args = ap.parse_args()
    threads()
    from bitnest import kernels
    from bitnest.kernels import cpu
    n_out, n_in = (int(v) for v in args.shape.lower().split("x"))
    torch.manual_seed(0)
    W = torch.randn(n_out, n_in) * 0.02
    x = torch.randn(args.rows, n_in)
    rows, fmts = [], bitnest_formats(W)
    with torch.inference_mode():
        for name, (m, _) in fmts.items():
            p = m.packed
            row = dict(format=name, module=best_us(lambda: m(x)), linear=best_us(lambda: kernels.linear(x, p, None)),
                       packed=best_us(lambda: m.packed), cxx=None)
            if p.kind == "affine" and cpu.available():
                a = cpu._affine_args(p)
                row["cxx"] = best_us(lambda: cpu.ext().affine_linear(x, *a, True))
            rows.append(row)
    print(f"# {args.shape}, {args.rows} row(s), {threads()} threads; µs per call")
    print(fmt_table(rows, [("format", "format", "s"), ("module", "module", ".1f"), ("linear", "kernels.linear", ".1f"),
                           ("packed", "packed", ".1f"), ("cxx", "C++", ".1f")]))


if __name__ == "__main__":
    main()
