"""Non-uniform grids: k-means never worse than RTN, NF4's published levels, powers of two, weight sharing with
exact bits, CodebookLinear's packed forward == its table lookup, checkpoint round trip."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kernel_tol import assert_close

from bitnest import kernels
from bitnest.grids.affine import AffineSpec, grouped
from bitnest.grids.codebook import assign, fixed_codebook, kmeans, log_levels, lookup, nf_levels
from bitnest.nn.codebook import CodebookLinear
from bitnest.nn.qlinear import QuantLinear

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")).
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest


def mse(W, What):
    return ((W - What) ** 2).sum().item()


def rtn_w(W, bits, g):
    return QuantLinear.from_linear(_lin(W), AffineSpec(bits, g)).dequantized_weight()


def km_w(W, bits, g, **kw):
    codes, table = kmeans(W, bits, g, **kw)
    return lookup(grouped(codes, g), table).reshape(W.shape)


def _lin(W):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W)
    return lin


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 5), g=st.sampled_from([None, -1, 8]), seed=st.integers(0, 2**16),
       dist=st.sampled_from(["normal", "uniform", "heavy", "few"]))
def test_kmeans_never_worse_than_rtn(bits, g, seed, dist):
    """Started from RTN's levels and codes with an exactly stored table, Lloyd never raises the MSE."""
    gen = torch.Generator().manual_seed(seed)
    W = {"normal": lambda: torch.randn(6, 16, generator=gen),
         "uniform": lambda: torch.rand(6, 16, generator=gen) * 2 - 1,
         "heavy": lambda: torch.randn(6, 16, generator=gen) ** 3,
         "few": lambda: torch.randint(-2, 3, (6, 16), generator=gen).float()}[dist]()
    assert mse(W, km_w(W, bits, g, table_dtype=torch.float32)) <= mse(W, rtn_w(W, bits, g))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g", [None, -1, 64])
def test_kmeans_float16_table_beats_rtn_on_gaussian_weights(bits, g):
    W = torch.randn(96, 128, generator=torch.Generator().manual_seed(bits))
    assert mse(W, km_w(W, bits, g)) < 0.95 * mse(W, rtn_w(W, bits, g))


def test_weighted_kmeans_lowers_the_weighted_error():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=gen)
    wts = torch.rand(64, generator=gen).pow(4).expand(32, 64)  # a few inputs matter much more
    werr = lambda What: (((W - What) ** 2) * wts).sum().item()
    assert werr(km_w(W, 3, None, weights=wts)) < werr(km_w(W, 3, None))


def test_nf4_matches_bitsandbytes_and_levels_are_sane():
    assert torch.allclose(nf_levels(4), torch.tensor(NF4), atol=2e-7)
    for b in (2, 3, 5):
        v = nf_levels(b)
        assert len(v) == 2 ** b and v[0] == -1 and v[-1] == 1 and (v == 0).sum() == 1 and (v.diff() > 0).all()
    assert log_levels(3).tolist() == [-1, -0.5, -0.25, -0.125, 0.125, 0.25, 0.5, 1]
    l8 = log_levels(8)  # every level is an exact power of two
    assert torch.equal(l8.abs(), torch.pow(2.0, torch.log2(l8.abs()).round()))


def test_assign_is_nearest_level():
    table = torch.tensor([-1.0, -0.2, 0.1, 0.9]).reshape(1, 1, 4)
    x = torch.linspace(-2, 2, 401).reshape(1, 1, -1)
    q = assign(x, table)
    brute = (x.unsqueeze(-1) - table.unsqueeze(2)).abs().argmin(-1)
    assert torch.equal(lookup(q, table), lookup(brute, table))


def test_nf4_group_absmax_is_exact_and_error_bounded():
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    codes, s, table = fixed_codebook(W, nf_levels(4), 64)
    m = CodebookLinear.from_codes(codes, table, s, bits=4, group_size=64, codebook="nf")
    What = m.dequantized_weight()
    Wg, Hg = grouped(W, 64), grouped(What, 64)
    assert torch.allclose(Hg.abs().amax(-1), Wg.abs().amax(-1), rtol=1e-3)  # the absmax is a level (±1 · s)
    gap = (nf_levels(4).diff().max() / 2) * s.float().unsqueeze(-1)  # half the widest level gap
    assert ((Wg - Hg).abs() <= gap + 1e-6).all()


@pytest.mark.parametrize("bits,g,scaled", [(3, None, False), (2, -1, False), (4, 32, True), (1, -1, False)])
def test_codebook_linear_packed_forward_and_exact_bits(bits, g, scaled, device):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40).to(device)
    if scaled:
        codes, s, table = fixed_codebook(lin.weight, nf_levels(bits), g)
    else:
        (codes, table), s = kmeans(lin.weight, bits, g), None
    m = CodebookLinear.from_codes(codes, table, s, bits=bits, group_size=g, bias=lin.bias)
    assert torch.equal(m.codes(), codes)
    W = lookup(grouped(codes, g), table, s).reshape(40, 96)
    x = torch.randn(5, 96, device=device)
    ref = torch.nn.functional.linear(x, W, lin.bias)
    with kernels.use("reference"):
        assert torch.equal(m(x), ref)
    assert_close(m(x), ref)
    R, G = (1, 1) if g == -1 else (40, 1 if g is None else 96 // g)
    Rt, Gt = (1, 1) if scaled else (R, G)
    expect = 40 * ((96 * bits + 7) // 8) * 8 + Rt * Gt * 2 ** bits * 16 + (R * G * 16 if scaled else 0)
    assert m.served_bits() == expect


def test_weight_sharing_stores_2b_values():
    """share: one table of 2^b values per layer; every weight is one of them."""
    from bitnest.api import quantize
    model = nn.Sequential()
    model.layers = nn.ModuleList([nn.Sequential(nn.Linear(64, 64))])
    quantize(model, "share", bits=3, progress=False)
    m = model.layers[0][0]
    assert isinstance(m, CodebookLinear) and m.table.shape == (1, 1, 8)
    assert len(torch.unique(m.dequantized_weight())) <= 8
    assert m.served_bits() / m.num_weights() == pytest.approx(3 + 8 * 16 / 4096)


def test_codebook_checkpoint_round_trip(tiny_llama_dir, tmp_path):
    from bitnest.api import quantization_config, quantize
    from bitnest.formats.checkpoint import load_quantized, save_quantized
    from bitnest.models.hf import load_model

    loaded = load_model(tiny_llama_dir)
    quantize(loaded.model, "kmeans", bits=3, targets="ffn", progress=False)
    quantize(loaded.model, "nf", bits=4, group_size=32, targets="attn", progress=False)
    save_quantized(loaded.model, None, tmp_path / "q", quantization_config("kmeans", loaded.model.bitnest_method[1], "x"),
                   storage_dtype=torch.float32)
    back = load_quantized(tmp_path / "q").model
    ids = torch.randint(0, 8192, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, loaded.model(ids).logits)
    assert isinstance(back.model.layers[0].mlp.down_proj, CodebookLinear)
    assert back.model.layers[0].self_attn.q_proj.codebook == "nf"
