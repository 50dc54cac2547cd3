"""Kernel A/B: builds of the C++ kernels side by side in one process, interleaved, on cold or warm weights.

    python bench/kernel_ab.py --variant base= --variant pf4k=-DBN_PFD=4096 --formats "int2,int3 g128" --rows 1,16
    python bench/kernel_ab.py --variant old=/tmp/old_kernels.cpp --variant new= --cold

A variant is NAME=SPEC: SPEC empty (this checkout's csrc/cpu_kernels.cpp), a path to another kernel source (an
older revision: `git show REV:src/bitnest/kernels/csrc/cpu_kernels.cpp > /tmp/old.cpp`), or compiler flags added
to this checkout's source (`-DBN_PFD=4096`). Every (format, activation dtype, rows) case runs each variant on the
same packed weight and activations, once per repeat in a shuffled order, a burst of calls per timing; the table
gives the medians and each variant's time ÷ the first variant's. Variants whose outputs differ from the first's by
more than 1e-5 (relative norm) are flagged: a speed-up that changes results is not a like-for-like comparison.
`--cold` rotates through copies of each weight totalling ≥ 256 MB (read from memory, as a decoding model does);
by default the weight stays in cache, which isolates compute. `--pages` says where the copies live: `huge` (2 MiB
pages, as bitnest loads packed codes; the default), `torch` (torch's allocator: 4 KiB pages unless
THP_MEM_ALLOC_ENABLE=1 was set) or `both` (each case twice; the fp32 baseline too). Nothing is written unless
--out is given.

    python bench/kernel_ab.py --variant this= --pages both --cold --rows 1 --act fp32 --formats "int8,int2,onebit"

Why this exists: the fp32 F.linear baseline of bench/speed.py varies by ~30 % between VMs of the same type, so a
kernel change is judged by its ratio to the code it replaces, measured in one process.
"""
from __future__ import annotations

import os

os.environ.setdefault("KMP_BLOCKTIME", "0")

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_table, machine  # noqa: E402
from speed import COLD_BYTES, bitnest_formats, threads  # noqa: E402


ACT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(name: str, spec: str):
    """The compiled module of one variant (cached by torch's cpp_extension under a name keyed by its source)."""
    import hashlib

    from torch.utils.cpp_extension import load

    from bitnest.kernels import cpu
    src, flags = cpu.SOURCE, []
    if spec.startswith("-"):
        flags = spec.split()
    elif spec:
        src = Path(spec)
        if not src.is_file():
            raise SystemExit(f"kernel_ab: no kernel source at {spec}")
    key = hashlib.sha1(src.read_bytes() + " ".join(cpu.CFLAGS + flags).encode() + cpu._cpu_flags().encode())
    print(f"building {name} ({src.name} {' '.join(flags)}) ...", file=sys.stderr, flush=True)
    return load(name=f"bn_ab_{key.hexdigest()[:12]}", sources=[str(src)], extra_cflags=cpu.CFLAGS + flags,
                extra_ldflags=["-fopenmp"], verbose=False)


def call(mod, x: torch.Tensor, p) -> torch.Tensor:
    from bitnest.kernels import cpu
    if p.kind == "affine":
        return mod.affine_linear(x, *cpu._affine_args(p), True)
    if p.kind == "codebook":
        g = -1 if p.group_size in (None, -1) else p.group_size
        return mod.codebook_linear(x, p.qweight, p.bits, p.in_features, p.table, p.scale, g, True)
    if p.kind == "sign":
        from bitnest.kernels.reference import LN_EPS
        return mod.sign_affine_linear(x, p.qweight, p.in_features, p.g, p.h, p.post_ln, LN_EPS, True)
    raise SystemExit(f"kernel_ab: format kind {p.kind!r} is not supported here (affine, codebook and sign are)")


