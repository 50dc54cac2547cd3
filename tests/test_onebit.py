"""OneBit: sign grid, SVID, the 1-bit layer (training == packed), bits accounting, the method, checkpoints."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from kernel_tol import assert_close

from bitnest import kernels
from bitnest.errors import BitnestError
from bitnest.grids.sign import (bits_per_weight, codes_to_sign, nmf, pack_signs, paper_bits_per_parameter,
                                proposition2_errors, rank1_svd, sign, sign_codes, sign_ste, svid, unpack_signs)
from bitnest.nn.onebit import BitNetLinear, OneBitLinear, PackedSignLinear


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest


def rank1_abs_matrix(out, inp, seed=0):
    """W = S ⊙ a bᵀ with random signs S and positive a, b: |W| is exactly rank 1."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(out, generator=g) + 0.1, torch.rand(inp, generator=g) + 0.1
    S = torch.where(torch.rand(out, inp, generator=g) < 0.5, -1.0, 1.0)
    return S * a[:, None] * b[None, :], S


# ------------------------------------------------------------------------------------------------ signs


@pytest.mark.parametrize("shape", [(1, 1), (3, 8), (5, 13), (7, 64), (2, 257)])
def test_sign_pack_unpack_exact(shape, device):
    W = torch.randn(*shape, device=device)
    W[0, 0] = 0.0  # Sign(0) = +1
    packed = pack_signs(W)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], (shape[1] + 7) // 8)
    S = unpack_signs(packed, shape[1])
    assert torch.equal(S, sign(W).float())
    assert S[0, 0] == 1.0 and set(S.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(codes_to_sign(sign_codes(W)), S)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), n=st.integers(1, 70), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_sign_pack_property(rows, n, seed, dtype):
    """Any width (padding bits), exact zeros and −0.0 (Sign = +1: IEEE −0.0 < 0 is false), any float dtype."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, n, generator=g)                            # (rows, n)
    special = torch.rand(rows, n, generator=g)
    W = torch.where(special < 0.1, 0.0, torch.where(special < 0.2, -0.0, W)).to(dtype)
    packed = pack_signs(W)                                           # (rows, ceil(n/8)) uint8
    assert packed.shape == (rows, (n + 7) // 8)
    if n % 8:  # padding bits stay 0, so equal sign matrices give equal bytes
        assert int((packed[:, -1] >> (n % 8)).max()) == 0
    S = unpack_signs(packed, n, dtype)                               # (rows, n) ±1
    assert S.dtype == dtype
    assert torch.equal(S, torch.where(W.float() < 0, -1.0, 1.0).to(dtype))


def test_sign_golden_bytes():
    # code 1 = negative; weight i of a row is bit i of the stream, LSB first; rows padded to whole bytes
    W = torch.tensor([[-1.0, 1, 1, 1, 1, 1, 1, -1, 1, -1]])
    assert pack_signs(W).tolist() == [[0b1000_0001, 0b0000_0010]]


def test_sign_backward_variants():
    W = torch.linspace(-3, 3, 13, requires_grad=True)
    g = torch.randn(13)
    sign_ste(W, "tanh").backward(g)
    assert torch.allclose(W.grad, g * (1.001 - torch.tanh(W.detach()) ** 2))
    W.grad = None
    sign_ste(W, "ste").backward(g)
    assert torch.equal(W.grad, g)
    W.grad = None
    sign_ste(W, "clipped").backward(g)
    assert torch.equal(W.grad, g * (W.detach().abs() <= 1))
    with pytest.raises(BitnestError):
        sign_ste(W, "sigmoid")


# ------------------------------------------------------------------------------------------------ SVID


@pytest.mark.parametrize("method", ["svd", "nmf"])
@pytest.mark.parametrize("shape", [(16, 16), (48, 24), (24, 96)])
def test_svid_reconstructs_rank1_abs_exactly(method, shape):
    W, S = rank1_abs_matrix(*shape)
    a, b = svid(W, method)
    assert (a >= 0).all() and (b >= 0).all()
    rec = S * a[:, None] * b[None, :]
    assert (rec - W).abs().max().item() <= 1e-5 * W.abs().max().item()
    assert a.norm().item() == pytest.approx(b.norm().item(), rel=1e-4)  # balanced for float16 storage


def test_proposition2_on_random_matrices():
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        out, inp = (int(x) for x in torch.randint(2, 40, (2,), generator=g))
        kind = i % 4
        W = torch.randn(out, inp, generator=g, dtype=torch.float64)
        if kind == 1:  # heavy-tailed
            W = W ** 3
        elif kind == 2:  # strongly rank-1 plus noise (the hard case: the plain rank-1 fit is good)
            W = torch.randn(out, 1, generator=g, dtype=torch.float64) @ torch.randn(1, inp, generator=g, dtype=torch.float64) + 0.01 * W
        elif kind == 3:  # one-signed
            W = W.abs() + 0.1
        sign_err, rank1_err = proposition2_errors(W)
        assert sign_err <= rank1_err * (1 + 1e-9) + 1e-12, (i, sign_err, rank1_err)


def test_nmf_and_svd_reach_the_same_rank1_fit():
    W = torch.randn(64, 48, generator=torch.Generator().manual_seed(1)) * 0.02
    A = W.abs().double()
    U, V = nmf(A, rank=1, iters=500, tol=1e-12)
    a, b = rank1_svd(A)
    e_nmf = (A - U @ V).norm().item()
    e_svd = (A - a[:, None] * b[None, :]).norm().item()
    assert (U >= 0).all() and (V >= 0).all()
    assert e_nmf == pytest.approx(e_svd, rel=1e-6)
    U2, V2 = nmf(A, rank=3, iters=300)
    assert (A - U2 @ V2).norm().item() < e_svd  # a real NMF: more components fit better
    with pytest.raises(BitnestError):
        nmf(-A)


# ------------------------------------------------------------------------------------------------ layer


@pytest.mark.parametrize("init", ["nmf", "svd", "sign"])
@pytest.mark.parametrize("post_ln", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_training_forward_equals_packed_forward(init, post_ln, bias, device):
    torch.manual_seed(0)
    lin = nn.Linear(37, 19, bias=bias).to(device)
    m = OneBitLinear.from_linear(lin, init=init, post_ln=post_ln)
    with torch.no_grad():  # move g, h off the float16 grid: the training forward must round them itself
        m.g.mul_(1 + 1e-4 * torch.randn_like(m.g))
        m.h.mul_(1 + 1e-4 * torch.randn_like(m.h))
    x = torch.randn(3, 5, 37, device=device)
    p = m.to_packed()
    with kernels.use("reference"):
        assert torch.equal(m(x), p(x))
    assert_close(p(x), m(x))
    assert p.g.dtype == p.h.dtype == torch.float16
    assert not any(t.shape == lin.weight.shape for t in p.state_dict().values())  # no FP weight stored


def test_bitnet_training_forward_equals_packed_forward(device):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24).to(device)
    for post_ln in (False, True):
        m = BitNetLinear.from_linear(lin, post_ln=post_ln)
        x = torch.randn(4, 40, device=device)
        p = m.to_packed()
        with kernels.use("reference"):
            assert torch.equal(m(x), p(x))
        assert_close(p(x), m(x))
        assert p.g is None and p.h.numel() == 1
        assert p.served_bits() == 24 * 40 + 16
    # the weight it computes with: Sign(W − μ) · β
    W = lin.weight.detach()
    Wc = W - W.mean()
    expected = sign(Wc) * Wc.abs().mean().half().float()
    x = torch.randn(4, 40, device=device)
    assert torch.allclose(BitNetLinear.from_linear(lin)(x), x @ expected.T + lin.bias.detach(), atol=1e-5)


def test_svid_init_without_ln_reproduces_rank1_abs_layer():
    W, _ = rank1_abs_matrix(32, 48, seed=3)
    lin = nn.Linear(48, 32, bias=False)
    lin.weight.data.copy_(W)
    x = torch.randn(10, 48)
    for init in ("svd", "nmf"):
        m = OneBitLinear.from_linear(lin, init=init, post_ln=False)
        err = (m(x) - x @ W.T).norm() / (x @ W.T).norm()
        assert err.item() < 2e-3  # float16 rounding of g, h only
    sign_only = OneBitLinear.from_linear(lin, init="sign", post_ln=False)
    assert torch.equal(sign_only.g.data, torch.ones(48)) and torch.equal(sign_only.h.data, torch.ones(32))


def test_latent_inits():
    lin = nn.Linear(16, 8)
    W = lin.weight.detach()
    assert torch.equal(OneBitLinear.from_linear(lin, latent_init="paper").weight.data, W)
    assert torch.equal(OneBitLinear.from_linear(lin, latent_init="reference").weight.data, sign(W) * 0.01)
    with pytest.raises(BitnestError):
        OneBitLinear.from_linear(lin, init="pca")
    with pytest.raises(BitnestError):
        OneBitLinear.from_linear(lin, latent_init="zeros")


def test_sign_backward_reaches_latent_weight_g_and_h():
    m = OneBitLinear.from_linear(nn.Linear(12, 6, bias=False))
    m(torch.randn(5, 12)).pow(2).sum().backward()
    for p in (m.weight, m.g, m.h):
        assert p.grad is not None and p.grad.abs().sum().item() > 0


# ------------------------------------------------------------------------------------------------ bits


def test_bits_accounting_4096():
    assert round(paper_bits_per_parameter(4096, 4096), 4) == 1.0073
    assert paper_bits_per_parameter(4096, 4096) == 16_908_288 / 16_785_408
    assert round(bits_per_weight(4096, 4096), 4) == 1.0078
    p = PackedSignLinear(4096, 4096)
    assert p.served_bits() == 4096 * 4096 + 2 * 4096 * 16 == 16_908_288
    assert p.num_weights() == 4096 * 4096
    assert p.served_bits() / p.num_weights() == bits_per_weight(4096, 4096)


def test_bits_report_counts_packed_layers():
    from bitnest.eval.bits import bits_report

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64, bias=False))
    model[0] = OneBitLinear.from_linear(model[0]).to_packed()
    rep = bits_report(model, torch.float16)
    assert rep.quantized_weights == 64 * 32
    assert rep.bits_per_weight == pytest.approx((64 * 32 + 16 * 96) / (64 * 32))
    assert rep.model_bytes == (64 * 32 + 16 * 96) // 8 + 32 * 2 + 32 * 64 * 2  # + bias + the FP Linear


# ------------------------------------------------------------------------------------------------ method + checkpoint


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def test_config_validation():
    from bitnest.api import make_config
    assert make_config("onebit", steps=5).bits == 1
    for bad in ({"bits": 2}, {"init": "pca"}, {"latent_init": "x"}, {"steps": 0}, {"kd": "mse"}, {"group_size": 64}):
        with pytest.raises(BitnestError):
            make_config("onebit", **bad)
    with pytest.raises(BitnestError):
        make_config("bitnet", sign_backward="sigmoid")


@pytest.mark.parametrize("method", ["onebit", "bitnet"])
def test_method_trains_and_round_trips_through_checkpoint(method, tmp_path):
    from bitnest.api import quantization_config, quantize
    from bitnest.formats.checkpoint import save_quantized
    from bitnest.models.blocks import select_linears
    from bitnest.models.hf import load_model

    model = tiny_model()
    with torch.no_grad():  # a bf16 checkpoint, as ref-10m: the unquantized tensors survive bf16 storage exactly
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    names = select_linears(model, "all")
    emb = model.model.embed_tokens.weight.detach().clone()
    quantize(model, method, steps=12, lr=3e-3, batch=4, seq_len=16, samples=8, gen_batch=8, progress=False)
    assert all(isinstance(model.get_submodule(n), PackedSignLinear) for n in names)
    assert torch.equal(model.model.embed_tokens.weight, emb)  # embeddings (and the tied lm_head) untouched
    hist = model.bitnest_train.history
    assert len(hist) == 12 and model.bitnest_train.tokens == 12 * 4 * 16
    assert {"kd", "hidden"} <= set(hist[0])

    out = save_quantized(model, None, tmp_path / "ck", quantization_config(method, model.bitnest_method[1], "tiny"),
                         storage_dtype=torch.bfloat16)
    loaded = load_model(out)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    m = loaded.model.get_submodule(names[0])
    assert isinstance(m, PackedSignLinear) and m.method == method
    assert m.h.dtype == torch.float16  # value vectors keep float16, not the bf16 storage dtype
    from bitnest.eval.bits import bits_report
    shapes = [(loaded.model.get_submodule(n).out_features, loaded.model.get_submodule(n).in_features) for n in names]
    vec = (lambda o, i: 16 * (o + i)) if method == "onebit" else (lambda o, i: 16)
    expected = sum(o * i + vec(o, i) for o, i in shapes) / sum(o * i for o, i in shapes)
    assert bits_report(loaded.model).bits_per_weight == pytest.approx(expected, rel=1e-12)


def test_onebit_distillation_lowers_the_loss():
    from bitnest.api import quantize

    model = tiny_model(seed=1)
    quantize(model, "onebit", steps=40, lr=1e-2, batch=4, seq_len=16, samples=16, gen_batch=16, progress=False)
    h = model.bitnest_train.history
    first = sum(x["loss"] for x in h[:4]) / 4
    last = sum(x["loss"] for x in h[-4:]) / 4
    assert last < 0.8 * first, (first, last)


def test_onebit_resumes_bit_identically_through_the_method(tmp_path, monkeypatch):
    from bitnest.api import quantize
    from bitnest.train.distill import Distill

    kw = dict(steps=5, lr=3e-3, batch=2, seq_len=12, samples=6, gen_batch=6, progress=False)
    ref = tiny_model(seed=2)
    quantize(ref, "onebit", **kw)

    calls = {"n": 0}
    real = Distill.__call__

    def crash_on_4th_step(self, student, ids):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real(self, student, ids)

    monkeypatch.setattr(Distill, "__call__", crash_on_4th_step)
    with pytest.raises(RuntimeError, match="killed"):
        quantize(tiny_model(seed=2), "onebit", ckpt_dir=str(tmp_path), ckpt_every=2, **kw)
    monkeypatch.setattr(Distill, "__call__", real)

    resumed = tiny_model(seed=2)
    quantize(resumed, "onebit", ckpt_dir=str(tmp_path), ckpt_every=2, **kw)
    assert resumed.bitnest_train.resumed_from == 2 and resumed.bitnest_train.steps == 5
    for (n, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("extra", ["none", "train_norms", "train_embeddings"])
def test_extra_trainables_train_exactly_what_they_name(extra):
    """Besides the 1-bit layers, train_norms trains every norm weight and train_embeddings the (tied)
    embedding matrix; nothing else moves, and every requires_grad flag is restored afterwards."""
    from bitnest.api import quantize

    kw = dict(steps=4, lr=1e-2, batch=4, seq_len=16, samples=8, gen_batch=8, progress=False)
    model = tiny_model(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    quantize(model, "onebit", **({extra: True} if extra != "none" else {}), **kw)
    after = dict(model.named_parameters())
    norms = {n for n in before if "norm" in n}
    moved = {n for n in before if n in after and not torch.equal(after[n], before[n])}
    assert moved == {"none": set(), "train_norms": norms, "train_embeddings": {"model.embed_tokens.weight"}}[extra]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: one matrix trained
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in grad_before} == \
        {n: grad_before[n] for n in after if n in grad_before}  # restored


@pytest.mark.parametrize("method", ["onebit", "bitnet"])
def test_data_file_trains_through_the_cli(ref10m_path, tmp_path, method):
    """`-o data=FILE` reads the file with the model's tokenizer (it used to error: no tokenizer reached the method)."""
    from bitnest.cli import main
    text = tmp_path / "train.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / method
    argv = ["quantize", "--model", str(ref10m_path), "--method", method, "--out", str(out), "--no-progress",
            "-o", f"data={text}", "-o", "steps=2", "-o", "batch=2", "-o", "seq_len=32", "-o", "samples=4"]
    assert main(argv) == 0
    hist = json.loads((out / "training_history.json").read_text())
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)
