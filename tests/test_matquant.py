"""MatQuant: training numerics equal deployment numerics at every r, parsing of R / λ / co-distillation specs,
co-distillation targets, resumable training through the method, Extra Precision storage and bits, and a
short QAT run that actually repairs the int2 slice."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernel_tol import assert_close

from bitnest import kernels
from bitnest.api import make_config, quantization_config, quantize
from bitnest.errors import BitnestError
from bitnest.formats.checkpoint import load_quantized, save_quantized
from bitnest.methods.matquant import (MatQuantLoss, convert, parse_bits, parse_codistill, parse_lambdas, prepare,
                                      set_precision)
from bitnest.models.blocks import select_linears
from bitnest.nn.nested import ExtraPrecisionLinear, MatQuantLinear, nested_fake_quant
from bitnest.nn.qlinear import QuantLinear


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest


def tiny_llama(seed=0, vocab=128, layers=2, hidden=32, inter=64, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def serve(model, r):
    for m in model.modules():
        if hasattr(m, "serve_bits"):
            m.serve_bits = r


def ids_(n=4, T=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("extra", [False, True], ids=["clamp", "extra_precision"])
@pytest.mark.parametrize("group_size", [None, 16], ids=["channel", "g16"])
def test_training_forward_equals_packed_forward_at_every_r(extra, group_size, tmp_path):
    model = tiny_llama()
    config = make_config("matquant", targets="all", extra_precision=extra, group_size=group_size)
    names = select_linears(model, config.targets)
    mods = prepare(model, names, config)
    with torch.no_grad():  # move the weights off their RTN start, as training does
        for m in mods.values():
            m.weight.add_(torch.randn_like(m.weight) * m.weight.std())
    ids = ids_()
    trained = {}
    with torch.no_grad():
        for r in range(1, 9):
            set_precision(mods.values(), r)
            trained[r] = model(input_ids=ids).logits
    convert(model, mods, config)
    kind = ExtraPrecisionLinear if extra else QuantLinear
    assert all(isinstance(model.get_submodule(n), kind) for n in names)
    save_quantized(model, None, tmp_path / "ck", quantization_config("matquant", config, "tiny"),
                   storage_dtype=torch.float32)
    with torch.no_grad():
        for r in range(1, 9):
            serve(model, r)
            with kernels.use("reference"):  # the same float operations: bit for bit
                assert torch.equal(model(input_ids=ids).logits, trained[r]), f"in-memory packed model differs at r={r}"
                loaded = load_quantized(tmp_path / "ck", bits=r).model
                assert torch.equal(loaded(input_ids=ids).logits, trained[r]), f"loaded checkpoint differs at r={r}"
            assert_close(loaded(input_ids=ids).logits, trained[r], what=f"fast path at r={r}")
    # the slices are genuinely different models (the test would be vacuous otherwise)
    assert not torch.equal(trained[8], trained[2])


def test_nested_fake_quant_matches_the_papers_worked_examples():
    """A row whose MinMax grid is the identity on 0..255 (α = 1, z = 0): S(q, 2) reproduces 53→64,
    240→192 (clamped) and, without the clamp, 234→256."""
    from bitnest.grids.affine import AffineSpec
    W = torch.tensor([[0.0, 53.0, 240.0, 234.0, 255.0]])
    spec = AffineSpec(8)
    assert nested_fake_quant(W, spec, 2).tolist() == [[0.0, 64.0, 192.0, 192.0, 192.0]]
    assert nested_fake_quant(W, spec, 2, clamp=False).tolist() == [[0.0, 64.0, 256.0, 256.0, 256.0]]


def test_omniquant_block_forward_equals_packed_after_folding():
    """Learnable clipping + LET scales: the trained block's forward at every r equals the folded, packed
    block's; and before quantization the LET is an exact re-parametrization (up to the bf16 norm weight)."""
    from bitnest.calib.driver import capture_block_inputs
    from bitnest.methods.omniquant import attach_let, finalize_block
    from bitnest.grids.affine import AffineSpec
    model = tiny_llama()
    block = model.model.layers[0]
    inps, kws = capture_block_inputs(model, block, ids_(), batch_size=4)
    x, kw = inps[0], kws[0]
    with torch.no_grad():
        y_fp = block(x, **kw)
        y_fp = y_fp[0] if isinstance(y_fp, tuple) else y_fp
    spec = AffineSpec(8)
    local = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    mods = {}
    for n in local:
        mods[n] = MatQuantLinear(block.get_submodule(n), spec, train_weight=False, learn_clip=True)
        setattr(block.mlp, n.split(".")[1], mods[n])
    params, norms = attach_let(block, mods)
    assert len(params) == 2 and len(norms) == 1
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for m in mods.values():
            m.clip_logits.copy_(torch.randn(m.clip_logits.shape, generator=g) + 2.0)
    # LET alone is the identity on the un-quantized function
    with torch.no_grad():
        plain = copy.deepcopy(block)
        for n in local:
            m = mods[n]
            lin = nn.Linear(m.in_features, m.out_features, bias=False)
            lin.weight.copy_(m.effective_weight())
            setattr(plain.mlp, n.split(".")[1], lin)
        plain.post_attention_layernorm = copy.deepcopy(norms[0][1].norm)
        plain.post_attention_layernorm.weight.copy_(norms[0][1].folded_weight())
        y_plain = plain(x, **kw)
        y_plain = y_plain[0] if isinstance(y_plain, tuple) else y_plain
    assert torch.allclose(y_plain, y_fp, rtol=0, atol=1e-2 * y_fp.abs().max().item())
    outs = {}
    with torch.no_grad():
        for r in (8, 4, 2):
            set_precision(mods.values(), r)
            o = block(x, **kw)
            outs[r] = o[0] if isinstance(o, tuple) else o
    finalize_block(block, mods, norms, 8)
    assert isinstance(block.mlp.down_proj, QuantLinear)
    assert not any(isinstance(m, MatQuantLinear) for m in block.modules())
    with torch.no_grad():
        for r in (8, 4, 2):
            for n in local:
                block.get_submodule(n).serve_bits = r
            o = block(x, **kw)
            assert torch.equal(o[0] if isinstance(o, tuple) else o, outs[r]), f"r={r}"


