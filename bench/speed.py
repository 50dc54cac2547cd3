"""Speed: packed layers and whole models, every figure a ratio measured side by side in the same run.

    python bench/speed.py                    # layers + end to end (≈ 25 min on 2 cores); writes BENCHMARKS.md
    python bench/speed.py --quick            # one shape, fewer repeats, ref-10m only (≈ 3 min; --no-write implied)
    python bench/speed.py --layers-only | --e2e-only

Layers (out × in = 4096×4096, 11008×4096, 4096×11008; batch 1, 16 and a 512-token prefill): fp32 and bf16
F.linear, every bitnest format with fp32 and bf16 activations, and the peers that run on this CPU (torch's own
int8/int4 weight-only ops with bf16 activations, torchao Int8WeightOnly and IntxWeightOnly, HQQ, optimum-quanto;
llama.cpp is not installed here). Each row's time is the median over interleaved repeats (every row once per
repeat, in a shuffled order, as a burst of back-to-back calls whose first is not timed: see time_rows). At batch 1
and 16 every row cycles through copies of its weight totalling ≥ 256 MB, so each call reads its weight from memory
as a decoding model does (a 16 MB weight would otherwise sit in the 32 MB L3);
`speedup_fp32` = fp32 F.linear time ÷ the row's time, and at batch 1 the row's fraction of the roofline, its
weight bytes ÷ the machine's measured read bandwidth. bitnest's copies hold their packed codes on 2 MiB pages, as
its loader places them (bitnest/hugepages.py); fp32/bf16 weights and the peers' live where torch allocates them
(4 KiB pages where THP is `madvise`): the fp32 weight on huge pages ran 1.00× its time (geometric mean of 5
interleaved A/B runs, bench/kernel_ab.py --pages both). THP_MEM_ALLOC_ENABLE=1 is not used: it puts every
temporary of ≥ 2 MiB on fresh huge pages too, and the prefill tiles then pay a page clear per call.

End to end (ref-10m and a synthetic Llama of TinyLlama-1.1B shape, random weights): greedy decode of 128 tokens
at batch 1 (tokens/s after the first) and a 512-token prefill, each format in its own fresh process (so RSS is its
own), two interleaved rounds, the mean of the two. Quantized rows keep the unquantized tensors in bf16 (the
serving dtype). Peak RSS after loading is compared with the bytes the model holds (packed codes + scales + the
unquantized tensors); growth = RSS after loading − RSS before it (torch and transformers alone take ≈ 0.4 GB).
The run-time switch: a nested int8 checkpoint loaded once, switched 8 → 4 → 2 → 8 in memory, timed, its decode
speed after each switch beside the standalone int-r model's, the bytes read from files during the switches.

The report names the kernels' vector path (`bitnest.kernels.cpu.isa()`); a machine without AVX-512 writes its
own section ("speed-avx2") and JSON file (speed_avx2.json), so the AVX-512 and AVX2 measurements stand side by
side rather than replacing each other.
"""
from __future__ import annotations

import os

os.environ.setdefault("KMP_BLOCKTIME", "0")  # as `import bitnest` does, before torch starts MKL's threads

import argparse
import copy
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, fmt_table, header, machine, write_json, write_section  # noqa: E402

from bitnest import hugepages  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = [1, 16, 512]
COLD_BYTES = 256 << 20
CACHE = ROOT / "runs" / "bench_speed"
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def threads() -> int:
    n = min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------------------------------ bandwidth


def read_bandwidth() -> float:
    """GB/s reading a 1 GiB buffer once (the C++ streaming read, all threads), best of 7."""
    from bitnest.kernels import cpu
    buf = torch.ones(1 << 30, dtype=torch.uint8)
    m = cpu.ext()
    ts = []
    for _ in range(8):
        t = time.perf_counter()
        m.stream_read(buf) if m is not None else buf.sum()
        ts.append(time.perf_counter() - t)
    return buf.numel() / min(ts[1:]) / 1e9


# ------------------------------------------------------------------------------------------ layer formats


def _plain_tensors(t):
    """A tensor, or the plain tensors inside a tensor subclass (torchao, quanto), recursively."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [u for n in names for u in _plain_tensors(getattr(t, n))]
    if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor:
        return _plain_tensors(t.data)
    return [t]


def tensor_bytes(obj) -> int:
    """Bytes of every distinct tensor a module (or tensor) holds, inside tensor subclasses too."""
    ts = [obj] if torch.is_tensor(obj) else [t for t in list(obj.parameters()) + list(obj.buffers()) if t is not None]
    ts = [u for t in ts for u in _plain_tensors(t)]
    seen, total = set(), 0
    for t in ts:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def read_bytes(m) -> int:
    """Bytes a forward reads: the packed view's tensors (a nested layer serving r reads its r-bit copy, not its
    c-bit codes); a peer's whole weight."""
    import dataclasses
    p = getattr(m, "packed", None)
    if p is None:
        return tensor_bytes(m)
    return sum(tensor_bytes(getattr(p, f.name)) for f in dataclasses.fields(p) if torch.is_tensor(getattr(p, f.name)))


