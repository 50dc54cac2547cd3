"""Exports (bitnest export): each file is read by its real consumer's code — transformers + compressed-tensors for
compressed-tensors, gguf's own reader and dequantizer for GGUF, GPTQ's published packing and dequantization
formula for GPTQ (GPTQModel itself runs in bench/export_check.py: it needs its own venv) — and computes the
weights (or logits) bitnest computes. Grids a format cannot hold are one-line errors."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnest.cli import main
from bitnest.errors import BitnestError
from bitnest.export import affine_layers, load_for_export
from bitnest.export.gptq import words
from bitnest.models.hf import load_model

QUANT = {
    "rtn4s": ["--method", "rtn", "--bits", "4", "--group-size", "64", "--symmetric"],
    "rtn4z": ["--method", "rtn", "--bits", "4", "--group-size", "32", "-o", "int_zero=true"],
    "rtn4": ["--method", "rtn", "--bits", "4", "--group-size", "64"],
    "s8sym": ["--method", "sliced", "--symmetric", "--targets", "ffn"],
    "s8z": ["--method", "sliced", "-o", "int_zero=true"],
    "gptq3s": ["--method", "gptq", "--bits", "3", "--symmetric", "-o", "n_calib=4", "-o", "calib_len=32",
               "-o", "calib_data=generate"],
    "onebit": ["--method", "onebit", "-o", "steps=1", "-o", "batch=2", "-o", "seq_len=16", "-o", "samples=4",
               "-o", "gen_batch=4"],
}


@pytest.fixture(scope="module")
def ck(tiny_llama_dir, tmp_path_factory, shared):
    root = tmp_path_factory.mktemp("exp")
    for name, argv in QUANT.items():
        assert main(["quantize", "--model", str(tiny_llama_dir), *argv, "--out", str(root / name), "--no-progress"]) == 0
    return root


@pytest.fixture
def ids():
    return torch.randint(0, 8192, (2, 15), generator=torch.Generator().manual_seed(1))


def _export(src, to, out, *extra):
    return main(["export", "--model", str(src), "--to", to, "--out", str(out), *extra])


# ---------------------------------------------------------------------------------------------- GPTQ


def autogptq_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's published packing loop (qlinear pack), over rows of q (n, out) -> (n·b/32, out) int32."""
    q = q.to(torch.int64)
    n = q.shape[0]
    out = torch.zeros(n * bits // 32, q.shape[1], dtype=torch.int64)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= q[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 codes in 3 words
            for j in range(i, i + 10):
                out[row] |= q[j] << (3 * (j - i))
            i += 10
            out[row] |= q[i] << 30
            row += 1
            out[row] |= (q[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row] |= q[j] << (3 * (j - i) + 1)
            i += 10
            out[row] |= q[i] << 31
            row += 1
            out[row] |= (q[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row] |= q[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return (out & 0xFFFFFFFF).to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else out.to(torch.int32)


@given(st.sampled_from([2, 3, 4, 8]), st.integers(1, 3), st.integers(1, 9), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_gptq_words_equal_autogptq_packing(bits, blocks, out, seed):
    """Our packed rows viewed as int32 and transposed are AutoGPTQ's qweight, bit for bit (3 bits included)."""
    g = torch.Generator().manual_seed(seed)
    n = 32 * blocks
    q = torch.randint(0, 1 << bits, (out, n), generator=g).to(torch.uint8)  # (out, in) as bitnest stores them
    assert torch.equal(words(q, bits).t().contiguous(), autogptq_pack(q.t().contiguous(), bits))


def gptq_dequant(t: dict, bits: int, fmt: str) -> torch.Tensor:
    """The GPTQ formula as loaders apply it: w[j, o] = scales[g_idx[j], o] · (q[j, o] − zero[g_idx[j], o])."""
    mask = (1 << bits) - 1
    qw = t["qweight"].to(torch.int64) & 0xFFFFFFFF  # (in·b/32, out)
    n_in = qw.shape[0] * 32 // bits
    bitpos = torch.arange(n_in) * bits
    word, off = bitpos // 32, bitpos % 32
    lo = (qw[word] >> off[:, None]) & mask
    hi = torch.where((off + bits > 32)[:, None], (qw[(word + 1).clamp(max=qw.shape[0] - 1)] << (32 - off)[:, None]) & mask, 0)
    q = lo | hi  # (in, out)
    qz = t["qzeros"].to(torch.int64) & 0xFFFFFFFF  # (G, out·b/32)
    n_out = qz.shape[1] * 32 // bits
    bp = torch.arange(n_out) * bits
    w2, o2 = bp // 32, bp % 32
    z = (qz[:, w2] >> o2) & mask
    z = z | torch.where(o2 + bits > 32, (qz[:, (w2 + 1).clamp(max=qz.shape[1] - 1)] << (32 - o2)) & mask, 0)
    z = z + (1 if fmt == "v1" else 0)
    gi = t["g_idx"].long()
    return (t["scales"].float()[gi] * (q - z[gi]).float()).t()  # (out, in)


@pytest.mark.parametrize("name,fmt,bits", [("rtn4s", "v1", None), ("rtn4z", "v2", None), ("gptq3s", "v1", None),
                                          ("s8z", "v1", 8), ("s8sym", "v2", 2), ("s8sym", "v1", 3)])
def test_gptq_export_decodes_to_our_weights(ck, tmp_path, name, fmt, bits):
    from safetensors.torch import load_file
    out = tmp_path / "g"
    assert _export(ck / name, "gptq", out, "--gptq-format", fmt, *(["--bits", str(bits)] if bits else [])) == 0
    state = load_file(str(out / "model.safetensors"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == ("gptq" if fmt == "v1" else "gptq_v2")
    layers = affine_layers(load_for_export(str(ck / name), bits).model)
    for l in layers:
        t = {k: state[f"{l.name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        b = qc.get("dynamic", {}).get(f"+:^{l.name.replace('.', chr(92) + '.')}$", {}).get("bits", qc["bits"])
        assert torch.equal(gptq_dequant(t, b, fmt), l.weight()), l.name
    if name == "s8sym":  # attention stayed in full precision: excluded from GPTQ by a negative dynamic entry
        assert any(k.startswith("-:") and "q_proj" in k for k in qc["dynamic"])


def test_gptq_refuses_what_it_cannot_hold(ck, tmp_path, capsys):
    for argv, msg in (([str(ck / "rtn4"), "gptq"], "int_zero"),          # real-valued zero points
                      ([str(ck / "onebit"), "gptq"], "onebit"),
                      ([str(ck / "s8sym"), "gptq", "--bits", "5"], "no 5-bit")):
        assert _export(argv[0], argv[1], tmp_path / "x", *argv[2:]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bitnest: error:") and err.count("\n") == 1 and msg in err, err
        assert not (tmp_path / "x").exists()
    assert _export(ck / "rtn4", "gptq", tmp_path / "a", "--approximate", "--gptq-format", "v2") == 0
    assert "approximate (largest weight change" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- compressed-tensors


def test_compressed_tensors_symmetric_loads_in_transformers(ck, tmp_path, ids):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    out = tmp_path / "ct"
    assert _export(ck / "rtn4s", "compressed-tensors", out) == 0
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ours = load_model(ck / "rtn4s").model
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,bits", [("rtn4z", None), ("s8z", 8), ("s8sym", 3), ("s8sym", 1)])
def test_compressed_tensors_decompressor_gives_our_weights(ck, tmp_path, name, bits):
    """compressed-tensors' own decompressor on the written tensors (asymmetric ones too: transformers 5.24 with
    compressed-tensors 0.20 cannot load asymmetric pack-quantized models at all, llm-compressor#1618)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    out = tmp_path / "ct"
    assert _export(ck / name, "compressed-tensors", out, *(["--bits", str(bits)] if bits else [])) == 0
    state = load_file(str(out / "model.safetensors"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    schemes = {t[4:-1].replace("\\", ""): QuantizationScheme.model_validate(g)
               for g in qc["config_groups"].values() for t in g["targets"]}
    for l in affine_layers(load_for_export(str(ck / name), bits).model):
        sd = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == l.name}
        w = PackedQuantizationCompressor.decompress(sd, schemes[l.name])["weight"]  # in the scale's dtype (fp16)
        assert w.dtype == torch.float16 and torch.equal(w, l.weight().half()), l.name  # (t − zp)·α, rounded once


# ---------------------------------------------------------------------------------------------- GGUF


def _unpermute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


@pytest.mark.parametrize("name,bits,qtype", [("s8sym", 8, "Q8_0"), ("s8sym", 4, "Q4_0"), ("rtn4z", None, "Q4_1")])
def test_gguf_decodes_through_gguf_to_our_weights(ck, tmp_path, name, bits, qtype):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    extra = (["--bits", str(bits)] if bits else []) + (["--approximate"] if qtype == "Q4_1" else [])
    assert _export(ck / name, "gguf", out, *extra) == 0
    r = gguf.GGUFReader(str(out))
    fields = {f: r.fields[f] for f in r.fields}
    assert "tokenizer.ggml.tokens" in fields and "llama.block_count" in fields
    loaded = load_for_export(str(ck / name), bits)
    cfg = loaded.model.config
    tensors = {t.name: t for t in r.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for l in affine_layers(loaded.model):
        t = tensors[names.get_name(l.name + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == qtype
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        if l.name.endswith("q_proj"):
            w = _unpermute(w, cfg.num_attention_heads)
        elif l.name.endswith("k_proj"):
            w = _unpermute(w, cfg.num_key_value_heads)
        # Q4_1: m = −α·z rounded to fp16, |m| ≤ 15·α: off by at most half an fp16 ulp of that
        tol = 0 if qtype != "Q4_1" else 15 * 2.0 ** -11 * float(l.scale.float().max())
        assert (w - l.weight()).abs().max() <= tol, l.name
    layers = {l.name for l in affine_layers(loaded.model)}
    want = {names.get_name(k, try_suffixes=(".weight",)) for k in loaded.model.state_dict()
            if "lm_head" not in k and k.rsplit(".", 1)[0] not in layers} | \
        {names.get_name(n + ".weight", try_suffixes=(".weight",)) for n in layers}
    assert set(tensors) == want  # every tensor once (tied lm_head left to token_embd, as llama.cpp expects)


def test_gguf_refuses_grids_it_cannot_hold(ck, tmp_path, capsys):
    for src, extra, msg in ((ck / "gptq3s", [], "3-bit"), (ck / "rtn4", [], "--approximate"),
                            (ck / "onebit", [], "onebit")):
        assert _export(src, "gguf", tmp_path / "x.gguf", *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("bitnest: error:") and err.count("\n") == 1 and msg in err, err
    assert not list(tmp_path.iterdir())


def test_export_rejects_bad_requests(ck, tmp_path, capsys, tiny_llama_dir):
    with pytest.raises(BitnestError, match="not a bitnest checkpoint"):
        load_for_export(str(tiny_llama_dir))
    assert _export(ck / "rtn4s", "gptq", tmp_path / "y", "--bits", "2") == 2  # --bits on a standalone checkpoint
    assert "Matryoshka" in capsys.readouterr().err
