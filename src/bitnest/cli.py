"""`bitnest` command line: quantize | eval | generate | serve | slice | info | export | report | methods | demo.

Every user error ends as one line on stderr (`bitnest: error: ...`) and exit status 2; nothing is left
half-written (checkpoints are written to a temporary directory and renamed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise SystemExit(_fail(f"{self.prog}: {message} (see --help)"))


def _fail(msg: str) -> int:
    print(f"bitnest: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def group_size(s: str) -> int | None:
    """'channel' (None), 'tensor' (-1 inside bitnest) or N > 0. A bare -1 is refused: GPTQ tools mean "per
    channel" by it, bitnest's own configs "per tensor" — the word says which one the user wants."""
    if s in ("channel", "none", "None"):
        return None
    if s == "tensor":
        return -1
    try:
        g = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be 'channel', 'tensor' or a positive integer, got {s!r}")
    if g == -1:
        raise argparse.ArgumentTypeError("group size -1 is ambiguous (GPTQ tools mean per channel by it, bitnest's "
                                         "configs per tensor): pass 'channel' or 'tensor'")
    if g <= 0:
        raise argparse.ArgumentTypeError(f"group size must be 'channel', 'tensor' or a positive integer, got {g}")
    return g


def ctx_arg(s: str) -> int:
    """--ctx: a window of at least 2 tokens (the model's position limit is checked once it is loaded)."""
    try:
        n = int(s)
    except ValueError:
        n = None
    if n is None or n < 2:
        raise argparse.ArgumentTypeError(f"ctx must be an integer of at least 2 tokens, got {s!r}")
    return n