def bitnest_formats(W: torch.Tensor) -> dict[str, tuple[torch.nn.Module, dict]]:
    """name -> (module, row metadata) for every bitnest format at this weight."""
    from bitnest.grids.affine import AffineSpec
    from bitnest.grids.codebook import fixed_codebook, nf_levels
    from bitnest.nn.actquant import ActQuantLinear
    from bitnest.nn.codebook import CodebookLinear
    from bitnest.nn.intlinear import IntLinear
    from bitnest.nn.onebit import PackedSignLinear
    from bitnest.nn.qlinear import QuantLinear
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W
    out = {}

    def q(name, bits, group, fmt=None, sym=False, **meta):
        out[name] = (QuantLinear.from_linear(lin, AffineSpec(bits, group, sym)),
                     dict(format=fmt or f"int{bits}", group_size=group or "channel", bits=bits, **meta))

    q("int8", 8, None)
    q("int4", 4, None)
    q("int4 g128", 4, 128)
    q("int3", 3, None)
    q("int3 g128", 3, 128)
    q("int2", 2, None)
    q("int2 g64", 2, 64)
    nested = QuantLinear.from_linear(lin, AffineSpec(8, None, False))
    nested.set_serve_bits(4)  # a Matryoshka int8 layer serving its int4 slice (working copy: 4 bits)
    out["int8→int4 (nested)"] = (nested, dict(format="int4", group_size="channel", bits=4, nested=True))
    absw = W.abs()
    out["onebit"] = (PackedSignLinear.from_parts(W, absw.mean(0), absw.mean(1), post_ln=True),
                     dict(format="onebit", group_size="channel", bits=1))
    codes, s, table = fixed_codebook(W, nf_levels(4), 64)
    out["nf4 g64 (codebook)"] = (CodebookLinear.from_codes(codes, table, s, bits=4, group_size=64, codebook="nf"),
                                 dict(format="codebook4", group_size=64, bits=4))
    out["W8A8 dynamic"] = (ActQuantLinear.wrap(QuantLinear.from_linear(lin, AffineSpec(8, None, True)), 8, "dynamic"),
                           dict(format="w8a8", group_size="channel", bits=8))
    out["int8 integer-only"] = (IntLinear.from_linear(lin, 0.05, torch.full((W.shape[0],), 0.05)),
                                dict(format="intlinear", group_size="channel", bits=8))
    return out