def clone(p, pages: str = "torch"):
    """A copy of a packed weight in torch's allocations, or with its large tensors on huge pages (as bitnest loads
    them: bitnest/hugepages.py)."""
    from bitnest import hugepages
    put = hugepages.place if pages == "huge" else (lambda t: t)
    return dataclasses.replace(p, **{f.name: put(getattr(p, f.name).clone()) for f in dataclasses.fields(p)
                                     if torch.is_tensor(getattr(p, f.name))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="NAME=SPEC (see the module doc); ≥ 2, or 1 with --pages both")
    ap.add_argument("--formats", default="int2,int3,int3 g128,int4,int4 g128",
                    help="comma-separated names from bench/speed.py's bitnest_formats")
    ap.add_argument("--rows", default="1,16", help="activation rows (batch), comma-separated")
    ap.add_argument("--act", default="fp32,bf16")
    ap.add_argument("--shape", default="4096x4096", help="out×in")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--burst", type=int, default=4)
    ap.add_argument("--cold", action="store_true", help="rotate through copies of each weight (≥ 256 MB)")
    ap.add_argument("--pages", default="huge",
                    help="where weights live: huge (2 MiB pages, as bitnest places packed codes), torch (torch's "
                         "allocator: 4 KiB pages unless THP_MEM_ALLOC_ENABLE=1), or both, comma-separated")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    bad = [a for a in args.act.split(",") if a not in ACT]
    if bad:
        raise SystemExit(f"kernel_ab: unknown activation dtypes {bad}; known: {', '.join(ACT)}")
    specs = dict(v.partition("=")[::2] for v in args.variant)
    if len(specs) < 2 and args.pages not in ("both", "torch,huge", "huge,torch"):
        raise SystemExit("kernel_ab: give at least two --variant with distinct names (or one with --pages both)")
    threads()
    variants = {name: build(name, spec.strip()) for name, spec in specs.items()}
    n_out, n_in = (int(v) for v in args.shape.lower().split("x"))
    torch.manual_seed(0)
    W = torch.randn(n_out, n_in) * 0.02
    formats = bitnest_formats(W)
    names = [n.strip() for n in args.formats.split(",")]
    unknown = [n for n in names if n not in formats]
    if unknown:
        raise SystemExit(f"kernel_ab: unknown formats {unknown}; known: {', '.join(formats)}")
    pages = [p.strip() for p in args.pages.split(",")] if args.pages != "both" else ["torch", "huge"]
    if set(pages) - {"torch", "huge"}:
        raise SystemExit(f"kernel_ab: --pages takes huge, torch or both, got {args.pages!r}")
    cases, flagged = [], []  # (format, act, rows, variant, fn)
    for n in names:
        p0 = formats[n][0].packed
        nbytes = sum(t.numel() * t.element_size() for t in vars(p0).values() if torch.is_tensor(t))
        ncopy = max(2, -(-COLD_BYTES // nbytes)) if args.cold else 1
        copies = {pg: [clone(p0, pg) for _ in range(ncopy)] for pg in pages}
        for m in (int(r) for r in args.rows.split(",")):
            x32 = torch.randn(m, n_in)
            for act in args.act.split(","):
                x = x32.to(ACT[act])
                first = None
                for vname, mod in variants.items():
                    y = call(mod, x, p0)
                    first = y if first is None else first
                    rel = ((y - first).norm() / first.norm()).item()
                    if rel > 1e-5:
                        flagged.append(f"{n} {act} rows {m}: {vname} differs from the first variant by {rel:.2e}")
                    for pg in pages:
                        state = {"i": 0}

                        def fn(mod=mod, x=x, copies=copies[pg], state=state):
                            state["i"] = (state["i"] + 1) % len(copies)
                            return call(mod, x, copies[state["i"]])
                        label = vname if len(pages) == 1 else f"{vname} {pg}"
                        cases.append(dict(format=n, act=act, rows=m, variant=label, fn=fn, t=[]))
    from bitnest import hugepages
    nfp = max(2, -(-COLD_BYTES // (W.numel() * 4))) if args.cold else 1
    for pg in pages:
        fp = [hugepages.place(W.clone()) if pg == "huge" else W.clone() for _ in range(nfp)]
        for m in (int(r) for r in args.rows.split(",")):  # the fp32 baseline, for scale
            x32, state = torch.randn(m, n_in), {"i": 0}

            def fp32(x=x32, state=state, fp=fp):
                state["i"] = (state["i"] + 1) % len(fp)
                return F.linear(x, fp[state["i"]])
            cases.append(dict(format="fp32 F.linear", act="fp32", rows=m, variant=f"torch {pg}", fn=fp32, t=[]))
    with torch.inference_mode():
        for c in cases:
            c["fn"]()
        for rep in range(args.reps):
            order = list(cases)
            random.Random(rep).shuffle(order)
            for c in order:
                c["fn"]()  # the burst's first call: not timed (it pays for whatever ran before)
                t0 = time.perf_counter()
                for _ in range(args.burst):
                    c["fn"]()
                c["t"].append((time.perf_counter() - t0) / args.burst * 1e6)
    base = {}
    for c in cases:
        c["us"] = statistics.median(c["t"])
        base.setdefault((c["format"], c["act"], c["rows"]), c["us"])
    rows = [dict(format=c["format"], act=c["act"], rows=c["rows"], variant=c["variant"], us=round(c["us"], 1),
                 ratio=round(c["us"] / base[(c["format"], c["act"], c["rows"])], 3)) for c in cases]
    print(f"# {args.shape}, {'cold' if args.cold else 'warm'} weights on {args.pages} pages, {args.reps} repeats × "
          f"{args.burst}, {threads()} threads (THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, THP "
          f"{hugepages._thp_mode()}); ratio = time ÷ the first variant's")
    print(fmt_table(rows, [("format", "format", "s"), ("act", "act", "s"), ("rows", "rows", "d"),
                           ("variant", "variant", "s"), ("us", "µs", ".0f"), ("ratio", "÷ first", ".3f")]))
    for f in flagged:
        print("DIFFERS:", f)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(machine=machine(), args=vars(args), rows=rows), indent=1))


if __name__ == "__main__":
    main()
