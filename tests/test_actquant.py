"""Activation quantization (dynamic / static, W8A8 / W4A8) and the integer-only linear layer: the integer path
equals its float simulation exactly; W8A8 and integer-only ref-10m stay within 2% of full precision."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernel_tol import assert_close

from bitnest import kernels
from bitnest.calib.observers import Observer
from bitnest.grids.affine import AffineSpec
from bitnest.kernels.integer import P, int8_matmul, multiplier_value, quantize_multiplier, requantize, simulate_requantize
from bitnest.nn.actquant import ActQuantLinear, quant_act
from bitnest.nn.intlinear import IntLinear
from bitnest.nn.qlinear import QuantLinear


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest


def sqnr_db(y, y_hat):
    return 10 * torch.log10(y.pow(2).sum() / (y - y_hat).pow(2).sum()).item()


def test_dynamic_per_token_grid():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 64) * torch.logspace(-2, 2, 7).reshape(1, 7, 1)  # tokens of very different ranges
    xh = quant_act(x, 8)
    s = x.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(xh, torch.round(x / s).clamp(-127, 127) * s)
    # per token, never clipped: |x − x̂| ≤ s/2 up to fp32 rounding of x/s and q·s (|q| ≤ 127, so ≤ 128·eps·s)
    assert ((x - xh).abs() <= s * (0.5 + 128 * torch.finfo(x.dtype).eps)).all()
    assert sqnr_db(x, xh) > 40


def test_observers():
    torch.manual_seed(0)
    x = torch.randn(64, 16, 32)
    x[0, 0, 0] = 60.0  # one outlier
    obs = Observer(max_rows=256)
    for b in x:
        obs.add(b)
    assert obs.rows.shape == (256, 32) and obs.absmax == 60.0 and obs.count == x.numel()
    assert obs.range("minmax") == 60.0
    assert obs.range("percentile", percentile=99.9) < 6.0
    err = lambda x, c: ((quant_act(x, 8, torch.tensor(c / 127)) - x) ** 2).sum()
    # one outlier of 60 costs more clipped than it saves: MSE keeps it (the exact top values count)
    assert err(x, obs.range("mse")) <= 1.05 * err(x, 60.0)
    t = torch.distributions.Laplace(0.0, 1.0).sample((64, 16, 32))  # long tails, 4-bit grid: clipping pays
    obs = Observer(max_rows=256)
    for b in t:
        obs.add(b)
    c = obs.range("mse", bits=4)
    err4 = lambda x, c: ((quant_act(x, 4, torch.tensor(c / 7)) - x) ** 2).sum()
    assert c < 0.7 * obs.absmax and err4(t, c) < 0.7 * err4(t, obs.absmax)


def test_reservoir_is_uniform():
    obs = Observer(max_rows=500, seed=1)
    for i in range(20):
        obs.add(torch.full((100, 1), float(i)))
    counts = torch.bincount(obs.rows[:, 0].long(), minlength=20).float()
    assert counts.sum() == 500 and counts.min() > 8 and counts.max() < 45  # ≈ 25 per batch


@pytest.mark.parametrize("bits,group_size,mode", [(8, None, "dynamic"), (8, None, "static"), (4, 32, "dynamic")])
def test_actquant_linear_forward(bits, group_size, mode):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = QuantLinear.from_linear(lin, AffineSpec(bits, group_size, symmetric=bits == 8))
    x = torch.randn(3, 5, 64)
    s = x.abs().max().item() / 127 if mode == "static" else None
    m = ActQuantLinear.wrap(q, 8, mode, s)
    ref = F.linear(quant_act(x, 8, None if s is None else torch.tensor(s)), q.dequantized_weight(), lin.bias)
    with kernels.use("reference"):
        assert torch.equal(m(x), ref)
    assert_close(m(x), ref)  # the fast path
    assert sqnr_db(lin(x), m(x)) > (35 if bits == 8 else 18)


def test_w8a8_dynamic_is_an_int8_gemm():
    """With per-channel symmetric int8 weights the simulated forward is an int8 GEMM (int32 accumulation)
    rescaled by s_x[token] · s_w[channel]."""
    torch.manual_seed(1)
    lin = nn.Linear(128, 32, bias=False)
    q = QuantLinear.from_linear(lin, AffineSpec(8, None, symmetric=True))
    x = torch.randn(10, 128)
    s_x = x.abs().amax(-1, keepdim=True) / 127  # (10, 1)
    x_q = torch.round(x / s_x).clamp(-127, 127).to(torch.int8)
    W_q = (q.dequantized_weight() / q.scale.float()).round().to(torch.int8)  # codes − 128
    y = int8_matmul(x_q, W_q).double() * s_x.double() * q.scale.double().T
    assert torch.allclose(ActQuantLinear.wrap(q)(x).double(), y, rtol=1e-5, atol=1e-6)


def test_quantize_multiplier():
    M = torch.tensor([1e-6, 3.7e-4, 0.0123, 0.5, 0.999999])
    M0, k = quantize_multiplier(M)
    assert ((M0 >= 2 ** (P - 1)) & (M0 < 2 ** P)).all() and (k >= 1).all()
    assert ((multiplier_value(M0, k) - M.double()).abs() / M.double() <= 2.0 ** -P).all()


def test_requantize_rounds_half_up_and_clamps():
    M0, k = torch.tensor([1 << 23]), torch.tensor([24])  # M = 0.5 exactly
    acc = torch.tensor([[-5], [-3], [-1], [1], [3], [5], [1000], [-1000]], dtype=torch.int32)
    assert requantize(acc, M0, k).flatten().tolist() == [-2, -1, 0, 1, 2, 3, 127, -127]


@pytest.mark.parametrize("in_f,bias,per_channel", [(64, True, True), (768, False, True), (4096, True, False)])
def test_integer_path_equals_float_simulation_exactly(in_f, bias, per_channel, device):
    torch.manual_seed(in_f)
    lin = nn.Linear(in_f, 40, bias=bias).to(device)
    x = torch.randn(33, in_f, device=device) * 3
    s_x = x.abs().max().item() / 127
    y = lin(x).detach()
    s_y = (y.abs().amax(0) if per_channel else y.abs().amax().reshape(1)) / 127
    m = IntLinear.from_linear(lin, s_x, s_y)
    x_q = m.quantize_input(x)
    y_int = m.int_forward(x_q)
    assert x_q.dtype == torch.int8 and y_int.dtype == torch.int8 and m.qweight.dtype == torch.int8
    assert torch.equal(y_int.double(), m.simulate(x_q))
    worst = torch.full((5, in_f), 127, dtype=torch.int8, device=device)  # the largest possible accumulators
    m.bias_q = None
    assert torch.equal(requantize(int8_matmul(worst, m.qweight), m.M0.long(), m.k.long()).double(),
                       simulate_requantize(worst.double() @ m.qweight.double().T, m.M0.long(), m.k.long()))
    if bias:
        return
    assert sqnr_db(y, m(x)) > 30  # and it still computes the layer


def test_actquant_and_intonly_checkpoint_round_trip(tiny_llama_dir, tmp_path):
    from bitnest.api import quantization_config, quantize
    from bitnest.formats.checkpoint import load_quantized, save_quantized
    from bitnest.models.hf import load_model

    calib = torch.randint(0, 8192, (4, 32))
    loaded = load_model(tiny_llama_dir)
    quantize(loaded.model, "actquant", act_mode="static", targets="attn", calib=calib, progress=False)
    quantize(loaded.model, "intonly", targets="ffn", calib=calib, progress=False)
    save_quantized(loaded.model, None, tmp_path / "q", quantization_config("intonly", loaded.model.bitnest_method[1], "x"),
                   storage_dtype=torch.float32)
    back = load_quantized(tmp_path / "q").model
    assert isinstance(back.model.layers[1].mlp.up_proj, IntLinear)
    assert back.model.layers[1].self_attn.o_proj.act_mode == "static"
    ids = torch.randint(0, 8192, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, loaded.model(ids).logits)


def test_w8a8_and_integer_only_ref10m_within_2pct(ref10m_path):
    from bitnest.api import quantize
    from bitnest.calib.data import CalibOptions, calibration_tokens
    from bitnest.eval.perplexity import perplexity
    from bitnest.eval.report import eval_tokens
    from bitnest.models.hf import load_model

    loaded = load_model(ref10m_path)
    ids = eval_tokens(loaded.tokenizer, "c4")
    calib = calibration_tokens(loaded.model, CalibOptions(n_calib=4, calib_len=256))
    fp = perplexity(loaded.model, ids, 256, limit=8, progress=False).ppl
    for method, kw in (("actquant", {}), ("intonly", {"observer": "percentile"})):
        m = load_model(ref10m_path).model
        quantize(m, method, calib=calib, progress=False, **kw)
        ppl = perplexity(m, ids, 256, limit=8, progress=False).ppl
        assert ppl < 1.02 * fp, (method, ppl, fp)