class TorchInt8(torch.nn.Module):
    """torch's own int8 weight-only CPU op (per-channel symmetric), bf16 activations."""

    def __init__(self, W):
        super().__init__()
        s = W.abs().amax(1) / 127
        self.register_buffer("w", torch.round(W / s[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("s", s.to(torch.bfloat16))

    def forward(self, x):
        return torch._weight_int8pack_mm(x.to(torch.bfloat16).reshape(-1, x.shape[-1]), self.w, self.s)


class TorchInt4(torch.nn.Module):
    """torch's own int4 weight-only CPU op (groups of 128, asymmetric), bf16 activations."""

    def __init__(self, W, group=128):
        super().__init__()
        N, K = W.shape
        Wg = W.reshape(N, K // group, group)
        lo, hi = Wg.amin(-1), Wg.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = torch.round((Wg - lo[..., None]) / scale[..., None]).clamp(0, 15).reshape(N, K).to(torch.int32)
        self.register_buffer("w", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        # torch's convention: ŵ = (q − 8) · scale + zero
        sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous()  # (K/group, N, 2)
        self.register_buffer("sz", sz.to(torch.bfloat16))
        self.group = group

    def forward(self, x):
        return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).reshape(-1, x.shape[-1]), self.w, self.group, self.sz)


def peer_formats(W: torch.Tensor) -> dict[str, tuple[torch.nn.Module, dict]]:
    """name -> (factory, metadata) for the peers that install and run on this CPU; a failing peer is reported."""
    out, notes = {}, []

    def add(name, make, **meta):
        try:
            make()  # fails here, not inside the timing loop
            out[name] = (make, meta)  # a factory: tensor-subclass peers do not deep-copy, so copies are re-made
        except Exception as e:  # noqa: BLE001
            notes.append(f"{name}: {str(e).splitlines()[0][:120]}")

    def lin(dtype=torch.bfloat16):
        m = torch.nn.Sequential(torch.nn.Linear(W.shape[1], W.shape[0], bias=False))
        m[0].weight.data = W.clone()
        return m.to(dtype)

    add("torch int8 (bf16 act)", lambda: TorchInt8(W), library="torch", format="int8", group_size="channel", bits=8, act="bf16")
    add("torch int4 g128 (bf16 act)", lambda: TorchInt4(W), library="torch", format="int4", group_size=128, bits=4, act="bf16")

    def torchao(cfg_name):
        from torchao.quantization import quantize_
        import torchao.quantization as tq
        m = lin()
        if cfg_name == "int8":
            quantize_(m, tq.Int8WeightOnlyConfig())
        else:
            from torchao.quantization.granularity import PerGroup
            quantize_(m, tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128)))
        return m
    add("torchao Int8WeightOnly", lambda: torchao("int8"), library="torchao", format="int8", group_size="channel", bits=8, act="bf16")
    add("torchao IntxWeightOnly int4 g128", lambda: torchao("intx4"), library="torchao", format="int4", group_size=128, bits=4, act="bf16")

    def hqq():
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
        HQQLinear.set_backend(HQQBackend.PYTORCH)
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W.clone()
        return HQQLinear(layer, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.bfloat16, device="cpu")
    add("HQQ int4 g64", hqq, library="hqq", format="int4", group_size=64, bits=4, act="bf16")

    def quanto(bits):
        from optimum.quanto import freeze, qint2, qint4, qint8, quantize
        m = lin()
        quantize(m, weights={8: qint8, 4: qint4, 2: qint2}[bits])
        freeze(m)
        return m
    add("quanto qint8", lambda: quanto(8), library="optimum-quanto", format="int8", group_size="channel", bits=8, act="bf16")
    add("quanto qint4", lambda: quanto(4), library="optimum-quanto", format="int4", group_size=128, bits=4, act="bf16")
    return out, notes


# ------------------------------------------------------------------------------------------ layer bench


def time_rows(rows: list[dict], reps: int, burst: int = 1) -> None:
    """Interleaved repeats: every row once per repeat, rows in a shuffled order (seeded by the repeat), each row a
    burst of `burst` back-to-back calls on successive (cold) copies of its weight, the first call of a burst not
    timed; row['us'] = the median over all timed calls.

    Why bursts: a row's first call after a different kind of work measured what ran before it, not the row — the
    same int8 kernel took 20–40 % longer right after bf16 F.linear than one row later (the OpenMP worker falls
    asleep while single-threaded work runs and the next parallel region pays its wake-up; GOMP_SPINCOUNT=1e8
    removed most of the gap). In a model, layers run back to back, as in a burst; the shuffled order keeps any
    remaining neighbour effect off a fixed row."""
    import random
    with torch.inference_mode():
        for r in rows:  # warm-up: every copy once (kernel builds, first-use work, page faults)
            for i in range(r["copies"]):
                r["fn"](i)
        times = {id(r): [] for r in rows}
        for rep in range(reps):
            order = list(rows)
            random.Random(rep).shuffle(order)
            for r in order:
                for j in range(burst):
                    t = time.perf_counter()
                    r["fn"](rep * burst + j)
                    if j or burst == 1:
                        times[id(r)].append(time.perf_counter() - t)
    for r in rows:
        r["us"] = statistics.median(times[id(r)]) * 1e6


def copies_for(nbytes: int, batch: int) -> int:
    return max(2, -(-COLD_BYTES // max(nbytes, 1))) if batch <= 16 else 1


def layer_bench(shapes, batches, reps_by_batch, bandwidth: float) -> tuple[list[dict], list[str]]:
    out_rows, notes = [], []
    for (n_out, n_in) in shapes:
        torch.manual_seed(0)
        W = torch.randn(n_out, n_in) * 0.02
        fmts = bitnest_formats(W)
        peers, pnotes = peer_formats(W)
        notes += [f"{n_out}x{n_in}: {n}" for n in pnotes]
        for batch in batches:
            x32 = torch.randn(batch, n_in)
            xs = {"fp32": x32, "bf16": x32.bfloat16()}
            rows = []

            copies = {}  # one set of copies per module, shared by its fp32- and bf16-activation rows

            def add(label, library, fmt, group, bits, act, module, nbytes, make=None, nread=None):
                k = copies_for(nbytes, batch)
                if id(module) not in copies:
                    copies[id(module)] = [module] + [make() if make else copy.deepcopy(module) for _ in range(k - 1)]
                    if library == "bitnest":  # packed codes where bitnest's loader and quantize put them
                        for c in copies[id(module)]:
                            hugepages.place_module(c)
                mods = copies[id(module)]
                x = xs[act]
                shift = len(mods) // 2 if act == "bf16" else 0  # the two rows of a module never read the same copy in a repeat
                rows.append(dict(kind="layer", shape=f"{n_out}x{n_in}", batch=batch, label=label, library=library,
                                 format=fmt, group_size=group, bits=bits, act=act, weight_bytes=nbytes, copies=k,
                                 read_bytes=nread or nbytes,
                                 fn=lambda i, mods=mods, x=x, shift=shift: mods[(i + shift) % len(mods)](x)))

            W32, W16 = W, W.bfloat16()
            k32 = copies_for(W32.numel() * 4, batch)
            w32s = [W32] + [W32.clone() for _ in range(k32 - 1)]
            w16s = [W16] + [W16.clone() for _ in range(copies_for(W16.numel() * 2, batch) - 1)]
            rows.append(dict(kind="layer", shape=f"{n_out}x{n_in}", batch=batch, label="fp32 F.linear", library="torch",
                             format="fp32", group_size=None, bits=32, act="fp32", weight_bytes=W32.numel() * 4,
                             read_bytes=W32.numel() * 4,
                             copies=len(w32s), fn=lambda i: F.linear(xs["fp32"], w32s[i % len(w32s)])))
            rows.append(dict(kind="layer", shape=f"{n_out}x{n_in}", batch=batch, label="bf16 F.linear", library="torch",
                             format="bf16", group_size=None, bits=16, act="bf16", weight_bytes=W16.numel() * 2,
                             read_bytes=W16.numel() * 2,
                             copies=len(w16s), fn=lambda i: F.linear(xs["bf16"], w16s[i % len(w16s)])))
            for name, (m, meta) in fmts.items():
                for act in ("fp32", "bf16"):
                    add(f"bitnest {name} ({act} act)", "bitnest", meta["format"], meta["group_size"], meta["bits"], act,
                        m, tensor_bytes(m), nread=read_bytes(m))
            for name, (make, meta) in peers.items():
                m = make()
                add(name, meta["library"], meta["format"], meta["group_size"], meta["bits"], meta["act"], m, tensor_bytes(m), make)
            time_rows(rows, *reps_by_batch[batch])
            fp32 = next(r["us"] for r in rows if r["label"] == "fp32 F.linear")
            bf16 = next(r["us"] for r in rows if r["label"] == "bf16 F.linear")
            for r in rows:
                r.pop("fn")
                r["speedup_fp32"], r["speedup_bf16"] = fp32 / r["us"], bf16 / r["us"]
                if batch == 1:
                    r["roofline_fraction"] = r["read_bytes"] / (bandwidth * 1e3) / r["us"]
                r["peak_rss"] = None
            out_rows += rows
            _print_layer(rows)
            gc.collect()
    return out_rows, notes


def _print_layer(rows):
    r0 = rows[0]
    print(f"\n{r0['shape']} batch {r0['batch']}")
    for r in rows:
        roof = f"  roof {r['roofline_fraction']:.2f}" if "roofline_fraction" in r else ""
        print(f"  {r['label']:<44}{r['us']:>10.0f} us  x{r['speedup_fp32']:6.2f} fp32  x{r['speedup_bf16']:5.2f} bf16"
              f"  {r['weight_bytes'] / 2**20:7.2f} MiB{roof}")


# ------------------------------------------------------------------------------------------ end to end: checkpoints


def synthetic_dir() -> Path:
    """A TinyLlama-1.1B-shaped Llama with random weights, bf16 safetensors (built once, cached in runs/)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = CACHE / "tinyllama-shape"
    if (d / "config.json").exists():
        return d
    print("building the synthetic 1.1B-shape checkpoint (random weights) ...", flush=True)
    torch.manual_seed(0)
    with torch.device("cpu"):
        cfg = LlamaConfig(**TINYLLAMA, dtype="bfloat16")
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = d.with_name(d.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ROOT.parent / "shared" / "models" / "ref-10m")  # any tokenizer: ids < 8192
    tok.save_pretrained(tmp)
    os.replace(tmp, d)
    return d


def sliced8_checkpoint(src: Path, tag: str) -> Path:
    """The sliced-int8 (nested) checkpoint of `src`, bf16 storage, cached in runs/bench_speed/ (bench/serve.py too)."""
    from bitnest.api import quantization_config, quantize
    from bitnest.formats.checkpoint import save_quantized
    from bitnest.models.hf import load_model
    out = CACHE / f"{tag}-sliced8"
    if not out.exists():
        m = load_model(src)
        quantize(m.model, "sliced", bits=8, progress=False)
        save_quantized(m.model, m.tokenizer, out, quantization_config("sliced", m.model.bitnest_method[1], str(src)),
                       storage_dtype=torch.bfloat16)
        del m
        gc.collect()
    return out


def quantized_checkpoints(src: Path, tag: str) -> dict[str, Path]:
    """sliced int8 (nested), its standalone int4/int3/int2 slices, OneBit (sign + value vectors), cached."""
    from bitnest.api import make_config, quantization_config
    from bitnest.cli import main as cli
    from bitnest.formats.checkpoint import save_quantized
    from bitnest.models.blocks import replace_module, select_linears
    from bitnest.models.hf import load_model
    from bitnest.nn.onebit import PackedSignLinear
    out = {"int8": sliced8_checkpoint(src, tag)}
    for r in (4, 3, 2):
        out[f"int{r}"] = CACHE / f"{tag}-slice{r}"
        if not out[f"int{r}"].exists():
            assert cli(["slice", "--model", str(out["int8"]), "--bits", str(r), "--out", str(out[f"int{r}"]), "--no-progress"]) == 0
    out["onebit"] = CACHE / f"{tag}-onebit"
    if not out["onebit"].exists():
        m = load_model(src)
        cfg = make_config("onebit", post_ln=True)  # the layers below are built with it (the paper's layer)
        for name in select_linears(m.model, "all"):
            W = m.model.get_submodule(name).weight.detach().float()
            absw = W.abs()  # values do not matter for speed: sign + per-row/column mean magnitudes
            replace_module(m.model, name, PackedSignLinear.from_parts(W, absw.mean(0), absw.mean(1), post_ln=True))
        save_quantized(m.model, m.tokenizer, out["onebit"], quantization_config("onebit", cfg, str(src)),
                       storage_dtype=torch.bfloat16)
        del m
        gc.collect()
    return out


# ------------------------------------------------------------------------------------------ end to end: workers


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    vals = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def _io() -> tuple[int, int]:
    """(rchar, read_bytes): bytes read by read syscalls, and bytes fetched from storage (page-ins included)."""
    vals = dict(l.split(":") for l in open("/proc/self/io"))
    return int(vals["rchar"]), int(vals["read_bytes"])


def _io_delta(fn):
    """fn's file reads: the /proc/self/io deltas, less what reading /proc/self/io itself costs."""
    a = _io()
    b = _io()
    overhead = b[0] - a[0]
    out = fn()
    c = _io()
    return out, max(0, c[0] - b[0] - overhead), c[1] - b[1]


def _decode(model, n_new: int, vocab: int) -> dict:
    from bitnest.generate import generate
    prompt = torch.randint(3, min(vocab, 8000), (16,), generator=torch.Generator().manual_seed(0)).tolist()

    class Tok:  # ids in, ids out: speed does not depend on text
        eos_token_id = None

        def decode(self, ids, **kw):
            return ""
    generate(model, Tok(), prompt, max_new_tokens=8, stop_at_eos=False)  # warm-up
    r = generate(model, Tok(), prompt, max_new_tokens=n_new, stop_at_eos=False)
    return {"decode_tok_s": r.decode_tok_s, "decode_seconds": r.seconds - r.prefill_seconds, "new_tokens": r.new_tokens}


@torch.inference_mode()
def _prefill(model, n: int, vocab: int) -> float:
    ids = torch.randint(3, min(vocab, 8000), (1, n), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids[:, :16])  # warm-up
    ts = []
    for _ in range(2):
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        ts.append(time.perf_counter() - t)
    return n / min(ts)


def _import_model_code(path: str) -> None:
    """Build a 1-layer model of the checkpoint's architecture on the meta device: imports every module the real
    load will import (transformers' model classes, and what they import), so RSS growth measures the model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(path)
    cfg.num_hidden_layers = 1
    with init_empty_weights(include_buffers=True):
        AutoModelForCausalLM.from_config(cfg)


def worker(spec: dict) -> dict:
    """One format in a fresh process: load, RSS, decode, prefill (and the switch plan for nested checkpoints)."""
    threads()
    from bitnest import runtime
    from bitnest.models.hf import load_model
    _import_model_code(spec["path"])  # code and libraries are the baseline, not the model's memory
    gc.collect()
    rss0, _ = _rss()
    t0 = time.perf_counter()
    dtype = getattr(torch, spec["dtype"])
    loaded = load_model(spec["path"], dtype=dtype)
    model = loaded.model
    load_s = time.perf_counter() - t0
    if spec.get("budget") is not None:
        model.set_precision(budget=spec["budget"])
    gc.collect()
    rss1, hwm1 = _rss()
    held = runtime.resident_bytes(model)
    res = {"load_seconds": load_s, "rss_before": rss0, "rss_after_load": rss1, "peak_rss": hwm1, "model_bytes": held,
           "rss_growth_ratio": (rss1 - rss0) / held}
    if hasattr(model, "precision") and runtime.nested_layers(model):
        res["bits_per_weight"] = model.precision()["bits_per_weight"]
    quant = [m for m in model.modules() if hasattr(m, "packed")]
    res["packed_bytes"] = sum(runtime.resident_bytes(m) for m in quant)
    vocab = model.config.vocab_size
    res.update(_decode(model, spec["decode"], vocab))
    res["prefill_tok_s"] = _prefill(model, spec["prefill"], vocab)
    if spec.get("switch"):
        sw = []
        for r in spec["switch"]:
            out, rc, rb = _io_delta(lambda: model.set_precision(r, cache=False))
            d = _decode(model, spec["decode"], vocab)
            sw.append({"to": r, "switch_seconds": out["switch_seconds"], "read_bytes_during_switch": rc + rb,
                       "decode_tok_s": d["decode_tok_s"], "resident_bytes": out["resident_bytes"],
                       "bits_per_weight": out["bits_per_weight"]})
        res["switch"] = sw
        # cached widths: switching back to a width built before costs no build
        model.set_precision(4, cache=True)
        model.set_precision(2)
        t = time.perf_counter()
        model.set_precision(4)
        res["cached_switch_seconds"] = time.perf_counter() - t
        res["cached_resident_bytes"] = runtime.resident_bytes(model)
    res["peak_rss"] = _rss()[1]
    if spec.get("side_by_side"):  # after the peak is read: the standalone models below are not the nested model's
        res["side_by_side"] = _side_by_side(model, spec["side_by_side"], spec["decode"], vocab, dtype)
    return res


def _side_by_side(model, paths: dict, n_new: int, vocab: int, dtype, repeats: int = 3) -> list[dict]:
    """The switched model at r against the standalone int-r checkpoint, both in this process, decodes interleaved
    (medians of `repeats`): separate processes differ by more than 15 % from run to run on a shared VM."""
    from bitnest.models.hf import load_model
    out = []
    for r, path in paths.items():
        model.set_precision(int(r), cache=False)
        alone = load_model(path, dtype=dtype).model
        sw, st = [], []
        for _ in range(repeats):
            sw.append(_decode(model, n_new, vocab)["decode_tok_s"])
            st.append(_decode(alone, n_new, vocab)["decode_tok_s"])
        del alone
        gc.collect()
        sw, st = statistics.median(sw), statistics.median(st)
        out.append({"to": int(r), "switched_tok_s": sw, "standalone_tok_s": st, "ratio": sw / st})
    return out


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"worker {spec['label']} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def e2e_bench(models: list[str], decode: int, prefill: int, rounds: int) -> list[dict]:
    rows = []
    for name in models:
        if name == "ref-10m":
            src = ROOT.parent / "shared" / "models" / "ref-10m"
            from bitnest.paths import data_dir
            src = data_dir() / "models" / "ref-10m"
        else:
            src = synthetic_dir()
        cks = quantized_checkpoints(src, name)
        specs = [dict(label="FP32", format="fp32", path=str(src), dtype="float32"),
                 dict(label="BF16", format="bf16", path=str(src), dtype="bfloat16")]
        specs += [dict(label=f"int{r}", format=f"int{r}", path=str(cks[f"int{r}"]), dtype="bfloat16") for r in (8, 4, 3, 2)]
        specs += [dict(label="OneBit", format="onebit", path=str(cks["onebit"]), dtype="bfloat16"),
                  dict(label="Mix'n'Match ≤ 4.0 bits (reverse pyramid 8/4/2)", format="mix", path=str(cks["int8"]),
                       dtype="bfloat16", budget=4.0),
                  dict(label="nested int8, switched 8→4→2→8 in memory", format="switch", path=str(cks["int8"]),
                       dtype="bfloat16", switch=[4, 2, 8],
                       side_by_side={"4": str(cks["int4"]), "2": str(cks["int2"])})]
        results = {s["label"]: [] for s in specs}
        for rnd in range(rounds):
            for s in specs:
                spec = dict(s, decode=decode, prefill=prefill)
                print(f"  {name} round {rnd + 1}: {s['label']} ...", flush=True)
                results[s["label"]].append(run_worker(spec))
        for s in specs:
            rs = results[s["label"]]
            mean = lambda k: statistics.fmean(r[k] for r in rs)  # noqa: E731
            row = dict(kind="e2e", model=name, library="bitnest" if s["format"] not in ("fp32", "bf16") else "torch",
                       format=s["format"], label=s["label"], group_size="channel" if s["format"] not in ("fp32", "bf16") else None,
                       batch=1, tok_s=mean("decode_tok_s"), prefill_tok_s=mean("prefill_tok_s"),
                       peak_rss=max(r["peak_rss"] for r in rs), rss_after_load=mean("rss_after_load"),
                       rss_before=mean("rss_before"), model_bytes=rs[0]["model_bytes"], packed_bytes=rs[0]["packed_bytes"],
                       rss_growth_ratio=mean("rss_growth_ratio"), load_seconds=mean("load_seconds"),
                       bits_per_weight=rs[0].get("bits_per_weight"), rounds=len(rs))
            if s.get("switch"):
                row["switch"] = [dict(to=st["to"], switch_seconds=statistics.fmean(r["switch"][i]["switch_seconds"] for r in rs),
                                      decode_tok_s=statistics.fmean(r["switch"][i]["decode_tok_s"] for r in rs),
                                      read_bytes_during_switch=max(r["switch"][i]["read_bytes_during_switch"] for r in rs),
                                      resident_bytes=rs[0]["switch"][i]["resident_bytes"],
                                      bits_per_weight=rs[0]["switch"][i]["bits_per_weight"])
                                 for i, st in enumerate(rs[0]["switch"])]
                row["cached_switch_seconds"] = mean("cached_switch_seconds")
                if rs[0].get("side_by_side"):
                    row["side_by_side"] = [dict(to=x["to"], **{k: statistics.fmean(r["side_by_side"][i][k] for r in rs)
                                                               for k in ("switched_tok_s", "standalone_tok_s", "ratio")})
                                           for i, x in enumerate(rs[0]["side_by_side"])]
                row["cached_resident_bytes"] = rs[0]["cached_resident_bytes"]
            rows.append(row)
        fp = next(r for r in rows if r["model"] == name and r["format"] == "fp32")
        bf = next(r for r in rows if r["model"] == name and r["format"] == "bf16")
        for r in rows:
            if r["model"] == name:
                r["speedup_fp32"], r["speedup_bf16"] = r["tok_s"] / fp["tok_s"], r["tok_s"] / bf["tok_s"]
                r["prefill_speedup_fp32"] = r["prefill_tok_s"] / fp["prefill_tok_s"]
                r["prefill_speedup_bf16"] = r["prefill_tok_s"] / bf["prefill_tok_s"]
        _print_e2e([r for r in rows if r["model"] == name])
    return rows


def _print_e2e(rows):
    print(f"\n{rows[0]['model']}: decode 128 tokens (batch 1), prefill 512")
    for r in rows:
        print(f"  {r['label']:<48}{r['tok_s']:8.1f} tok/s  x{r['speedup_fp32']:5.2f} fp32  prefill {r['prefill_tok_s']:8.0f} tok/s"
              f"  x{r['prefill_speedup_bf16']:4.2f} bf16  RSS {r['rss_after_load'] / 2**30:5.2f} GiB  growth/held {r['rss_growth_ratio']:.3f}")


# ------------------------------------------------------------------------------------------ checks and report


def checks(layer_rows: list[dict], e2e_rows: list[dict]) -> list[tuple[str, bool, str]]:
    out = []
    L = [r for r in layer_rows if r["shape"] == "4096x4096"]
    if L:
        def t(label, batch):
            return next(r for r in L if r["label"] == label and r["batch"] == batch)
        need = {"int8": 6, "int4": 7, "int3": 8, "int2": 10, "onebit": 12}
        for name, k in need.items():
            r = t(f"bitnest {name} (fp32 act)", 1)
            out.append((f"batch 1, 4096×4096, {name} (fp32 activations) ≥ {k}× fp32 F.linear", r["speedup_fp32"] >= k,
                        f"{r['speedup_fp32']:.2f}×"))
        peers = [r for r in L if r["batch"] == 1 and r["library"] not in ("bitnest",) and r["format"] not in ("fp32", "bf16")]
        mine = [r for r in L if r["batch"] == 1 and r["library"] == "bitnest"]
        worst = []
        for r in mine:
            faster = [p for p in peers if p["bits"] >= r["bits"] and p["us"] < r["us"]]
            if faster:
                worst.append(f"{r['label']} {r['us']:.0f} us vs {min(faster, key=lambda p: p['us'])['label']}")
        best_peer = min(peers, key=lambda p: p["us"]) if peers else None
        out.append(("batch 1: no bitnest format slower than the fastest peer at the same or more bits", not worst,
                    "; ".join(worst) or (f"fastest peer {best_peer['label']} x{best_peer['speedup_fp32']:.2f}" if best_peer else "no peer ran")))
        b16 = [r for r in L if r["batch"] == 16 and r["library"] == "bitnest"]
        slow = [f"{r['label']} x{r['speedup_fp32']:.2f}" for r in b16 if r["speedup_fp32"] < 2]
        out.append(("batch 16: every bitnest format ≥ 2× fp32", not slow, "; ".join(slow) or
                    f"slowest x{min(r['speedup_fp32'] for r in b16):.2f}"))
        pre = [r for r in L if r["batch"] == 512 and r["library"] == "bitnest" and r["act"] == "bf16"]
        slow = [f"{r['label']} {1 / r['speedup_bf16']:.2f}×" for r in pre if 1 / r["speedup_bf16"] > 1.2]
        out.append(("prefill 512 (bf16 activations): no bitnest format slower than 1.2× bf16 F.linear", not slow,
                    "; ".join(slow) or f"slowest {max(1 / r['speedup_bf16'] for r in pre):.2f}×"))
    E = [r for r in e2e_rows if r["model"] == "tinyllama-1.1b-shape"]
    if E:
        g = {r["format"]: r for r in E}
        out.append(("1.1B shape: int4 decode ≥ 4× fp32 tokens/s", g["int4"]["speedup_fp32"] >= 4, f"{g['int4']['speedup_fp32']:.2f}×"))
        out.append(("1.1B shape: int2 decode ≥ 5× fp32 tokens/s", g["int2"]["speedup_fp32"] >= 5, f"{g['int2']['speedup_fp32']:.2f}×"))
        bad = [f"{r['format']} {r['rss_growth_ratio']:.2f}" for r in E if r["format"] not in ("fp32", "bf16") and r["rss_growth_ratio"] > 1.15]
        out.append(("1.1B shape: RSS growth after loading ≤ 1.15 × bytes held (packed + unquantized)", not bad,
                    "; ".join(bad) or f"max {max(r['rss_growth_ratio'] for r in E if r['format'] not in ('fp32', 'bf16')):.3f}"))
        q8 = g["int8"]["packed_bytes"]
        ratios = {r: g[f"int{r}"]["packed_bytes"] / q8 for r in (4, 3, 2)}
        ok = all(abs(v - r / 8) < 0.02 for r, v in ratios.items())
        out.append(("standalone int-r holds ≈ r/8 of int8's packed bytes", ok,
                    ", ".join(f"int{r} {v:.3f} (r/8 = {r / 8:.3f})" for r, v in ratios.items())))
        sw = g["switch"]["switch"]
        slow = [s for s in sw if s["switch_seconds"] >= 1]
        out.append(("run-time switch 8→4→2→8 each < 1 s", not slow, ", ".join(f"→{s['to']} {s['switch_seconds'] * 1e3:.0f} ms" for s in sw)))
        read = max(s["read_bytes_during_switch"] for s in sw)
        out.append(("the switches read nothing from files (read syscalls and storage reads, /proc/self/io)", read == 0, f"{read} bytes"))
        within = [(x["to"], x["ratio"]) for x in g["switch"].get("side_by_side", [])]
        how = "same process, interleaved"
        if not within:  # rows from before the side-by-side measurement: separate processes
            within = [(s["to"], s["decode_tok_s"] / g[f"int{s['to']}"]["tok_s"]) for s in sw if s["to"] in (4, 2)]
            how = "separate processes"
        out.append(("after a switch, decode within 15 % of the standalone int-r model", all(v >= 0.85 for _, v in within),
                    f"{how}: " + ", ".join(f"int{r}: {v:.2f}×" for r, v in within)))
    return out


def isa_tag() -> str:
    """'' on AVX-512 machines (the section and JSON file measured first), '_avx2' etc. elsewhere: a run on a CPU
    with another kernel path gets its own BENCHMARKS.md section and JSON file instead of replacing the other's."""
    from bitnest.kernels import cpu
    return "" if cpu.isa() == "avx512" else f"_{cpu.isa()}"


def _last_run_date(tag: str, out_json: Path) -> str:
    """The date of the run whose rows are in `out_json`: its BENCHMARKS.md section's Date line (a fresh clone
    gives every file today's mtime), else the file's mtime."""
    doc = ROOT / "BENCHMARKS.md"
    name = f"speed{tag.replace('_', '-')}"
    m = re.search(rf"<!-- {re.escape(name)}:start -->.*?Date: (\d{{4}}-\d{{2}}-\d{{2}})", doc.read_text(), re.S) if doc.exists() else None
    return m.group(1) if m else time.strftime("%Y-%m-%d", time.localtime(out_json.stat().st_mtime))


def write_report(bandwidth, layer_rows, e2e_rows, notes, seconds, quick):
    env = ", ".join(f"{k}={os.environ.get(k)}" for k in ("KMP_BLOCKTIME", "OMP_PROC_BIND", "OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE", "BITNEST_HUGEPAGES"))
    from bitnest.kernels import cpu
    tag = isa_tag()
    title = "Speed: packed layers and whole models" + (f" ({tag[1:].upper()} CPU)" if tag else "")
    lines = [header(title, f"Threads: {torch.get_num_threads()} ({env}); run time {seconds / 60:.1f} min."
                    "\n\nWhat is measured and how: see `bench/speed.py`'s docstring. Speed-ups are ratios measured "
                    "side by side in this run (medians over interleaved, shuffled repeats of back-to-back bursts; "
                    "cold weights at batch 1 and 16).")]
    lines.append(f"Machine read bandwidth (C++ streaming read of 1 GiB, both cores): **{bandwidth:.1f} GB/s**. "
                 f"bitnest's CPU kernels ran their **{cpu.isa()}** path.\n")
    if layer_rows:
        for shape in dict.fromkeys(r["shape"] for r in layer_rows):
            for batch in BATCHES:
                rows = [r for r in layer_rows if r["shape"] == shape and r["batch"] == batch]
                if not rows:
                    continue
                cols = [("label", "row", ""), ("us", "µs", ".0f"), ("speedup_fp32", "×fp32", ".2f"),
                        ("speedup_bf16", "×bf16", ".2f"), ("mib", "weight MiB held", ".2f")]
                if batch == 1:
                    cols.append(("roofline_fraction", "of roofline (bytes read ÷ bandwidth)", ".2f"))
                for r in rows:
                    r["mib"] = r["weight_bytes"] / 2**20
                kept = f" — kept from the run of {rows[0]['kept_from']}" if rows[0].get("kept_from") else ""
                lines.append(f"### Layer {shape} (out × in), batch {batch}{kept}\n\n{fmt_table(rows, cols)}\n")
                for r in rows:
                    r.pop("mib")
    if notes:
        lines.append("Peers that did not run: " + "; ".join(notes) + ". llama.cpp is not installed here.\n")
    if e2e_rows:
        for model in dict.fromkeys(r["model"] for r in e2e_rows):
            rows = [dict(r, rss_gib=r["rss_after_load"] / 2**30, held_gib=r["model_bytes"] / 2**30,
                         peak_gib=r["peak_rss"] / 2**30) for r in e2e_rows if r["model"] == model]
            cols = [("label", "model", ""), ("tok_s", "decode tok/s", ".1f"), ("speedup_fp32", "×fp32", ".2f"),
                    ("speedup_bf16", "×bf16", ".2f"), ("prefill_tok_s", "prefill tok/s", ".0f"),
                    ("prefill_speedup_bf16", "prefill ×bf16", ".2f"), ("held_gib", "held GiB", ".3f"),
                    ("rss_gib", "RSS after load GiB", ".2f"), ("rss_growth_ratio", "RSS growth ÷ held", ".3f"),
                    ("peak_gib", "peak RSS GiB", ".2f")]
            lines.append(f"### End to end: {model} (decode 128 tokens at batch 1, prefill 512)\n\n{fmt_table(rows, cols)}\n")
            sw = next((r for r in rows if r["format"] == "switch"), None)
            if sw:
                lines.append("Run-time switch (one nested int8 checkpoint in memory):\n")
                srows = [dict(s, ms=s["switch_seconds"] * 1e3, mib=s["resident_bytes"] / 2**20) for s in sw["switch"]]
                lines.append(fmt_table(srows, [("to", "switch to int", ""), ("ms", "switch ms", ".0f"),
                                               ("read_bytes_during_switch", "bytes read from files", ""),
                                               ("decode_tok_s", "decode tok/s after", ".1f"), ("bits_per_weight", "bits/weight", ".2f"),
                                               ("mib", "resident MiB", ".1f")]))
                lines.append(f"\nWith `cache=True` (every built width kept): switching back to a cached width took "
                             f"{sw['cached_switch_seconds'] * 1e3:.1f} ms; resident {sw['cached_resident_bytes'] / 2**20:.1f} MiB.\n")
                for x in sw.get("side_by_side", []):
                    lines.append(f"Switched to int{x['to']} vs the standalone int{x['to']} checkpoint in the same process, "
                                 f"decodes interleaved (median of 3): {x['switched_tok_s']:.1f} vs {x['standalone_tok_s']:.1f} "
                                 f"tok/s ({x['ratio']:.2f}×).\n")
    res = checks(layer_rows, e2e_rows)
    if res:
        lines.append("Checks (issue 11):\n")
        lines += [f"- {'PASS' if ok else 'FAIL'}: {what} — {detail}" for what, ok, detail in res]
    return "\n".join(lines) + "\n", res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers-only", action="store_true")
    ap.add_argument("--e2e-only", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--shapes", help="comma-separated out×in layer shapes, e.g. 4096x4096 (default: all three); "
                    "on a slow machine one shape keeps the run within an hour")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    threads()
    t0 = time.time()
    print(f"bench/speed.py on {machine()}", flush=True)
    bw = read_bandwidth()
    print(f"read bandwidth {bw:.1f} GB/s", flush=True)
    layer_rows, e2e_rows, notes = [], [], []
    if not args.e2e_only:
        shapes = SHAPES[:1] if args.quick else SHAPES
        if args.shapes:
            try:
                shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
            except ValueError:
                shapes = []
            if not shapes or not all(len(s) == 2 and min(s) > 0 for s in shapes):
                ap.error(f"--shapes: expected out×in pairs like 4096x4096, got {args.shapes!r}")
        reps = {1: (5, 4), 16: (3, 4), 512: (3, 1)} if args.quick else {1: (14, 4), 16: (7, 4), 512: (5, 1)}  # (repeats, burst)
        layer_rows, notes = layer_bench(shapes, BATCHES, reps, bw)
    kept, tag = "", isa_tag()
    out_json = RESULTS / f"speed{tag}.json"
    if args.shapes and not args.e2e_only and out_json.exists() and not args.quick:
        # a run of some shapes keeps the others' tables from the run that measured them, each table saying so
        stamp = _last_run_date(tag, out_json)
        done = {r["shape"] for r in layer_rows}
        layer_rows += [dict(r, kept_from=r.get("kept_from") or f"{stamp}, {r.get('machine_bandwidth_gbs', 0):.1f} GB/s")
                       for r in json.loads(out_json.read_text()) if r.get("kind") == "layer" and r["shape"] not in done]
    if args.e2e_only and out_json.exists() and not args.quick:
        # and an end-to-end-only run keeps the layer rows of the last run, with the same note in the report
        layer_rows = [r for r in json.loads(out_json.read_text()) if r.get("kind") == "layer"]
        kept_layers = _last_run_date(tag, out_json) if layer_rows else ""
    else:
        kept_layers = ""
    if not args.layers_only:
        models = ["ref-10m"] if args.quick else ["ref-10m", "tinyllama-1.1b-shape"]
        e2e_rows = e2e_bench(models, decode=128, prefill=512, rounds=1 if args.quick else 2)
    elif out_json.exists() and not args.quick:
        # a layers-only run keeps the end-to-end rows of the last full run (their ratios were measured side by
        # side in that run); the report says which run each table comes from
        e2e_rows = [r for r in json.loads(out_json.read_text()) if r.get("kind") == "e2e"]
        if e2e_rows:
            kept = _last_run_date(tag, out_json)
    bw_layers = layer_rows[0].get("machine_bandwidth_gbs", bw) if kept_layers else bw  # what their roofs used
    text, res = write_report(bw_layers, layer_rows, e2e_rows, notes, time.time() - t0, args.quick)
    if kept:
        text = text.replace("### End to end", f"End-to-end tables: kept from the full run of {kept} (same "
                            "command); this run was `--layers-only`.\n\n### End to end", 1)
    if kept_layers:
        text = text.replace("### Layer", f"Layer tables and the machine bandwidth above them: kept from the run of "
                            f"{kept_layers}; this run was `--e2e-only` (its bandwidth: {bw:.1f} GB/s).\n\n### Layer", 1)
    print("\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}: {w} — {d}" for w, ok, d in res))
    if not (args.quick or args.no_write):
        section = f"speed{tag.replace('_', '-')}"
        write_json(out_json.name, [{"machine_bandwidth_gbs": bw, "kernels": tag[1:] or "avx512", **r}  # kept rows keep theirs
                                   for r in layer_rows + e2e_rows])
        write_section(section, text)
        print(f"wrote BENCHMARKS.md ({section}) and {out_json}")


if __name__ == "__main__":
    main()