# ------------------------------------------------------------------------------------------------ parsing


def test_parse_precisions_and_lambdas():
    assert parse_bits("8,4,2") == (8, 4, 2)
    assert parse_bits(" 2 , 8 ") == (2, 8)
    assert parse_lambdas("0.1,0.1,1") == (0.1, 0.1, 1.0)
    for bad in ("", "8,4,x", "8,9", "0,4", "8,8"):
        with pytest.raises(BitnestError) as e:
            parse_bits(bad)
        assert "\n" not in str(e.value)
    for bad in ("", "a", "0,0", "-1,1", "inf,1"):
        with pytest.raises(BitnestError):
            parse_lambdas(bad)


def test_config_orders_precisions_and_defaults_lambdas():
    c = make_config("matquant")
    assert c.precisions == (8, 4, 2) and c.lambdas == (0.1, 0.1, 1.0) and c.targets == "ffn" and c.bits == 8
    c = make_config("matquant", precisions="2,8,4", lambdas="1,0.2,0.3")  # strings, as -o gives them
    assert c.precisions == (8, 4, 2) and c.lambdas == (0.2, 0.3, 1.0)
    assert make_config("matquant", extra_precision=True).lambdas == (1.0, 1.0, 1.0)
    sp = make_config("matquant", precisions=(2,))
    assert sp.lambdas == (1.0,) and sp.parent_bits == 8 and sp.bits == 2
    base = make_config("matquant", precisions=(3,), parent_bits=3)  # the paper's "Baseline" for int3
    assert base.spec.bits == 3 and base.bits == 3
    assert make_config("matquant", flavour="omniquant").schedule == "constant"
    with pytest.raises(BitnestError, match="lambdas"):
        make_config("matquant", lambdas=(0.1, 1.0))
    with pytest.raises(BitnestError, match="parent_bits"):
        make_config("matquant", precisions=(8, 4), parent_bits=4)
    with pytest.raises(BitnestError, match="flavour"):
        make_config("matquant", flavour="gptq")
    with pytest.raises(BitnestError, match="differ"):
        make_config("matquant", precisions=(8, 4), codistill="[8,4,2,8→2]")
    # the config survives the checkpoint's JSON round trip
    c = make_config("matquant", codistill="[8,4,8->2]", lambdas=(0.4, 0.4, 1.0))
    d = json.loads(json.dumps(c.to_dict()))
    assert type(c).from_dict(d) == c


