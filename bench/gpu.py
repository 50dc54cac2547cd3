"""The GPU check, prepared to run in one go when a GPU is lent (a few minutes): every CUDA test, then the Triton
kernels against bf16 F.linear at batch 1 and 16, achieved GB/s against the device's peak.

    python bench/gpu.py                       # on a CUDA machine: tests + layer table -> BENCHMARKS.md, results/gpu.json
    python bench/gpu.py --dry-run             # anywhere: tiny shapes on the CPU under TRITON_INTERPRET=1 (checks the script)

Rows: bf16 F.linear (the baseline), bitnest int8/int4/int3/int2 per channel and g128, OneBit, NF4 codebook —
each the median of CUDA-event timings over interleaved repeats, weights cycled over copies totalling ≥ 4× the
L2 cache so they are read from HBM. `speedup_bf16` = bf16 F.linear time ÷ the row's time (same run).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L4": 300.0}  # HBM/GDDR peak, vendor figures
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def peak_gbs(name: str) -> float | None:
    return next((v for k, v in PEAK_GBS.items() if k in name), None)


def formats(W, device):
    import torch

    from bitnest.grids.affine import AffineSpec
    from bitnest.grids.codebook import fixed_codebook, nf_levels
    from bitnest.nn.codebook import CodebookLinear
    from bitnest.nn.onebit import PackedSignLinear
    from bitnest.nn.qlinear import QuantLinear
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W
    out = {}
    for bits in (8, 4, 3, 2):
        out[f"int{bits}"] = QuantLinear.from_linear(lin, AffineSpec(bits, None, False))
        out[f"int{bits} g128"] = QuantLinear.from_linear(lin, AffineSpec(bits, 128, False))
    out["onebit"] = PackedSignLinear.from_parts(W, W.abs().mean(0), W.abs().mean(1), post_ln=True)
    codes, s, table = fixed_codebook(W, nf_levels(4), 64)
    out["nf4 g64"] = CodebookLinear.from_codes(codes, table, s, bits=4, group_size=64, codebook="nf")
    return {k: m.to(device) for k, m in out.items()}


def nbytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters()) if t is not None)


def bench(shapes, batches, reps, device, copies_bytes):
    import torch
    import torch.nn.functional as F

    from bitnest import kernels
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for n_out, n_in in shapes:
        torch.manual_seed(0)
        W = torch.randn(n_out, n_in) * 0.02
        fm = formats(W, device)
        Wb = W.to(device, torch.bfloat16)
        for batch in batches:
            x = torch.randn(batch, n_in, device=device, dtype=torch.bfloat16)
            entries = [("bf16 F.linear", [Wb.clone() for _ in range(max(1, copies_bytes // (Wb.numel() * 2)))], None)]
            for name, m in fm.items():
                k = max(1, copies_bytes // nbytes(m))
                import copy
                entries.append((f"bitnest {name}", [m] + [copy.deepcopy(m) for _ in range(k - 1)], m))
            times = {e[0]: [] for e in entries}
            with torch.inference_mode():
                for rep in range(reps + 1):
                    for name, objs, m in entries:
                        o = objs[rep % len(objs)]
                        f = (lambda: F.linear(x, o)) if m is None else (lambda: o(x))
                        sync()
                        if device == "cuda":
                            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            a.record()
                            f()
                            b.record()
                            sync()
                            dt = a.elapsed_time(b) / 1e3
                        else:
                            t = time.perf_counter()
                            f()
                            dt = time.perf_counter() - t
                        if rep:  # the first repeat warms up (compilation, autotuning)
                            times[name].append(dt)
            base = statistics.median(times["bf16 F.linear"])
            for name, objs, m in entries:
                t = statistics.median(times[name])
                wb = Wb.numel() * 2 if m is None else nbytes(m)
                path = "torch" if m is None else kernels.path_for(x, m.packed)
                rows.append(dict(kind="layer", device=device, shape=f"{n_out}x{n_in}", batch=batch, label=name,
                                 path=path, us=t * 1e6, speedup_bf16=base / t, weight_bytes=wb, gbs=wb / t / 1e9))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from common import fmt_table, header, write_json, write_section
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        sys.exit("bitnest: error: no CUDA device here (use --dry-run to check the script on the CPU)")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter, dry run)"
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_triton.py", "tests/test_kernels.py"],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    print(tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-500:])
    if args.dry_run:  # the Triton kernels, interpreted, registered as CPU paths and forced
        from bitnest import kernels
        from bitnest.kernels import triton_kernels
        for kind in ("affine", "sign", "codebook"):
            kernels.register("cpu", kind, "triton")(getattr(triton_kernels, kind))
        with kernels.use("triton"):
            rows = bench([(64, 128)], [1, 16], 2, device, 1)
    else:
        rows = bench(SHAPES, [1, 16], 25, device, 4 * torch.cuda.get_device_properties(0).L2_cache_size)
    peak = peak_gbs(name)
    for r in rows:
        r["fraction_of_peak"] = r["gbs"] / peak if peak else None
        print(f"{r['shape']:>11} b{r['batch']:<3} {r['label']:<22} {r['path']:<10} {r['us']:9.1f} us  x{r['speedup_bf16']:5.2f} bf16"
              f"  {r['gbs']:8.1f} GB/s" + (f" ({r['fraction_of_peak']:.0%} of {peak:.0f})" if peak else ""))
    if not args.dry_run:
        write_json("gpu.json", [dict(r, device_name=name) for r in rows])
        text = header(f"GPU kernels on {name}", f"Tests: {tests.stdout.strip().splitlines()[-1]}\n")
        text += fmt_table(rows, [("shape", "shape", ""), ("batch", "batch", ""), ("label", "row", ""), ("path", "path", ""),
                                 ("us", "µs", ".1f"), ("speedup_bf16", "×bf16", ".2f"), ("gbs", "GB/s", ".0f"),
                                 ("fraction_of_peak", "of peak", ".2f")])
        write_section("gpu", text)


if __name__ == "__main__":
    main()
