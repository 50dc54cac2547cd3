"""Streaming quantization (bitnest.streaming): bit-identical to the in-memory path, resumable, memory-bounded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bitnest import kernels
from bitnest.api import make_config, quantization_config, quantize
from bitnest.errors import BitnestError
from bitnest.formats.checkpoint import _read_state, save_quantized
from bitnest.models.hf import load_model
from bitnest.streaming import quantize_streaming

ROOT = Path(__file__).resolve().parents[1]


def _tiny(path: Path, tied: bool, layers: int = 3) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")  # sharded
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("tied"), True)


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("untied"), False)


def _in_memory(src: Path, out: Path, method: str, **kw) -> Path:
    loaded = load_model(src)
    config = make_config(method, **kw)
    quantize(loaded.model, method, config, progress=False)
    return save_quantized(loaded.model, loaded.tokenizer, out, quantization_config(method, config, loaded.source),
                          storage_dtype=loaded.storage_dtype)


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


CASES = [("rtn", {"bits": 4, "group_size": 32}, "tied"),
         ("rtn", {"bits": 3, "symmetric": True, "targets": "ffn", "overrides": (("*.down_proj", 8),)}, "untied"),
         ("sliced", {"bits": 4, "group_size": 16}, "untied"),
         ("sliced", {"bits": 2, "parent_bits": 8, "symmetric": True}, "tied"),
         ("lpfit", {"bits": 3, "group_size": 32}, "untied"), ("nf", {"bits": 4, "group_size": 16}, "tied"),
         ("kmeans", {"bits": 3}, "untied")]


@pytest.mark.parametrize("method,kw,which", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_streaming_equals_in_memory(method, kw, which, tiny_tied, tiny_untied, tmp_path):
    src = tiny_tied if which == "tied" else tiny_untied
    a = quantize_streaming(src, tmp_path / "stream", method, progress=False, **kw)
    b = _in_memory(src, tmp_path / "memory", method, **kw)
    sa, sb = _read_state(a), _read_state(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert not any(p.name.startswith(".stream") for p in tmp_path.iterdir())  # the temporary directory is gone
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with kernels.use("reference"):
        la, lb = load_model(a).model(ids).logits, load_model(b).model(ids).logits
    assert torch.equal(la, lb)


CALIB = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(3))  # (n, seq) token ids
CALIBRATED_CASES = [("gptq", {"bits": 4, "group_size": 32}), ("matgptq", {"bits": 2}), ("clip", {"bits": 3}),
                    ("kmeans", {"bits": 3, "weighted": True})]


@pytest.mark.parametrize("method,kw", CALIBRATED_CASES, ids=[c[0] for c in CALIBRATED_CASES])
def test_calibrated_streaming_equals_in_memory(method, kw, tiny_untied, tmp_path):
    """GPTQ-family methods stream block by block (the method's own loop, fed from the file) and give the same bytes
    as the in-memory run on the same calibration tokens."""
    a = quantize_streaming(tiny_untied, tmp_path / "stream", method, progress=False, calib=CALIB, blocks_per_shard=2, **kw)
    loaded = load_model(tiny_untied)
    config = make_config(method, **kw)
    quantize(loaded.model, method, config, progress=False, calib=CALIB)
    b = save_quantized(loaded.model, loaded.tokenizer, tmp_path / "memory", quantization_config(method, config, loaded.source),
                       storage_dtype=loaded.storage_dtype)
    sa, sb = _read_state(a), _read_state(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert not list(a.glob("acts-*"))  # the calibration activations kept for a resume are gone


@pytest.mark.parametrize("base", ["rtn", "gptq"])
def test_mixed_streams_with_block_sensitivity(base, tiny_untied, tmp_path):
    """mixed with sensitivity=block streams (one read of the blocks to score, one to quantize) and equals the in-memory
    run with the same option, byte for byte; the allocation uses both widths and meets the budget."""
    kw = {"budget": 3.5, "candidates": (2, 4), "sensitivity": "block", "base": base, "group_size": 32}
    a = quantize_streaming(tiny_untied, tmp_path / "stream", "mixed", progress=False, calib=CALIB, **kw)
    loaded = load_model(tiny_untied)
    config = make_config("mixed", **kw)
    quantize(loaded.model, "mixed", config, progress=False, calib=CALIB)
    b = save_quantized(loaded.model, loaded.tokenizer, tmp_path / "memory", quantization_config("mixed", config, loaded.source),
                       storage_dtype=loaded.storage_dtype)
    sa, sb = _read_state(a), _read_state(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    qa = json.loads((a / "config.json").read_text())
    assert qa == json.loads((b / "config.json").read_text())
    widths = [m["bits"] for m in qa["quantization_config"]["modules"].values()]
    assert set(widths) == {2, 4}, widths
    from bitnest.eval.bits import bits_report
    assert bits_report(load_model(a).model).bits_per_weight <= 3.5


def test_block_sensitivity_ranks_the_damaged_layer_first(tiny_untied):
    """An outlier input column makes 2-bit per-channel RTN of that layer damaging: the block score ranks it among its
    block's top two (with o_proj, fed its amplified output), > 100× q/k, and every score falls as the width grows."""
    from bitnest.calib.sensitivity import block_sensitivity
    from bitnest.grids.affine import AffineSpec
    from bitnest.nn.qlinear import QuantLinear

    model = load_model(tiny_untied).model
    v = model.model.layers[1].self_attn.v_proj.weight
    v.data[:, 0] *= 40
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    sens, cost = block_sensitivity(model, names, CALIB, (2, 4, 8),
                                   lambda lin, b: QuantLinear.from_linear(lin, AffineSpec(b)), progress=False)
    block1 = {n.rpartition(".")[2]: s[2] for n, s in sens.items() if ".layers.1." in n}
    top2 = sorted(block1, key=block1.get)[-2:]  # v, and o (its input is v's amplified output)
    assert "v_proj" in top2 and block1["v_proj"] > 100 * max(block1["q_proj"], block1["k_proj"]), block1
    assert all(s[2] > s[4] > s[8] >= 0 for s in sens.values())
    assert all(c[2] < c[4] < c[8] for c in cost.values())


class _Stop(Exception):
    pass


def test_interrupted_calibrated_run_resumes_at_the_next_block(tiny_untied, tmp_path):
    kw = dict(bits=4, group_size=32, calib=CALIB, progress=False)
    ref = quantize_streaming(tiny_untied, tmp_path / "ref", "gptq", **kw)
    seen, resumed = [], []

    def stop_at_block_1(i, n):
        seen.append(i)
        if i == n - 2:  # the second-to-last shard: block 1 of 3
            raise _Stop

    out = tmp_path / "out"
    with pytest.raises(_Stop):
        quantize_streaming(tiny_untied, out, "gptq", on_shard=stop_at_block_1, **kw)
    assert len(list((tmp_path / ".out.partial").glob("acts-*.safetensors"))) == 1  # the resume point
    with pytest.raises(BitnestError, match="calib_sha1"):  # other calibration tokens: refused, not mixed
        quantize_streaming(tiny_untied, out, "gptq", **{**kw, "calib": CALIB[:4]})
    quantize_streaming(tiny_untied, out, "gptq", on_shard=lambda i, n: resumed.append(i), **kw)
    assert resumed == [seen[-1] + 1]  # only the last block was calibrated again
    assert _files(out) == _files(ref)


@pytest.mark.parametrize("method,kw", [("matgptq", {"bits": 2}),
                                       ("mixed", {"budget": 3.5, "candidates": (2, 4), "sensitivity": "block",
                                                  "base": "gptq", "group_size": 32})], ids=["matgptq", "mixed"])
def test_interrupted_run_with_tuple_options_resumes(method, kw, tiny_untied, tmp_path, monkeypatch):
    """Configs with tuple fields (precisions, λ, candidates) resume: the recipe is compared as JSON reads it back.
    A resumed mixed run takes the allocation its interrupted run recorded instead of scoring again."""
    from bitnest.methods import mixed as mixed_mod

    kw = dict(kw, calib=CALIB, progress=False)
    ref = quantize_streaming(tiny_untied, tmp_path / "ref", method, **kw)
    out, resumed, scored = tmp_path / "out", [], []

    def stop(i, n):
        if i == n - 2:
            raise _Stop

    with pytest.raises(_Stop):
        quantize_streaming(tiny_untied, out, method, on_shard=stop, **kw)
    score = mixed_mod.block_sensitivity
    monkeypatch.setattr(mixed_mod, "block_sensitivity", lambda *a, **k: scored.append(1) or score(*a, **k))
    quantize_streaming(tiny_untied, out, method, on_shard=lambda i, n: resumed.append(i), **kw)
    assert len(resumed) == 1 and not scored
    assert _files(out) == _files(ref)


def test_streaming_refuses_self_generated_calibration(tiny_untied, tmp_path):
    with pytest.raises(BitnestError, match="self-generated"):
        quantize_streaming(tiny_untied, tmp_path / "o", "gptq", progress=False, bits=4, calib_data="generate")
    assert not (tmp_path / "o").exists()


def test_interrupted_run_resumes_bit_identical(tiny_untied, tmp_path):
    ref = quantize_streaming(tiny_untied, tmp_path / "ref", "rtn", progress=False, bits=4, group_size=32)
    seen = []

    def stop_after_2(i, n):
        seen.append(i)
        if i == 2:
            raise _Stop

    out = tmp_path / "out"
    with pytest.raises(_Stop):
        quantize_streaming(tiny_untied, out, "rtn", progress=False, on_shard=stop_after_2, bits=4, group_size=32)
    assert not out.exists() and (tmp_path / ".out.partial" / "progress.json").is_file()
    resumed = []
    quantize_streaming(tiny_untied, out, "rtn", progress=False, on_shard=lambda i, n: resumed.append(i), bits=4, group_size=32)
    assert seen == [0, 1, 2] and resumed and resumed[0] == 3  # the finished shards were not redone
    assert _files(out) == _files(ref)
    assert not (tmp_path / ".out.partial").exists()


def test_sigkilled_run_resumes_bit_identical(tiny_untied, tmp_path):
    """A process killed with SIGKILL after its second shard; the same call again finishes it."""
    ref = quantize_streaming(tiny_untied, tmp_path / "ref", "sliced", progress=False, bits=4, symmetric=True)
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from bitnest.streaming import quantize_streaming
        def kill(i, n):
            if i == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        quantize_streaming({str(tiny_untied)!r}, {str(out)!r}, "sliced", progress=False, on_shard=kill, bits=4, symmetric=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not out.exists()
    quantize_streaming(tiny_untied, out, "sliced", progress=False, bits=4, symmetric=True)
    assert _files(out) == _files(ref)


def test_changed_recipe_is_refused_then_overwrite_restarts(tiny_untied, tmp_path):
    def stop(i, n):
        raise _Stop

    out = tmp_path / "out"
    with pytest.raises(_Stop):
        quantize_streaming(tiny_untied, out, "rtn", progress=False, on_shard=stop, bits=4)
    with pytest.raises(BitnestError, match="another recipe .*config"):
        quantize_streaming(tiny_untied, out, "rtn", progress=False, bits=3)
    quantize_streaming(tiny_untied, out, "rtn", progress=False, overwrite=True, bits=3)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config"]["bits"] == 3


def test_bad_input_is_one_line(tiny_untied, tmp_path):
    with pytest.raises(BitnestError, match="cannot stream"):
        quantize_streaming(tiny_untied, tmp_path / "o", "actquant")
    with pytest.raises(BitnestError, match="sensitivity=block"):
        quantize_streaming(tiny_untied, tmp_path / "o", "mixed")
    with pytest.raises(BitnestError, match="no tokenizer"):
        quantize_streaming(tiny_untied, tmp_path / "o", "gptq")
    with pytest.raises(BitnestError, match="already exists"):
        quantize_streaming(tiny_untied, tmp_path, "rtn")
    with pytest.raises(BitnestError, match="not a model directory|not found"):
        quantize_streaming(tmp_path / "nothing", tmp_path / "o", "rtn")
    q = quantize_streaming(tiny_untied, tmp_path / "q", "rtn", progress=False)
    with pytest.raises(BitnestError, match="already quantized"):
        quantize_streaming(q, tmp_path / "o", "rtn")
    with pytest.raises(BitnestError, match="no option"):
        quantize_streaming(tiny_untied, tmp_path / "o", "rtn", bitz=4)


def test_nan_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    src = _tiny(tmp_path / "src", False, layers=2)
    f = next(f for f in sorted(src.glob("*.safetensors")) if any("layers.1.mlp" in k for k in load_file(f)))
    state = load_file(f)
    k = next(k for k in state if "layers.1.mlp" in k)
    state[k][0, 0] = float("nan")
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(BitnestError, match=f"{k} contains NaN"):
        quantize_streaming(src, tmp_path / "o", "rtn", progress=False)


MEMORY_WORKER = """
import json, sys, time
import torch
torch.set_num_threads(2)
import transformers.models.llama.modeling_llama, accelerate, safetensors.torch  # the fixed overhead: imports
from bitnest.streaming import quantize_streaming
from bitnest.methods import rtn
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key + ':'))
# anonymous memory only, sampled every 2 ms: VmHWM would also count the page-cache pages of the mmapped input shard,
# whose residency depends on the machine, not on what the process holds
import threading
peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status('RssAnon'))
        time.sleep(0.002)
base = status('RssAnon')
t = threading.Thread(target=sample, daemon=True)
t.start()
kw = json.loads(sys.argv[4])
if 'calib_random' in kw:  # (n, seq, vocab): random token ids (the synthetic checkpoints have no tokenizer)
    n, seq, vocab = kw.pop('calib_random')
    kw['calib'] = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
quantize_streaming(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, **kw)
done.set(); t.join()
print(json.dumps({'base': base, 'peak': max(peak[0], status('RssAnon'))}))
"""


@pytest.mark.slow  # ~35 s: two subprocesses over a 0.5 GB synthetic checkpoint (CI's slow pass runs it)
def test_peak_memory_is_one_block_not_the_model(tmp_path):
    """8 layers of hidden 1024 (the in-memory path holds 8 blocks + embeddings in float32, ≈ 0.5 GB): the
    streaming run's peak RSS grows by at most one block in float32 plus a fixed overhead (GPTQ: plus one block's
    calibration inputs and outputs and the Hessian statistics of its widest layer)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from scale import write_synthetic_llama

    hidden, inter, layers, vocab = 1024, 2816, 8, 4096
    src = tmp_path / "src"
    write_synthetic_llama(src, layers=layers, hidden=hidden, inter=inter, vocab=vocab, heads=16, shard_bytes=50 * 10**6)
    block_fp32 = 4 * (4 * hidden * hidden + 3 * hidden * inter)
    model_fp32 = layers * block_fp32 + 4 * 2 * vocab * hidden
    overhead = 64 << 20  # quantizer temporaries and the output shard being written
    n, seq = 8, 64
    acts = n * seq * hidden * 4  # one block's calibration inputs (float32)
    stats = 3 * inter * inter * 4  # GPTQ on down_proj: H, its Cholesky inverse and a temporary, (in, in) float32
    for method, kw in (("rtn", {"bits": 4, "group_size": 128}),
                       ("gptq", {"bits": 4, "group_size": 128, "calib_random": [n, seq, vocab]})):
        r = subprocess.run([sys.executable, "-c", MEMORY_WORKER, str(src), str(tmp_path / method), method, json.dumps(kw)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        m = json.loads(r.stdout.strip().splitlines()[-1])
        growth = m["peak"] - m["base"]
        bound = block_fp32 + overhead + (2 * acts + stats if method == "gptq" else 0)  # inputs and outputs of a block
        assert growth <= bound, (method, growth >> 20, bound >> 20)
        assert growth < model_fp32 / (3 if method == "rtn" else 2)  # in memory: the model + the same statistics


def test_cli_stream(tiny_untied, tmp_path, capsys):
    from bitnest.cli import main

    out = tmp_path / "cli"
    assert main(["quantize", "--model", str(tiny_untied), "--method", "sliced", "--bits", "4", "--stream",
                 "--no-progress", "--out", str(out)]) == 0
    assert "streamed" in capsys.readouterr().out
    ref = _in_memory(tiny_untied, tmp_path / "ref", "sliced", bits=4)
    sa, sb = _read_state(out), _read_state(ref)
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert main(["quantize", "--model", str(tiny_untied), "--method", "mixed", "--stream", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bitnest: error:") and "sensitivity=block" in err[0]
    assert main(["quantize", "--model", str(tiny_untied), "--method", "gptq", "--stream", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer" in err[0] and not (tmp_path / "g").exists()