def test_parse_codistill_notation():
    cd = parse_codistill("[8,4,2,8→2]")
    assert cd.gt == (8, 4, 2) and cd.edges == ((8, 2),) and cd.precisions == (8, 4, 2)
    cd = parse_codistill("[8, 4, 2, 8 -> 4;2]")
    assert cd.gt == (8, 4, 2) and cd.edges == ((8, 4), (8, 2))
    cd = parse_codistill("8,4,8→2")  # brackets optional; int2 has no ground-truth term
    assert cd.gt == (8, 4) and cd.edges == ((8, 2),) and cd.precisions == (8, 4, 2)
    plan = make_config("matquant", codistill="[8,4,8→2]").plan()
    assert plan.order == (8, 4, 2) and 2 not in plan.gt and plan.sources_of(2) == [8] and plan.main == 2
    for bad in ("[8,4,2,8→9]", "[8,4,2,2→8]", "[8,4,,2]", "[]", "[8,4,2,8→2", "[8,8]", "abc", "[4,2,8→2]",
                "[8,4,2,8→2→1]", "[8,4,2,8→2,8→2]"):
        with pytest.raises(BitnestError) as e:
            parse_codistill(bad)
        assert "\n" not in str(e.value) and "co-distillation" in str(e.value)


def test_cli_matquant_flags(tiny_llama_dir, tmp_path, capsys):
    from bitnest.cli import main
    out = tmp_path / "mq"
    rc = main(["quantize", "--model", str(tiny_llama_dir), "--method", "matquant", "--flavour", "qat",
               "--bits", "8,4,2", "--lambdas", "0.2,0.2,1", "--codistill", "[8,4,2,8->2]", "-o", "steps=2",
               "-o", "batch=2", "-o", "n_calib=2", "-o", "calib_len=16", "-o", "calib_data=generate",
               "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["info", "--model", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = info["config"]
    assert info["method"] == "matquant" and info["nested"]
    assert cfg["precisions"] == [8, 4, 2] and cfg["lambdas"] == [0.2, 0.2, 1.0] and cfg["codistill"] == "[8,4,2,8->2]"
    assert cfg["targets"] == "ffn" and all("mlp" in n for n in info["layers"]) and len(info["layers"]) == 6
    for argv, msg in ((["--codistill", "[8,4,2,8→9]"], "co-distillation"),
                      (["--lambdas", "0.1,1"], "lambdas"),
                      (["--method", "rtn", "--bits", "8,4"], "matquant")):
        argv = ["quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "x")] + \
            (["--method", "matquant"] if "--method" not in argv else []) + argv
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("bitnest: error:") and err.count("\n") == 1 and msg in err


# ------------------------------------------------------------------------------------------------ losses


def test_codistill_targets_are_the_detached_int8_outputs():
    """[8,8→2] with λ8 = 0: the loss is KL(int2 ‖ int8 target); its gradient equals the one computed with the
    int8 logits taken under no_grad, and those logits are exactly the int8 slice's forward."""
    model = tiny_llama()
    config = make_config("matquant", codistill="[8,8→2]", lambdas=(0.0, 1.0))
    names = select_linears(model, config.targets)
    mods = prepare(model, names, config)
    ids = ids_()
    seen = {}
    loss_fn = MatQuantLoss(list(mods.values()), config.plan(), kd="kl")
    orig = loss_fn.logits

    def spy(student, x, r):
        out = orig(student, x, r)
        seen[r] = out.detach().clone()
        return out

    loss_fn.logits = spy
    out = loss_fn(model, ids)
    assert set(out) == {"loss", "int8", "8→2"}  # int8's CE is computed (a part) but weighted 0
    out["loss"].backward()
    g1 = {n: m.weight.grad.clone() for n, m in mods.items()}
    for m in mods.values():
        m.weight.grad = None
    with torch.no_grad():
        set_precision(mods.values(), 8)
        t8 = model(input_ids=ids).logits
    assert torch.equal(t8, seen[8])
    set_precision(mods.values(), 2)
    s2 = model(input_ids=ids).logits
    V = s2.shape[-1]
    manual = F.kl_div(F.log_softmax(s2.reshape(-1, V), -1), F.log_softmax(t8.reshape(-1, V), -1),
                      log_target=True, reduction="sum") / s2[..., 0].numel()
    assert torch.allclose(manual, out["8→2"], atol=1e-6)
    manual.backward()
    for n, m in mods.items():
        assert torch.allclose(m.weight.grad, g1[n], atol=1e-8, rtol=1e-5), n
    # and the KL gradient really depends on the target: had it not been detached, int8's path would add to it
    assert sum(g.abs().sum() for g in g1.values()) > 0


def test_loss_parts_follow_the_plan():
    model = tiny_llama()
    config = make_config("matquant", codistill="[8,4,2,8→4;2]", distill_fp=0.5)
    student = copy.deepcopy(model)
    mods = prepare(student, select_linears(student, config.targets), config)
    loss_fn = MatQuantLoss(list(mods.values()), config.plan(), teacher=model, distill_fp=0.5)
    out = loss_fn(student, ids_())
    assert set(out) == {"loss", "int8", "int4", "int2", "8→4", "8→2", "fp→8", "fp→4", "fp→2"}
    lam = dict(config.plan().lam)
    expect = (lam[8] * (out["int8"] + 0.5 * out["fp→8"]) + lam[4] * (out["int4"] + out["8→4"] + 0.5 * out["fp→4"])
              + lam[2] * (out["int2"] + out["8→2"] + 0.5 * out["fp→2"]))
    assert torch.allclose(out["loss"], expect)


# ------------------------------------------------------------------------------------------------ training


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
    model = tiny_llama()
    ids = ids_(8, 16)
    kw = dict(steps=6, batch=2, lr=5e-3, ckpt_every=2, progress=False, calib=ids)
    full = quantize(copy.deepcopy(model), "matquant", ckpt_dir=str(tmp_path / "a"), **kw)

    calls = {"n": 0}
    real = MatQuantLoss.__call__

    def interrupting(self, student, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4: steps 1-3 are done
            raise KeyboardInterrupt
        return real(self, student, batch)

    monkeypatch.setattr(MatQuantLoss, "__call__", interrupting)
    with pytest.raises(KeyboardInterrupt):
        quantize(copy.deepcopy(model), "matquant", ckpt_dir=str(tmp_path / "b"), **kw)
    monkeypatch.setattr(MatQuantLoss, "__call__", real)
    resumed = quantize(copy.deepcopy(model), "matquant", ckpt_dir=str(tmp_path / "b"), **kw)
    assert resumed.bitnest_train.resumed_from == 3
    assert [h["loss"] for h in resumed.bitnest_train.history] == [h["loss"] for h in full.bitnest_train.history]
    sa, sb = full.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.qweight"],
                           quantize(copy.deepcopy(model), "sliced", bits=8, targets="ffn", progress=False)
                           .state_dict()["model.layers.0.mlp.up_proj.qweight"])  # training changed the codes


def _perm_language_model():
    """A tiny Llama that has learned x_{t+1} = π(x_t) for a random permutation π (its FFN matters)."""
    from bitnest.train import Batches, train
    V = 64
    model = tiny_llama(vocab=V, inter=128, tie=True)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(5))

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.empty(n, 32, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (n,), generator=g)
        for t in range(1, 32):
            x[:, t] = perm[x[:, t - 1]]
        return x

    tr, te = data(256, 0), data(32, 1)
    ce = lambda m, b: F.cross_entropy(m(input_ids=b).logits[:, :-1].reshape(-1, V), b[:, 1:].reshape(-1))
    train(model, Batches(tr, 16), ce, steps=150, lr=1e-2, warmup=10, progress=False)
    return model.eval(), tr, te


def test_short_qat_lowers_the_int2_loss():
    from bitnest.mixnmatch import mean_nll
    model, tr, te = _perm_language_model()
    fp = mean_nll(model, te)
    before = quantize(copy.deepcopy(model), "sliced", bits=2, targets="ffn", progress=False)  # = MatQuant at step 0
    nll_before = mean_nll(before, te)
    assert nll_before > fp + 0.01  # int2 hurts this model
    trained = quantize(copy.deepcopy(model), "matquant", steps=30, batch=16, lr=1e-3, calib=tr, progress=False)
    parts = trained.bitnest_train.history
    assert {"int8", "int4", "int2"} <= set(parts[0])
    serve(trained, 2)
    nll_after = mean_nll(trained, te)
    assert nll_after < fp + 0.5 * (nll_before - fp), (fp, nll_before, nll_after)


def test_baseline_stores_r_bit_codes(tmp_path):
    """The paper's Baseline: R = {r} on an r-bit MinMax grid, same code path; nothing to re-slice above r."""
    model = tiny_llama()
    q = quantize(copy.deepcopy(model), "matquant", precisions=(3,), parent_bits=3, steps=2, batch=2, calib=ids_(),
                 progress=False)
    m = q.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(m, QuantLinear) and m.bits == m.parent_bits == m.serve_bits == 3
    save_quantized(q, None, tmp_path / "b", quantization_config("matquant", q.bitnest_method[1], "tiny"))
    with pytest.raises(BitnestError, match="3-bit codes"):
        load_quantized(tmp_path / "b", bits=4)


# ------------------------------------------------------------------------------------------------ extra precision


def test_extra_precision_bits_accounting():
    """64 × 256 layer, α = 1, z = 0: the k weights in int2's extra bucket (q ≥ 224 → t = 4) cost a row-compressed
    list — 8-bit column indices (⌈log2 256⌉) and per-row counts at the bits of the largest count, each as
    bit-planes in whole bytes — on top of 2 bits per weight and fp16 α, z per row."""
    out, inp = 64, 256
    q = torch.full((out, inp), 128, dtype=torch.uint8)
    top = torch.tensor([3, 700, 1025, 4095, 9000, 9001, 12000, 16000, 16383, 5])  # 10 flat positions
    q.view(-1)[top] = torch.tensor([224, 230, 255, 240, 250, 224, 226, 231, 255, 249], dtype=torch.uint8)
    q.view(-1)[100] = 223  # rounds to 3 at r = 2: not in the bucket
    m = ExtraPrecisionLinear.from_codes(q, torch.ones(out, 1, dtype=torch.float16), torch.zeros(out, 1, dtype=torch.float16),
                                        parent_bits=8, serve_bits=2, group_size=None, symmetric=False)
    assert m.n_extra() == 10
    assert m.extra_counts_per_row().max().item() == 2  # rows 0 and 35 hold two each: 2-bit counts
    codes_and_scales = out * inp * 2 + out * 16 * 2
    assert m.served_bits() == codes_and_scales + 8 * 16 + 2 * 64  # cols: 8 planes × 2 bytes; counts: 2 planes × 8 bytes
    assert m.served_bits() / m.num_weights() == pytest.approx(2.140625)
    m.serve_bits = 4  # int4: t = round(q/16) = 16 only for q ≥ 248: 250, 255, 255, 249
    assert m.n_extra() == 4
    m.serve_bits = 8
    assert m.n_extra() == 0 and m.served_bits() == out * inp * 8 + out * 32
    m.serve_bits = 2
    W = m.dequantized_weight()
    assert W.max().item() == 256.0 and (W == 256.0).sum().item() == 10  # the extra level 2^r · 64 exists
    s = m.to_standalone()
    assert s.standalone and s.bits == 2 and s.qweight.shape == (out, inp * 2 // 8)
    assert s.extra_cols.shape == (8, 2) and s.extra_counts.shape == (2, 8)
    assert torch.equal(s.dequantized_weight(), W) and s.served_bits() == m.served_bits()


def test_extra_precision_checkpoint_and_standalone_slice(tmp_path, capsys):
    """Nested EP checkpoint served at r == its standalone slice written by `bitnest slice`, bit for bit; the
    slice stores r-bit codes plus the index list, and is counted as such."""
    from bitnest.cli import main
    from bitnest.eval.bits import bits_report
    model = tiny_llama(vocab=128, hidden=64, inter=256)
    q = quantize(copy.deepcopy(model), "matquant", extra_precision=True, steps=2, batch=2, calib=ids_(), progress=False)
    cfg = q.bitnest_method[1]
    assert cfg.lambdas == (1.0, 1.0, 1.0)
    save_quantized(q, None, tmp_path / "ep", quantization_config("matquant", cfg, "tiny"), storage_dtype=torch.float32)
    ids = ids_()
    nested2 = load_quantized(tmp_path / "ep", bits=2).model
    m = nested2.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(m, ExtraPrecisionLinear) and m.serve_bits == 2 and m.n_extra() > 0
    ffn = [n for n, mm in nested2.named_modules() if isinstance(mm, ExtraPrecisionLinear)]
    bpw = bits_report(nested2, only=ffn).bits_per_weight
    # 2 bits + fp16 α, z per row + the lists (column planes + count planes, whole bytes per plane)
    from bitnest.nn.nested import list_bits
    mods = [nested2.get_submodule(n) for n in ffn]
    expect = sum(mm.out_features * (mm.in_features * 2 + 32) + list_bits(mm.extra_counts_per_row(), mm.in_features)
                 for mm in mods)
    assert bpw == pytest.approx(expect / sum(mm.num_weights() for mm in mods)) and bpw > 2 + 32 / 64
    assert main(["slice", "--model", str(tmp_path / "ep"), "--bits", "2", "--out", str(tmp_path / "s2")]) == 0
    capsys.readouterr()
    sliced = load_quantized(tmp_path / "s2").model
    sm = sliced.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(sm, ExtraPrecisionLinear) and sm.standalone and sm.bits == 2
    with torch.no_grad():
        assert torch.equal(sliced(input_ids=ids).logits, nested2(input_ids=ids).logits)
    assert bits_report(sliced, only=ffn).bits_per_weight == pytest.approx(bpw)
