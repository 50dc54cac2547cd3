"""Models larger than RAM: streaming quantization of a synthetic Llama checkpoint bigger than this machine's memory.

Writes a Llama-2-13B-shaped checkpoint (random bf16 weights, written tensor by tensor in chunks: the model is
never in memory) sized so that it is larger than RAM, quantizes it with `bitnest.streaming.quantize_streaming`
(RTN int4 g128, sliced int8) in a fresh subprocess per method, and records the subprocess's peak RSS (VmHWM)
and wall time. Outputs are deleted after each measurement, the synthetic checkpoint at the end.

    python bench/scale.py                      # ≈ 1.1 × RAM, 13B shapes, rtn + sliced
    python bench/scale.py --layers 4 --quick   # a small run (no BENCHMARKS.md section)
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
    t = time.perf_counter()
    quantize_streaming(src, out, method, progress=False, **json.loads(options))
    print(json.dumps({"peak_rss": peak_rss(), "base_rss": base, "seconds": time.perf_counter() - t}))


def measure(src: Path, out: Path, method: str, options: dict, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(src), str(out), method, json.dumps(options), str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{method} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


RUNS = [("rtn", {"bits": 4, "group_size": 128}, "RTN int4 g128"), ("sliced", {"bits": 8}, "sliced int8 (per channel)")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/bitnest-scale", help="where the synthetic checkpoint and outputs go")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: enough for ≈ 1.1 × RAM)")
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--inter", type=int, default=13824)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="rtn,sliced")
    ap.add_argument("--quick", action="store_true", help="no BENCHMARKS.md section, no scale.json rows")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    args = ap.parse_args()

    root = Path(args.dir)
    ram = ram_bytes()
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
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    model_bytes = write_synthetic_llama(src, layers=layers, hidden=args.hidden, inter=args.inter, vocab=args.vocab,
                                        heads=args.heads)
    print(f"wrote {src}: {layers} layers, {model_bytes / 1e9:.1f} GB ({model_bytes / ram:.2f} × RAM) "
          f"in {time.perf_counter() - t:.0f} s", flush=True)
    block_fp32 = 2 * per_layer
    rows = []
    try:
        for method, opts, label in RUNS:
            if method not in args.methods.split(","):
                continue
            out = root / f"out-{method}"
            r = measure(src, out, method, opts, args.threads)
            out_bytes = sum(f.stat().st_size for f in out.iterdir())
            shutil.rmtree(out)
            row = {"method": method, "label": label, "options": opts, "model_bytes": model_bytes, "ram_bytes": ram,
                   "peak_rss": r["peak_rss"], "base_rss": r["base_rss"], "seconds": round(r["seconds"], 1),
                   "out_bytes": out_bytes, "layers": layers, "hidden": args.hidden, "intermediate": args.inter,
                   "block_fp32_bytes": block_fp32, "load_avg": round(os.getloadavg()[0], 1), "ranks": 1}
            rows.append(row)
            print(f"{label}: peak RSS {r['peak_rss'] / GiB:.2f} GiB (baseline {r['base_rss'] / GiB:.2f}), "
                  f"{r['seconds']:.0f} s, output {out_bytes / 1e9:.1f} GB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.quick:
        return
    from common import fmt_table, header, write_json, write_section

    write_json("scale.json", rows)
    for r in rows:
        r["peak_gib"], r["in_gb"], r["out_gb"] = r["peak_rss"] / GiB, r["model_bytes"] / 1e9, r["out_bytes"] / 1e9
    note = (f"Synthetic Llama-2-13B-shaped checkpoint (hidden {args.hidden}, intermediate {args.inter}, {layers} layers, "
            f"vocab {args.vocab}, random bf16), {model_bytes / 1e9:.1f} GB on disk on a machine with "
            f"{ram / GiB:.1f} GiB of RAM ({model_bytes / ram:.2f} × RAM): the in-memory path cannot load it (it would need "
            f"{2 * model_bytes / GiB:.0f} GiB in float32). `bitnest quantize --stream` / `quantize_streaming` reads one "
            f"tensor at a time and writes one shard per block; one block in float32 is {block_fp32 / GiB:.2f} GiB. Peak "
            "RSS is the worker process's VmHWM (torch + transformers included). One process, "
            f"{args.threads} threads; 1-minute load average at the end of each run: "
            f"{', '.join(str(r['load_avg']) for r in rows)} (above {os.cpu_count()}: the machine was shared, the "
            "seconds are pessimistic; the peak RSS is not affected).\n")
    table = fmt_table(rows, [("label", "method", ""), ("in_gb", "input GB", ".1f"), ("out_gb", "output GB", ".1f"),
                             ("peak_gib", "peak RSS GiB", ".2f"), ("seconds", "seconds", ".0f")])
    write_section("scale", header("Models larger than RAM: streaming quantization", note) + "\n" + table)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6], int(sys.argv[6]))
    else:
        main()
