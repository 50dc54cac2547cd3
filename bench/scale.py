"""Models larger than RAM: streaming quantization of a synthetic Llama checkpoint bigger than this machine's memory.

Writes a Llama-2-13B-shaped checkpoint (random bf16 weights, written tensor by tensor in chunks: the model is
never in memory) sized so that it is larger than RAM, quantizes it with `bitnest.streaming.quantize_streaming`
(RTN int4 g128, sliced int8) in a fresh subprocess per method, and records the subprocess's peak RSS (VmHWM)
and wall time. The calibrated methods (GPTQ, Matryoshka GPTQ) stream a multi-GB Llama-2-7B-shaped checkpoint
(`--calib-layers` blocks; hours per method at 13B × 43 layers on 2 cores) on random calibration tokens, with
the memory bound of a calibrated stream checked: one block in float32 + one block's calibration inputs and
outputs + GPTQ's working set for the widest layer group (`gptq_working_set`) + 256 MiB. Outputs are deleted after each measurement, the
synthetic checkpoints at the end. Rows of methods not rerun are kept from bench/results/scale.json.

    python bench/scale.py                                   # ≈ 1.1 × RAM, 13B shapes: rtn + sliced; 7B shapes: gptq + matgptq
    python bench/scale.py --methods gptq,matgptq            # the calibrated rows only (the others kept)
    python bench/scale.py --layers 4 --calib-layers 1 --quick   # a small run (no BENCHMARKS.md section)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GiB = 1 << 30
DATA_FREE_BOUND = 4 * GiB  # the bound for RTN / sliced streaming, whatever the model's size
ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def ram_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def llama_tensors(layers: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor of a Llama checkpoint, in HF order (untied lm_head)."""
    hd = hidden // heads
    out = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", [hidden, hidden]), (p + "self_attn.k_proj.weight", [kv_heads * hd, hidden]),
                (p + "self_attn.v_proj.weight", [kv_heads * hd, hidden]), (p + "self_attn.o_proj.weight", [hidden, hidden]),
                (p + "mlp.gate_proj.weight", [inter, hidden]), (p + "mlp.up_proj.weight", [inter, hidden]),
                (p + "mlp.down_proj.weight", [hidden, inter]),
                (p + "input_layernorm.weight", [hidden]), (p + "post_attention_layernorm.weight", [hidden])]
    return out + [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_synthetic_llama(out: Path, *, layers: int, hidden: int, inter: int, vocab: int = 32000, heads: int = 40,
                          kv_heads: int | None = None, shard_bytes: int = 5 * 10**9, seed: int = 0) -> int:
    """A loadable HF Llama directory with random bf16 weights (std 0.02; norms 1), written as safetensors shards
    tensor by tensor in 64 MiB chunks cut from one random pool — memory stays at the pool, whatever the size.
    Returns the bytes on disk."""
    import torch

    kv_heads = kv_heads or heads
    out.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors(layers, hidden, inter, vocab, heads, kv_heads)
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        nb = _numel(shape) * 2
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nb
    shards.append(cur)
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 25, generator=g) * 0.02).to(torch.bfloat16)  # 32M values, 64 MiB
    pool_bytes = pool.view(torch.uint8).numpy()
    chunk = len(pool_bytes) // 2
    n, wmap, total = len(shards), {}, 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nb = _numel(shape) * 2
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + nb]}
            off += nb
            wmap[name] = fname
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for name, shape in shard:
                nb = _numel(shape) * 2
                if name.endswith("norm.weight"):
                    f.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
                    continue
                left = nb
                while left:
                    start = int(torch.randint(0, chunk // 2, (1,), generator=g)) * 2  # an even byte offset
                    take = min(left, chunk)
                    f.write(pool_bytes[start:start + take])
                    left -= take
        total += off
    if n > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return sum(f.stat().st_size for f in out.iterdir())


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def worker(src: str, out: str, method: str, options: str, threads: int) -> None:
    """One streaming quantization in this process; prints {peak_rss, base_rss, seconds} as JSON on the last line."""
    import torch
    torch.set_num_threads(threads)
    from bitnest.streaming import quantize_streaming
    import transformers  # noqa: F401 — counted in the baseline, as it would be in any run

    base = rss()
    kw = json.loads(options)
    if "calib_random" in kw:  # (n, seq, vocab): the synthetic checkpoints have no tokenizer; speed and memory
        n, seq, vocab = kw.pop("calib_random")  # do not depend on which tokens
        kw["calib"] = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    quantize_streaming(src, out, method, progress=False, **kw)
    print(json.dumps({"peak_rss": peak_rss(), "base_rss": base, "seconds": time.perf_counter() - t}))


def measure(src: Path, out: Path, method: str, options: dict, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(src), str(out), method, json.dumps(options), str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{method} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


RUNS = [("rtn", {"bits": 4, "group_size": 128}, "RTN int4 g128"), ("sliced", {"bits": 8}, "sliced int8 (per channel)")]
CALIB_RUNS = [("gptq", {"bits": 4, "group_size": 128}, "GPTQ int4 g128"),
              ("matgptq", {"bits": 4, "group_size": 128}, "Matryoshka GPTQ int8 ⊃ 4/3/2, g128")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/bitnest-scale", help="where the synthetic checkpoint and outputs go")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: enough for ≈ 1.1 × RAM)")
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--inter", type=int, default=13824)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="rtn,sliced,gptq,matgptq")
    ap.add_argument("--calib-layers", type=int, default=4, help="decoder layers of the calibrated methods' checkpoint")
    ap.add_argument("--calib-hidden", type=int, default=4096)
    ap.add_argument("--calib-inter", type=int, default=11008)
    ap.add_argument("--calib-heads", type=int, default=32)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="no BENCHMARKS.md section, no scale.json rows")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    args = ap.parse_args()

    root = Path(args.dir)
    ram = ram_bytes()
    methods = args.methods.split(",")
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    try:
        if any(m in methods for m, _, _ in RUNS):
            rows += data_free_runs(args, root, ram, methods)
        if any(m in methods for m, _, _ in CALIB_RUNS):
            rows += calibrated_runs(args, root, ram, methods)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.quick:
        return
    write_report(rows, ram)


def run_one(src: Path, root: Path, method: str, opts: dict, label: str, threads: int, extra: dict) -> dict:
    out = root / f"out-{method}"
    r = measure(src, out, method, opts, threads)
    out_bytes = sum(f.stat().st_size for f in out.iterdir())
    shutil.rmtree(out)
    row = {"method": method, "label": label, "options": opts, "peak_rss": r["peak_rss"], "base_rss": r["base_rss"],
           "seconds": round(r["seconds"], 1), "out_bytes": out_bytes, "load_avg": round(os.getloadavg()[0], 1),
           "ranks": 1, **extra}
    print(f"{label}: peak RSS {r['peak_rss'] / GiB:.2f} GiB (baseline {r['base_rss'] / GiB:.2f}), "
          f"{r['seconds']:.0f} s, output {out_bytes / 1e9:.2f} GB", flush=True)
    return row


def gptq_working_set(h: int, inter: int, copies: int = 5) -> int:
    """Bytes GPTQ holds while solving its widest group of a Llama block, counted off methods/gptq.py: ≤ `copies`
    float32 copies of the group's stacked weights (plain GPTQ 5: the concatenation, the clone, the permuted copy, the
    transposed one, the codes; Matryoshka GPTQ's per-width loop K + 3: the concatenation, the permuted copy while the
    K transposed copies are made, the codes) and ≤ 5 (in, in) float32 matrices (H, its permuted copies, the Cholesky
    factors). Groups: q/k/v (≤ 3h × h), o (h × h), gate/up (2·inter × h), down (h × inter)."""
    groups = [(3 * h, h), (h, h), (2 * inter, h), (h, inter)]
    return max(4 * (copies * rows * cols + 5 * cols * cols) for rows, cols in groups)


def weight_copies(method: str, opts: dict) -> int:
    """The float32 copies of a group's weights `method` run with `opts` holds at once (gptq_working_set)."""
    if method != "matgptq":
        return 5
    from bitnest.methods.gptq import MatGPTQConfig
    cfg = MatGPTQConfig(**opts)
    return 5 if cfg.compensation == "shared" else len(cfg.precisions) + 3


def calibrated_runs(args, root: Path, ram: int, methods: list[str]) -> list[dict]:
    """GPTQ-family streaming on a multi-GB 7B-shaped checkpoint: peak RSS against the calibrated stream's bound."""
    h, inter, L = args.calib_hidden, args.calib_inter, args.calib_layers
    src = root / "src-calib"
    t = time.perf_counter()
    model_bytes = write_synthetic_llama(src, layers=L, hidden=h, inter=inter, vocab=args.vocab, heads=args.calib_heads)
    print(f"wrote {src}: {L} layers of hidden {h}, {model_bytes / 1e9:.1f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    block_fp32 = 4 * (4 * h * h + 3 * h * inter)
    acts = args.n_calib * args.calib_len * h * 4
    rows = []
    for method, opts, label in CALIB_RUNS:
        if method not in methods:
            continue
        stats = gptq_working_set(h, inter, weight_copies(method, opts))
        o = {**opts, "n_calib": args.n_calib, "calib_len": args.calib_len}
        row = run_one(src, root, method, {**o, "calib_random": [args.n_calib, args.calib_len, args.vocab]}, label,
                      args.threads, {"model_bytes": model_bytes, "ram_bytes": ram, "layers": L, "hidden": h,
                                     "intermediate": inter, "block_fp32_bytes": block_fp32, "calib_act_bytes": acts,
                                     "stats_bytes": stats, "model": f"7B shapes, {L} layers"})
        row["options"] = o
        row["bound"] = row["base_rss"] + block_fp32 + 2 * acts + stats + (256 << 20)
        row["within_bound"] = row["peak_rss"] <= row["bound"]
        rows.append(row)
    return rows


def data_free_runs(args, root: Path, ram: int, methods: list[str]) -> list[dict]:
    per_layer = 2 * (4 * args.hidden ** 2 + 3 * args.hidden * args.inter)
    emb = 2 * 2 * args.vocab * args.hidden
    layers = args.layers or int((1.1 * ram - emb) // per_layer) + 1
    size = layers * per_layer + emb
    biggest_out = size  # sliced int8 ≈ half of bf16; RTN int4 a quarter — a generous bound
    free = shutil.disk_usage(root.parent if not root.exists() else root).free
    if size + biggest_out // 2 + 5 * 10**9 > free:
        raise SystemExit(f"not enough disk: {size / 1e9:.1f} GB input + {biggest_out / 2e9:.1f} GB output + 5 GB spare "
                         f"> {free / 1e9:.1f} GB free")
    src = root / "src"
    t = time.perf_counter()
    model_bytes = write_synthetic_llama(src, layers=layers, hidden=args.hidden, inter=args.inter, vocab=args.vocab,
                                        heads=args.heads)
    print(f"wrote {src}: {layers} layers, {model_bytes / 1e9:.1f} GB ({model_bytes / ram:.2f} × RAM) "
          f"in {time.perf_counter() - t:.0f} s", flush=True)
    block_fp32 = 2 * per_layer
    rows = []
    for method, opts, label in RUNS:
        if method in methods:
            rows.append(run_one(src, root, method, opts, label, args.threads,
                                {"model_bytes": model_bytes, "ram_bytes": ram, "layers": layers, "hidden": args.hidden,
                                 "intermediate": args.inter, "block_fp32_bytes": block_fp32,
                                 "model": f"13B shapes, {layers} layers"}))
    shutil.rmtree(src, ignore_errors=True)
    return rows


def write_report(rows: list[dict], ram: int) -> None:
    from common import RESULTS, fmt_table, header, write_json, write_section

    old = RESULTS / "scale.json"
    rerun = {r["method"] for r in rows}
    kept = [r for r in json.loads(old.read_text())] if old.is_file() else []
    kept = [r for r in kept if r["method"] not in rerun]
    for r in kept:
        r.setdefault("model", f"13B shapes, {r['layers']} layers")
    rows = sorted(kept + rows, key=lambda r: [m for m, _, _ in RUNS + CALIB_RUNS].index(r["method"]))
    write_json("scale.json", rows)
    for r in rows:
        r["peak_gib"], r["in_gb"], r["out_gb"] = r["peak_rss"] / GiB, r["model_bytes"] / 1e9, r["out_bytes"] / 1e9
        r["x_ram"] = r["model_bytes"] / r["ram_bytes"]
        bound = r.get("bound", DATA_FREE_BOUND)  # calibrated rows carry their own (calibrated_runs)
        r["bound_gib"] = f"{bound / GiB:.2f} " + ("✓" if r["peak_rss"] <= bound else "✗")
    big = next((r for r in rows if r["method"] in ("rtn", "sliced")), None)
    cal = next((r for r in rows if "calib_act_bytes" in r), None)
    note = "Synthetic Llama checkpoints (random bf16 weights, vocab 32000). "
    if big:
        note += (f"Data-free rows: Llama-2-13B shapes (hidden {big['hidden']}, intermediate {big['intermediate']}, "
                 f"{big['layers']} layers), {big['model_bytes'] / 1e9:.1f} GB on disk on a machine with "
                 f"{ram / GiB:.1f} GiB of RAM ({big['x_ram']:.2f} × RAM): the in-memory path cannot load it (it would "
                 f"need {2 * big['model_bytes'] / GiB:.0f} GiB in float32); one tensor read at a time, one block in float32 "
                 f"is {big['block_fp32_bytes'] / GiB:.2f} GiB; bound: {DATA_FREE_BOUND / GiB:.0f} GiB. ")
    if cal:
        note += (f"Calibrated rows: Llama-2-7B shapes (hidden {cal['hidden']}, intermediate {cal['intermediate']}, "
                 f"{cal['layers']} layers), {cal['model_bytes'] / 1e9:.1f} GB on disk, {cal['options']['n_calib']} × "
                 f"{cal['options']['calib_len']} random calibration tokens, one block at a time through the method's own "
                 f"block loop; bound = baseline RSS + one block in float32 ({cal['block_fp32_bytes'] / GiB:.2f} GiB) + the "
                 f"block's calibration inputs and outputs ({2 * cal['calib_act_bytes'] / GiB:.2f} GiB) + GPTQ's working "
                 f"set for the widest layer group ({cal['stats_bytes'] / GiB:.2f} GiB for the first calibrated row: ≤ 5 float32 "
                 "copies of the group's weights (Matryoshka GPTQ's per-width loop: widths + 3) and ≤ 5 (in, in) matrices, "
                 "counted off methods/gptq.py; it grows with the layer width, so it is "
                 "not a fixed overhead) + 256 MiB. ")
    note += ("Peak RSS is the worker process's VmHWM (torch + transformers included). One process, 2 threads; "
             "1-minute load average at the end of each run: "
             f"{', '.join(str(r.get('load_avg', '?')) for r in rows)} (above {os.cpu_count()}: the machine was shared, "
             "the seconds are pessimistic; the peak RSS is not affected).\n")
    table = fmt_table(rows, [("label", "method", ""), ("model", "model", ""), ("in_gb", "input GB", ".1f"),
                             ("out_gb", "output GB", ".2f"), ("peak_gib", "peak RSS GiB", ".2f"),
                             ("bound_gib", "bound GiB", ""), ("seconds", "seconds", ".0f")])
    write_section("scale", header("Models larger than RAM: streaming quantization", note) + "\n" + table)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6], int(sys.argv[6]))
    else:
        main()
