"""Exports checked by their real consumers, on ref-10m: the same C4 held-out windows scored by bitnest and by the
runtime that loads the exported file.

    python bench/export_check.py [--windows 8] [--peer-python /tmp/peer-venv/bin/python]

  compressed-tensors  transformers (+ compressed-tensors) `from_pretrained` on the export → logits and perplexity
  GPTQ                GPTQModel (its own venv: see bench/survey.py's docstring for the overlay) → logits, perplexity
  GGUF                llama.cpp through llama-cpp-python (pip builds it from source with cmake) → perplexity from
                      the logits llama.cpp computes for the same token ids (no re-tokenization)
Consumers that are not installed are skipped with a note. Writes the `exports` section of BENCHMARKS.md and
bench/results/exports.json.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, write_json, write_section  # noqa: E402

CTX = 256
CASES = [  # (label, quantize argv, export format, export argv)
    ("RTN int4 g64 symmetric", ["--method", "rtn", "--bits", "4", "--group-size", "64", "--symmetric"],
     "compressed-tensors", []),
    ("RTN int4 g32 int-zero", ["--method", "rtn", "--bits", "4", "--group-size", "32", "-o", "int_zero=true"],
     "compressed-tensors", []),
    ("RTN int4 g64 symmetric", None, "gptq", ["--gptq-format", "v1"]),
    ("GPTQ int4 g64 int-zero", ["--method", "gptq", "--bits", "4", "--group-size", "64", "-o", "int_zero=true"],
     "gptq", ["--gptq-format", "v2"]),
    ("sliced int8 symmetric → int3", ["--method", "sliced", "--symmetric"], "gptq", ["--bits", "3"]),
    ("sliced int8 symmetric → int8", None, "gguf", ["--bits", "8"]),
    ("sliced int8 symmetric → int4", None, "gguf", ["--bits", "4"]),
    ("RTN int4 g32 int-zero", None, "gguf", ["--approximate"]),
    # K-quants and their exact / approximate cases (export/gguf.py's table)
    ("sliced int8 symmetric → int2", None, "gguf", ["--bits", "2"]),                                    # Q2_K exact
    ("RTN int2 per-channel int-zero", ["--method", "rtn", "--bits", "2", "-o", "int_zero=true"], "gguf", []),  # Q2_K
    ("RTN int3 per-channel symmetric", ["--method", "rtn", "--bits", "3", "--symmetric"], "gguf", []),     # Q3_K
    ("RTN int2 g64 int-zero", ["--method", "rtn", "--bits", "2", "--group-size", "64", "-o", "int_zero=true"],
     "gguf", ["--approximate"]),                                                                          # Q2_K fitted
]
GPTQ_WORKER = r'''
import os, sys, torch
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
torch.set_num_threads(2)
from gptqmodel import GPTQModel, BACKEND
m = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(torch.cat([m.model(w[None]).logits.float() for w in ids]), sys.argv[3])
'''


def nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL over windows: logits (W, T, V), ids (W, T)."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    return float(-lp.gather(-1, ids[:, 1:, None]).mean())


def ours(ckpt: Path, ids: torch.Tensor, bits: int | None, dtype=torch.float32) -> torch.Tensor:
    from bitnest import runtime
    from bitnest.models.hf import load_model
    m = load_model(ckpt, dtype=dtype).model
    if bits is not None:
        runtime.set_precision(m, bits)
    with torch.no_grad():
        return torch.cat([m(w[None]).logits.float() for w in ids])


def consumer_ct(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return torch.cat([m(w[None]).logits.float() for w in ids])


def consumer_gptq(path: Path, ids: torch.Tensor, py: str) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as d:
        torch.save(ids, f"{d}/ids.pt")
        (Path(d) / "w.py").write_text(GPTQ_WORKER)
        r = subprocess.run([py, f"{d}/w.py", str(path), f"{d}/ids.pt", f"{d}/out.pt"], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr.strip().splitlines()[-1])
        return torch.load(f"{d}/out.pt")


def consumer_llama_cpp(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from bitnest.export.gguf import llama_cpp_logits
    return llama_cpp_logits(path, ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--peer-python", default="/tmp/peer-venv/bin/python")
    ap.add_argument("--work", default="runs/export_check")
    ap.add_argument("--data-dir")
    a = ap.parse_args()
    torch.set_num_threads(2)
    from bitnest.cli import main as cli
    from bitnest.eval.data import load_eval_text, tokenize_eval_text
    from bitnest.models.hf import load_model
    from bitnest.paths import data_file

    src = data_file("models/ref-10m", a.data_dir)
    tok = load_model(src).tokenizer
    flat = tokenize_eval_text(tok, load_eval_text("c4", a.data_dir))
    ids = flat[: a.windows * CTX].reshape(a.windows, CTX)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    fp_nll = nll(ours(src, ids, None), ids)
    for label, qargv, fmt, eargv in CASES:
        base = label.split(" → ")[0]
        ck = work / base.replace(" ", "_")
        if qargv is not None and not (ck / "config.json").exists():
            assert cli(["quantize", "--model", str(src), *qargv, "--out", str(ck), "--no-progress"]) == 0
        bits = int(eargv[eargv.index("--bits") + 1]) if "--bits" in eargv else None
        out = work / f"{base.replace(' ', '_')}-{fmt}-{bits or 'stored'}{'.gguf' if fmt == 'gguf' else ''}"
        rc = cli(["export", "--model", str(ck), "--to", fmt, "--out", str(out), "--overwrite", *eargv])
        row = {"case": label, "format": fmt, "export_args": " ".join(eargv), "exported": rc == 0}
        if fmt == "gguf" and rc == 0:  # the GGML types written for the Linear weights, read back by gguf's reader
            import gguf
            rd = gguf.GGUFReader(str(out))
            row["ggml_types"] = sorted({t.tensor_type.name for t in rd.tensors if t.tensor_type.name not in ("F32", "F16")})
        o = ours(ck, ids, bits, torch.float16 if fmt == "gptq" else torch.float32)
        row["ppl_bitnest"] = math.exp(nll(o, ids))
        try:
            if fmt == "compressed-tensors":
                consumer, t = "transformers + compressed-tensors", consumer_ct(out, ids)
            elif fmt == "gptq":
                if not Path(a.peer_python).exists():
                    raise RuntimeError(f"no GPTQModel venv at {a.peer_python}")
                consumer, t = "GPTQModel (torch backend)", consumer_gptq(out, ids, a.peer_python)
            else:
                consumer, t = "llama.cpp (llama-cpp-python)", consumer_llama_cpp(out.with_suffix(".gguf") if out.suffix != ".gguf" else out, ids)
            row.update(consumer=consumer, ppl_consumer=math.exp(nll(t, ids)),
                       max_abs_logit_diff=float((t - o).abs().max()),
                       argmax_agreement=float((t.argmax(-1) == o.argmax(-1)).float().mean()))
            row["ppl_rel_diff"] = row["ppl_consumer"] / row["ppl_bitnest"] - 1
        except Exception as e:  # noqa: BLE001  a consumer that does not run here is reported, not fatal
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if fmt == "compressed-tensors" and "mismatched" in msg:
                msg = ("transformers cannot load asymmetric pack-quantized models with this compressed-tensors "
                       "(zero points stay unpacked in its meta model; llm-compressor#1618) — compressed-tensors' own "
                       "decompressor returns our weights exactly (tests/test_export.py)")
            row.update(consumer="skipped", note=msg)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_json("exports.json", rows)
    lines = ["| bitnest checkpoint | format | consumer | ppl bitnest | ppl consumer | Δ ppl | max abs Δlogit | argmax agree |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("consumer") == "skipped":
            lines.append(f"| {r['case']} | {r['format']} {r['export_args']} | skipped: {r['note']} | {r['ppl_bitnest']:.2f} | | | | |")
        else:
            types = f" ({', '.join(r['ggml_types'])})" if r.get("ggml_types") else ""
            lines.append(f"| {r['case']} | {r['format']} {r['export_args']}{types} | {r['consumer']} | {r['ppl_bitnest']:.2f} | "
                         f"{r['ppl_consumer']:.2f} | {100 * r['ppl_rel_diff']:+.2f} % | {r['max_abs_logit_diff']:.3g} | "
                         f"{r['argmax_agreement']:.3f} |")
    note = (f"ref-10m (FP ppl {math.exp(fp_nll):.2f} on these windows), C4 held-out, the first {a.windows} windows of "
            f"{CTX} tokens, the same token ids for both sides. GPTQ rows compare with bitnest in float16 (GPTQModel's "
            f"dtype), the others in float32. Run time {(time.perf_counter() - t0) / 60:.1f} min.\n")
    write_section("exports", header("Exports loaded by their consumers", note) + "\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