def bits_arg(s: str):
    """--bits: one width (4) or, for matquant, the precisions trained together (8,4,2)."""
    try:
        parts = [int(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer or a comma-separated list like 8,4,2, got {s!r}")
    if not parts:
        raise argparse.ArgumentTypeError(f"bits must be an integer or a comma-separated list like 8,4,2, got {s!r}")
    return parts[0] if len(parts) == 1 and "," not in s else tuple(parts)


def targets(s: str):
    parts = [p.strip() for p in s.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _model_arg(args) -> str:
    from .paths import default_model
    return args.model or str(default_model(args.data_dir))


def _add_common(p, model_required=False):
    p.add_argument("--model", required=model_required, help="HF model directory, hub id, llama2.c .bin or bitnest checkpoint (default: ref-10m from the data dir)")
    p.add_argument("--data-dir", help="directory holding data/ and models/ (default: $BITNEST_DATA_DIR or ../shared beside the checkout)")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickle (.bin) weights — only for files you trust")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="bitnest", description="Quantize Hugging Face causal LMs and measure what it cost.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model and write a packed checkpoint")
    _add_common(q)
    q.add_argument("--method", default="rtn")
    q.add_argument("--bits", type=bits_arg, help="bits per weight (default 4; sliced: the width served, the checkpoint keeps int8; "
                   "matquant/matgptq: the precisions R optimized together, e.g. 8,4,2)")
    # SUPPRESS: options not given keep the method's own defaults (nf/log: groups of 64, share: per tensor)
    q.add_argument("--group-size", type=group_size, default=argparse.SUPPRESS,
                   help="'channel', 'tensor' or a positive N inputs per group (default: the method's, usually per channel)")
    q.add_argument("--symmetric", action="store_true", default=argparse.SUPPRESS)
    q.add_argument("--targets", type=targets, default=None, help="all (default; matquant: ffn) | ffn | attn | comma-separated globs over module names")
    q.add_argument("--flavour", choices=("qat", "omniquant"), help="matquant: end-to-end QAT (default) or block-wise OmniQuant")
    q.add_argument("--lambdas", help="matquant/matgptq: loss weight per precision, in the order of --bits (default matquant 0.1,...,0.1,1; matgptq 2 for each but the narrowest, 1 for it, e.g. 2,2,2,1)")
    q.add_argument("--codistill", help="matquant: co-distillation in the paper's notation, e.g. \"[8,4,2,8→2]\" or \"[8,4,2,8->4;2]\"")
    q.add_argument("--calib-data", help="calibrated methods (gptq, matgptq, clip, omniquant, …): c4 (training rows), self "
                   "(sequences sampled from the model: no corpus, its own domain) or any .txt/.jsonl file (default: c4 "
                   "when the tokenizer is found, else self)")
    q.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any field of the method's config, e.g. -o steps=200 -o init=svd (see `bitnest methods`)")
    q.add_argument("--out", required=True)
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out that holds a checkpoint (refused if it holds other files)")
    q.add_argument("--max-shard-size", default="2GB")
    q.add_argument("--stream", action="store_true", help="models larger than RAM: read one layer (data-free methods) or one "
                   "block (gptq, matgptq, clip, weighted kmeans: calibrated on text; mixed with -o sensitivity=block) at a "
                   "time from the safetensors files, write one shard per block; rerun the same command to resume")

    e = sub.add_parser("eval", help="perplexity, KL/top-1 vs the FP model, bits per weight, bytes")
    _add_common(e)
    e.add_argument("--bits", type=int, help="serve a Matryoshka checkpoint at this many bits")
    e.add_argument("--data", default="wikitext2", help="wikitext2 | c4 (held-out rows 1800-1999) | a .txt/.jsonl file")
    e.add_argument("--ctx", type=ctx_arg, help="window length, 2 up to the model's max positions (default: min(2048, max "
                   "positions); ref-10m was trained at 256)")
    e.add_argument("--tasks", help="zero-shot tasks instead of perplexity, lm-eval conventions, from the data dir: "
                   "comma-separated from piqa, arc_easy, arc_challenge, boolq, winogrande, lambada, openbookqa, copa, "
                   "hellaswag (or default = the first eight, all)")
    e.add_argument("--limit", type=int, help="evaluate only the first N windows (with --tasks: the first N items per task)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--teacher", help="FP model for KL/top-1 (default: the checkpoint's source model; 'none' to skip)")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    sub.add_parser("methods", help="list the registered methods and their options")

    g = sub.add_parser("generate", help="stream a continuation on the fast kernels and print tokens/s; "
                       "--interactive switches precision between prompts")
    _add_common(g)
    g.add_argument("--prompt", help="text to continue (without it, or with --interactive, prompts are read from stdin)")
    g.add_argument("--bits", type=int, help="serve a Matryoshka checkpoint at this width")
    g.add_argument("--budget", type=float, help="Mix'n'Match: serve a Matryoshka checkpoint within this many bits per weight")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the unquantized tensors and activations (default bfloat16)")
    g.add_argument("--interactive", action="store_true",
                   help="read prompts from stdin; ':bits R', ':budget B', ':mix GLOB=R', ':precision', ':quit' switch in memory")
    g.add_argument("--reference", action="store_true", help="compute on the pure-torch reference path (to compare)")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming")

    s = sub.add_parser("slice", help="write a standalone r-bit checkpoint from a Matryoshka checkpoint")
    _add_common(s, model_required=True)
    s.add_argument("--bits", type=int, help="one width for every nested layer")
    s.add_argument("--budget", type=float, help="Mix'n'Match: bits per FFN weight (every stored bit); per-layer widths "
                   "by a greedy search on calibration text, or by --strategy")
    s.add_argument("--strategy", choices=("pyramid", "reverse_pyramid", "increasing", "decreasing", "evo"),
                   help="Mix'n'Match: the paper's layer-wise strategy (with --budget; widths 8/4/2), or evo: an "
                   "evolutionary search (EvoPress-style) on KL to the widest slice")
    s.add_argument("--levels", default="8,6,4,3,2", help="widths the --budget search may use (default 8,6,4,3,2)")
    s.add_argument("--calib-samples", type=int, default=8, help="--budget search: C4 training sequences of 256 tokens (default 8)")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out that holds a checkpoint (refused if it holds other files)")

    i = sub.add_parser("info", help="what a checkpoint holds: method, bits, per-layer bits, size")
    _add_common(i, model_required=True)
    i.add_argument("--json", action="store_true")

    x = sub.add_parser("export", help="write a bitnest checkpoint as GPTQ, compressed-tensors or GGUF (for "
                       "transformers/GPTQModel/vLLM/llama.cpp), at a chosen precision of a Matryoshka checkpoint")
    x.add_argument("--model", required=True, help="a bitnest checkpoint directory")
    x.add_argument("--to", required=True, choices=("gptq", "compressed-tensors", "gguf"))
    x.add_argument("--bits", type=int, help="Matryoshka checkpoint: the width to export")
    x.add_argument("--budget", type=float, help="Matryoshka checkpoint: the Mix'n'Match mix within this many bits/weight")
    x.add_argument("--out", required=True, help="output directory (gptq, compressed-tensors) or .gguf file")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--approximate", action="store_true",
                   help="round real-valued zero points to integers where the format needs them (reports the change)")
    x.add_argument("--gptq-format", choices=("v1", "v2"), default="v1",
                   help="GPTQ zero-point convention: v1 stores z − 1 (AutoGPTQ, transformers), v2 stores z (GPTQModel)")
    x.add_argument("--data-dir")

    r = sub.add_parser("report", help="one HTML page (+ markdown, PNGs, JSON) on checkpoints: quality next to FP, "
                       "perplexity vs bits with the Pareto front, per-layer precision, training curves, speed")
    r.add_argument("ckpts", nargs="+", metavar="CKPT", help="bitnest checkpoints (their source model is the FP row)")
    r.add_argument("--out", required=True, help="directory for report.html, report.md, report.json and the PNGs")
    r.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    r.add_argument("--data", default="wikitext2,c4", help="perplexity datasets, comma-separated (default wikitext2,c4)")
    r.add_argument("--data-dir", help="directory holding data/ (default: $BITNEST_DATA_DIR or ../shared beside the checkout)")
    r.add_argument("--ctx", type=ctx_arg, help="window length (default: min(256, max positions))")
    r.add_argument("--limit", type=int, default=16, help="windows per dataset (default 16)")
    r.add_argument("--budgets", default="3,5", help="Mix'n'Match budgets (bits per weight) shown for Matryoshka checkpoints")
    r.add_argument("--tasks", help="zero-shot tasks to add (as bitnest eval --tasks)")
    r.add_argument("--task-limit", type=int, default=200, help="items per task (default 200)")
    r.add_argument("--speed", action="store_true", help="also measure decode tokens/s (batch 1, greedy)")
    r.add_argument("--no-progress", action="store_true")

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server; a Matryoshka checkpoint serves every precision, "
                       "per request (precision field, NAME@int4) or by load (--policy adaptive)")
    _add_common(v)
    v.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--policy", choices=("fixed", "adaptive"), default="fixed",
                   help="precision for requests that name none: fixed (--precision) or adaptive (by load)")
    v.add_argument("--precision", help="the fixed policy's precision (default: the width the checkpoint was saved to serve, as bitnest generate serves it), e.g. int4 or mix-3.5")
    v.add_argument("--ladder", help="adaptive: precisions from widest to narrowest, e.g. 8,4,2; default auto: the parent and "
                   "every narrower width measured faster on a batched decode step at start-up")
    v.add_argument("--slo-ms", type=float, help="adaptive: p90 time-to-first-token target; above it precision steps down")
    v.add_argument("--max-queue", type=int, default=8, help="adaptive: waiting + running requests above which precision steps down")
    v.add_argument("--max-memory-mb", type=float, help="adaptive: process RSS above which precision steps down")
    v.add_argument("--budgets", default="", help="Mix'n'Match budgets (bits/weight) listed as NAME@mix-B, e.g. 3,5")
    v.add_argument("--max-batch", type=int, default=16, help="rows decoded together (continuous batching)")
    v.add_argument("--cache-slices", action="store_true",
                   help="keep every width built so far in memory (switching is free; memory c + Σr bits/weight)")
    v.add_argument("--api-key", default=os.environ.get("BITNEST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default $BITNEST_API_KEY; none: open)")
    v.add_argument("--served-model-name", help="the model id in /v1/models (default: the checkpoint folder's name)")
    v.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")

    d = sub.add_parser("demo", help="quantize the default model at several precisions and print the table")
    _add_common(d)
    d.add_argument("--out", default="runs/demo", help="where the Matryoshka checkpoint is saved")
    d.add_argument("--ctx", type=ctx_arg, default=256)
    d.add_argument("--limit", type=int, default=64, help="windows per dataset (default 64: the demo takes about 6 minutes on 2 cores)")
    d.add_argument("--matquant-steps", type=int, default=24,
                   help="QAT steps (4 × ctx tokens each) for the MatQuant rows; 0 leaves them out")
    d.add_argument("--onebit-steps", type=int, default=48,
                   help="distillation steps (4 × ctx tokens each) for the OneBit row; 0 leaves it out")
    d.add_argument("--onebit-ckpt", help="a saved bitnest OneBit checkpoint to show instead of a short run")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        _quiet_libraries()
        from . import commands
        return getattr(commands, f"cmd_{args.cmd}")(args) or 0
    except KeyboardInterrupt:
        print("bitnest: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — the CLI's contract: one line, never a traceback
        from .errors import BitnestError
        if os.environ.get("BITNEST_DEBUG"):
            raise
        if isinstance(e, BitnestError):
            return _fail(str(e))
        first = (str(e).splitlines() or [""])[0][:300]
        print(f"bitnest: internal error: {type(e).__name__}: {first} (set BITNEST_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
