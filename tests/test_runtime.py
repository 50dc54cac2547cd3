"""Run-time precision (bitnest.runtime) and generation: a loaded Matryoshka model switched in memory computes what
the checkpoint loaded at that width computes, reads nothing from disk, holds c + r bits per weight; greedy decoding
gives the same tokens on the fast and the reference path; `bitnest generate` streams, switches and refuses bad input."""
import io
import json
import shutil

import pytest
import torch

from bitnest import kernels, runtime
from bitnest.api import quantization_config, quantize
from bitnest.cli import main
from bitnest.errors import BitnestError
from bitnest.formats.checkpoint import load_quantized, save_quantized
from bitnest.generate import generate
from bitnest.models.hf import load_model
from bitnest.nn.qlinear import QuantLinear
from conftest import needs_tokenizer


@pytest.fixture(scope="module")
def nested_ckpt(tiny_llama_dir, tmp_path_factory):
    m = load_model(tiny_llama_dir)
    quantize(m.model, "sliced", bits=8, progress=False)
    out = tmp_path_factory.mktemp("rt") / "sliced8"
    save_quantized(m.model, m.tokenizer, out, quantization_config("sliced", m.model.bitnest_method[1], str(tiny_llama_dir)))
    return out


@pytest.fixture
def ids():
    return torch.randint(0, 8192, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_switch_equals_loading_at_r_and_reads_nothing_from_disk(nested_ckpt, ids, tmp_path):
    expect = {r: _logits(load_quantized(nested_ckpt, bits=r).model, ids) for r in (8, 6, 4, 3, 2, 1)}
    moved = tmp_path / "gone"
    model = load_model(nested_ckpt).model
    shutil.copytree(nested_ckpt, moved)
    shutil.rmtree(nested_ckpt)  # the switch must not need the files
    try:
        for r in (4, 2, 8, 3, 1, 6, 4):
            out = model.set_precision(r)
            assert out["bits"] == r and out["switch_seconds"] < 5
            assert torch.equal(_logits(model, ids), expect[r]), r
    finally:
        shutil.copytree(moved, nested_ckpt)
    assert not torch.equal(expect[8], expect[2])  # the widths are genuinely different models


def _codes_bytes(model):
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(m.qweight.numel() for m in q), sum(0 if m.qweight_r is None else m.qweight_r.numel() for m in q)


def test_memory_is_c_plus_r_bits_and_cache_keeps_every_width(nested_ckpt):
    model = load_model(nested_ckpt).model
    c_bytes, work = _codes_bytes(model)
    assert work == 0  # serving the stored width needs no copy
    base = runtime.resident_bytes(model)
    for r in (4, 2, 3):
        model.set_precision(r)
        c2, work = _codes_bytes(model)
        assert c2 == c_bytes and abs(work - c_bytes * r / 8) <= 0.02 * c_bytes  # one r-bit working copy, no more
        assert runtime.resident_bytes(model) == base + work
    model.set_precision(8)
    assert _codes_bytes(model)[1] == 0 and runtime.resident_bytes(model) == base
    model.set_precision(4, cache=True)
    model.set_precision(2)
    model.set_precision(4)  # back to a cached width: no new copy built
    assert runtime.resident_bytes(model) == base + c_bytes * (4 + 2) // 8


def test_per_layer_map_budget_and_refusals(nested_ckpt, ids):
    model = load_model(nested_ckpt).model
    out = model.set_precision({"*.mlp.*": 2})
    assert {r for n, r in out["layers"].items() if ".mlp." in n} == {2}
    assert {r for n, r in out["layers"].items() if ".mlp." not in n} == {8}
    out = model.set_precision(budget=3.5)  # tiny layers: per-channel α, z add ~0.45 bits to every width
    assert out["bits_per_weight"] <= 3.5 and sorted(set(out["layers"].values())) == [2, 4]
    before = _logits(model, ids)
    for bad, kw in ((9, {}), (0, {}), ({"*.mlp.*": 9}, {}), ({"nothing.*": 2}, {}), (None, {}), (4, {"budget": 3.0})):
        with pytest.raises(BitnestError):
            model.set_precision(bad, **kw)
    assert torch.equal(_logits(model, ids), before)  # a refused switch changes nothing
    with pytest.raises(BitnestError):
        runtime.set_precision(torch.nn.Linear(2, 2), 4)  # no nested layers


@pytest.fixture(scope="module")
def ref10m_sliced(ref10m_path):
    m = load_model(ref10m_path)
    quantize(m.model, "sliced", bits=8, progress=False)
    return m


def test_greedy_decoding_same_tokens_fast_and_reference(ref10m_sliced):
    """64 greedy tokens on ref-10m: the fast kernels and the reference path choose the same tokens, at int8 and
    after a run-time switch to int4."""
    m = ref10m_sliced
    for r in (8, 4):
        runtime.set_precision(m.model, r)
        fast = generate(m.model, m.tokenizer, "The history of the city", max_new_tokens=64, stop_at_eos=False)
        with kernels.use("reference"):
            ref = generate(m.model, m.tokenizer, "The history of the city", max_new_tokens=64, stop_at_eos=False)
        assert fast.new_tokens == 64 and fast.ids == ref.ids, r
    runtime.set_precision(m.model, 8)


def test_generate_cli_streams_switches_and_refuses(nested_ckpt, capsys, monkeypatch):
    needs_tokenizer(nested_ckpt)
    assert main(["generate", "--model", str(nested_ckpt), "--bits", "2", "--prompt", "hello", "--max-new-tokens", "8",
                 "--json", "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] <= 8 and "int2" in out["precision"] and out["decode_tok_s"] > 0
    loaded = load_model(nested_ckpt)
    loaded.model.set_precision(2)
    assert out["text"] == generate(loaded.model, loaded.tokenizer, "hello", max_new_tokens=8).text
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n:bits 3\n:bits 12\n:mix *.mlp.*=2\n:nope\nhello\n:quit\nnever\n"))
    assert main(["generate", "--model", str(nested_ckpt), "--interactive", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert err.count("tok/s decode") == 2 and "switched" in err and "int3" in err
    assert "cannot serve" in err and "unknown command :nope" in err
    for argv in (["--bits", "9"], ["--bits", "4", "--budget", "3"], ["--max-new-tokens", "0"], ["--max-new-tokens", "100000"]):
        assert main(["generate", "--model", str(nested_ckpt), "--prompt", "hi", *argv]) == 2
        assert capsys.readouterr().err.startswith("bitnest: error:")


def test_packed_view_is_reused_and_follows_its_tensors(nested_ckpt, ids):
    """The layer's packed view (nn/view.py) is built once; rebinding a buffer, a switch or .to() rebuilds it, and an
    in-place write is seen through it (it references the buffers, never copies them)."""
    model = load_model(nested_ckpt).model
    lin = next(m for m in model.modules() if isinstance(m, QuantLinear))
    p = lin.packed
    assert lin.packed is p and kernels.path_for(ids.float(), p) == kernels.path_for(ids.float(), lin.packed)
    model.set_precision(4)
    p4 = lin.packed
    assert p4 is not p and p4.bits == 4 and lin.packed is p4 and p4.qweight is lin.qweight_r
    model.set_precision(8)
    assert lin.packed.qweight is lin.qweight and lin.packed.bits == 8
    before = _logits(model, ids)
    q = lin.qweight.clone()
    with torch.no_grad():
        lin.qweight.copy_(torch.flip(q, [0]))  # in place: the same view, new values
    assert lin.packed.qweight is lin.qweight and not torch.equal(_logits(model, ids), before)
    lin.qweight = q  # rebound: a new view
    assert lin.packed.qweight is q and torch.equal(_logits(model, ids), before)
    model.to(torch.float64)  # _apply drops the view; the codes are integers and stay
    assert "_view" not in lin.__dict__ and lin.packed.qweight is lin.qweight


def test_layers_pickle_after_a_forward_on_every_path():
    """The cached view (and the path memoised on it, which holds functions) is left out of pickles and copies."""
    import copy
    import pickle

    from bitnest.grids.affine import AffineSpec
    lin = torch.nn.Linear(256, 64, bias=True)
    q = QuantLinear.from_linear(lin, AffineSpec(4, 64, False))
    x = torch.randn(3, 256)
    for path in ("reference", None):
        with kernels.use(path):
            y = q(x)
            for clone in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
                assert "_view" not in clone.__dict__ and torch.equal(clone(x), y)
            assert "_path" not in pickle.loads(pickle.dumps(q.packed)).__dict__
