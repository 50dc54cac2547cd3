"""Where a run-time switch's time goes: writing fresh memory for the working copies, or slicing the codes.

    python bench/switch_cost.py [--model DIR] [--bits 4] [--rounds 3] [--pages small|huge]

Loads a nested (sliced int8) checkpoint — by default the 1.1B-shape one bench/speed.py builds in runs/bench_speed/ —
in this fresh process and, for every nested layer, does what `set_precision(r)` does in two timed steps: a new
r-bit working copy written once (`fresh write`: on ordinary pages as the switch allocates it, or `--pages huge`
on 2 MiB pages, bitnest/hugepages.py), then the C++ slice of the int8 codes into it (`slice`, the same memory, now
written). Each round frees the copies before the next (small pages: later rounds may reuse what glibc kept; huge
pages are unmapped and mapped afresh). The first round is what a first switch pays: run it once per page kind,
each in a fresh process. Prints a table; nothing is written.
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
from speed import CACHE, threads  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(CACHE / "tinyllama-1.1b-shape-sliced8"),
                    help="a nested bitnest checkpoint (default: bench/speed.py's 1.1B-shape sliced int8)")
    ap.add_argument("--bits", type=int, default=4, choices=range(1, 8), metavar="1..7")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pages", choices=("small", "huge"), default="small",
                    help="where the copies live: ordinary pages (what a switch uses) or huge pages")
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").exists():
        print(f"error: {args.model} is not a checkpoint folder (run python bench/speed.py --e2e-only once to build it)",
              file=sys.stderr)
        return 2
    threads()
    from bitnest import hugepages, runtime
    from bitnest.errors import BitnestError
    from bitnest.formats.packing import packed_len
    from bitnest.kernels import cpu
    from bitnest.models.hf import load_model
    if not cpu.available():
        print("error: the C++ kernels are not available here", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model, dtype=torch.bfloat16).model
    except BitnestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layers = [m for m in runtime.nested_layers(model).values() if m.bits == 8]
    if not layers:
        print(f"error: {args.model} has no nested int8 layers (a sliced or matquant checkpoint has)", file=sys.stderr)
        return 2
    r, ext = args.bits, cpu.ext()
    rows = []
    for rnd in range(args.rounds):
        fresh = sl = 0.0
        copies = []
        for m in layers:
            K = m.in_features
            t0 = time.perf_counter()
            shape = (m.qweight.shape[0], packed_len(K, r))
            out = hugepages.empty(shape, torch.uint8) if args.pages == "huge" else torch.empty(shape, dtype=torch.uint8)
            out.fill_(0)  # every page of the copy written once: what the switch's first writes pay
            t1 = time.perf_counter()
            ext.slice_pack(m.qweight, 8, r, K, True, out)
            sl += time.perf_counter() - t1
            fresh += t1 - t0
            copies.append(out)
        nbytes = sum(c.numel() for c in copies)
        del copies, out
        rows.append(dict(round=rnd + 1, mib=nbytes / 2**20, fresh_ms=fresh * 1e3, slice_ms=sl * 1e3,
                         fresh_gbs=nbytes / fresh / 1e9, slice_gbs=(nbytes * 8 / r) / sl / 1e9))
    print(f"{args.model}: {len(layers)} nested layers, int8 → int{r} working copies, "
          f"copies on {args.pages} pages (huge pages {'available' if hugepages.supported() else 'not available'})\n")
    print(fmt_table(rows, [("round", "round", ""), ("mib", "copies MiB", ".0f"), ("fresh_ms", "fresh write ms", ".0f"),
                           ("fresh_gbs", "fresh write GB/s", ".2f"), ("slice_ms", "slice ms", ".0f"),
                           ("slice_gbs", "slice GB/s (codes read)", ".1f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
