import json

import pytest
import torch

from bitnest.api import quantization_config, quantize
from bitnest.errors import BitnestError
from bitnest.eval.bits import bits_report
from bitnest.formats.checkpoint import load_quantized, save_quantized
from bitnest.models.blocks import select_linears
from bitnest.models.hf import load_model
from bitnest.nn.qlinear import QuantLinear


@pytest.fixture
def ids():
    return torch.randint(3, 8000, (2, 24), generator=torch.Generator().manual_seed(0))


def _save(model, tok, out, method, shard="2GB"):
    return save_quantized(model, tok, out, quantization_config(method, model.bitnest_method[1], "src"),
                          storage_dtype=torch.float32, max_shard_size=shard)


def test_rtn_roundtrip_bit_exact_sharded(tiny_llama_dir, tmp_path, ids):
    m = load_model(tiny_llama_dir).model
    quantize(m, "rtn", bits=3, group_size=16, progress=False)
    out = _save(m, None, tmp_path / "ck", "rtn", shard="40KB")
    assert (out / "model.safetensors.index.json").exists()
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitnest" and cfg["method"] == "rtn" and cfg["config"]["bits"] == 3
    assert cfg["config"]["group_size"] == 16 and cfg["config"]["targets"] == "all" and "format_version" in cfg
    m2 = load_model(out).model
    for (n1, b1), (n2, b2) in zip(m.named_buffers(), m2.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2)
    assert torch.equal(m(ids).logits, m2(ids).logits)


def test_matryoshka_checkpoint_serves_any_r_and_slice_is_exact(tiny_llama_dir, tmp_path, ids):
    from bitnest.cli import main
    m = load_model(tiny_llama_dir).model
    quantize(m, "sliced", bits=8, progress=False)
    ck = _save(m, None, tmp_path / "mat", "sliced")
    full = (ck / "model.safetensors").stat().st_size
    for r in (8, 6, 4, 3, 2, 1):
        nested = load_quantized(ck, bits=r).model
        assert main(["slice", "--model", str(ck), "--bits", str(r), "--out", str(tmp_path / f"s{r}"), "--no-progress"]) == 0
        alone = load_model(tmp_path / f"s{r}").model
        assert torch.equal(nested(ids).logits, alone(ids).logits), r  # one checkpoint == its standalone slice
        assert all(q.bits == r for q in alone.modules() if isinstance(q, QuantLinear))
    # the standalone file size reflects r bits: int2 codes take a quarter of int8's bytes
    q8 = sum(q.qweight.numel() for q in load_model(tmp_path / "s8").model.modules() if isinstance(q, QuantLinear))
    q2 = sum(q.qweight.numel() for q in load_model(tmp_path / "s2").model.modules() if isinstance(q, QuantLinear))
    assert q2 * 4 == q8
    assert (tmp_path / "s2" / "model.safetensors").stat().st_size < full - 0.7 * q8


def test_non_nested_checkpoint_refuses_bits(tiny_llama_dir, tmp_path):
    m = load_model(tiny_llama_dir).model
    quantize(m, "rtn", bits=4, progress=False)
    ck = _save(m, None, tmp_path / "r", "rtn")
    with pytest.raises(BitnestError, match="Matryoshka"):
        load_quantized(ck, bits=2)


def test_targets_and_bits_accounting(tiny_llama_dir):
    m = load_model(tiny_llama_dir).model
    ffn = select_linears(m, "ffn")
    assert ffn and all(".mlp." in n for n in ffn) and len(select_linears(m, "all")) == 2 * 7
    assert "lm_head" not in select_linears(m, "all")
    quantize(m, "rtn", bits=4, targets="ffn", progress=False)
    assert isinstance(m.model.layers[0].mlp.up_proj, QuantLinear)
    assert isinstance(m.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    rep = bits_report(m, torch.float16)
    # per-channel: 4 bits + (16-bit scale + 16-bit zero) per row of `in` weights
    expect = sum((4 * q.in_features + 32) * q.out_features for q in m.modules() if isinstance(q, QuantLinear))
    assert rep.bits_per_weight == pytest.approx(expect / rep.quantized_weights)


def test_atomic_write_leaves_nothing_on_failure(tiny_llama_dir, tmp_path, monkeypatch):
    import bitnest.formats.checkpoint as ck
    m = load_model(tiny_llama_dir).model
    quantize(m, "rtn", bits=4, progress=False)

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(RuntimeError):
        _save(m, None, tmp_path / "x", "rtn")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_tensors_are_read_into_owned_memory(tiny_llama_dir, tmp_path, ids):
    """The loader reads every tensor into process memory (equal to safetensors' own reader), so the model keeps
    working when its files are deleted; mmap=True maps them instead; a truncated file is a one-line error."""
    from safetensors.torch import load_file

    from bitnest.formats.checkpoint import read_safetensors
    m = load_model(tiny_llama_dir).model
    quantize(m, "rtn", bits=4, progress=False)
    ck = _save(m, None, tmp_path / "ck", "rtn")
    f = ck / "model.safetensors"
    ours, theirs = read_safetensors(f), load_file(str(f))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype
                                                for k in ours)
    expect = load_quantized(ck, mmap=True).model(ids).logits
    owned = load_quantized(ck).model
    import shutil
    shutil.rmtree(ck)
    assert torch.equal(owned(ids).logits, expect)
    f.parent.mkdir()
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    with pytest.raises(BitnestError):
        read_safetensors(f)
