"""GGUF K-quants (Q2_K … Q6_K) and TQ2_0 packed from bitnest's own codes: the blocks decode through gguf's own
dequantizer to exactly bitnest's ŵ (bit for bit), or — approximate grids, only when asked — by the amount the
export reports; grids no GGUF type holds are one-line errors; and llama.cpp loading the file computes bitnest's
perplexity on ref-10m."""
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnest.cli import main
from bitnest.errors import BitnestError
from bitnest.export import Layer, affine_layers, load_for_export
from bitnest.export.gguf import EXACT, KINDS, _candidates, blocks, encode, gguf_layers, plan

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

# the type each per-channel grid with integer zero points is written as (exact)
CHOSEN = {(2, True): "Q2_K", (2, False): "Q2_K", (3, True): "Q3_K", (3, False): "Q4_0", (4, True): "Q4_0",
          (4, False): "Q4_K", (5, True): "Q5_0", (5, False): "Q5_K", (6, True): "Q6_K", (6, False): "Q8_0"}


def make_layer(bits, out, K, g, sym, seed, *, zero="int", lo=-20.0, hi=4.0, name="model.layers.0.mlp.up_proj"):
    """Random codes, fp16 scales 2^U(lo, hi) (subnormals included by default), zero points per group."""
    gen = torch.Generator().manual_seed(seed)
    G = K // g
    codes = torch.randint(0, 1 << bits, (out, K), generator=gen).to(torch.uint8)
    scale = (2.0 ** (lo + (hi - lo) * torch.rand(out, G, generator=gen))).half()
    if sym:
        z = torch.full((out, G), float(1 << (bits - 1)))
    elif zero == "int":
        z = torch.randint(0, 1 << bits, (out, G), generator=gen).float()
    else:  # real-valued, as the paper's grid stores it (fp16)
        z = ((1 << bits) - 1) * torch.rand(out, G, generator=gen).half().float()
    return Layer(name, codes, scale, z, bits, g, sym, False, None)


def decoded(layer: Layer, name: str) -> torch.Tensor:
    data = blocks(layer, T[name], gguf)
    return torch.from_numpy(gguf.quants.dequantize(data, T[name]).copy())


@st.composite
def whole_grids(draw, bits=st.sampled_from([2, 3, 4, 5, 6])):
    """Per-channel grids, or group sizes that are multiples of 256, with integer zero points."""
    n = draw(st.integers(1, 3))
    K = 256 * n
    g = 256 * draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    return make_layer(draw(bits), draw(st.integers(1, 4)), K, g, draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


@given(whole_grids())
@settings(max_examples=60, deadline=None)
def test_whole_grids_pack_to_their_type_and_decode_bit_exactly(layer):
    """d = α', sc = 1 (dmin = α', m = z'): gguf's dequantizer returns bitnest's ŵ bit for bit — for the chosen type
    and for every other K-quant that holds the grid exactly (symmetric 4/5-bit in Q4_K/Q5_K with m = z', …)."""
    name, cls = plan(layer, gguf)
    sym = layer.symmetric or bool((layer.zero == 1 << (layer.bits - 1)).all())  # z' = 2^(r−1): a symmetric grid
    assert (name, cls) == (CHOSEN[layer.bits, sym], EXACT)
    want = layer.weight()
    exact = {n for c, n in _candidates(layer) if c == EXACT}
    assert name in exact and (layer.bits == 6 and not sym or exact & {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
    for n in exact:
        got = decoded(layer, n)
        assert got.dtype == torch.float32 and torch.equal(got, want), n
    qtype, data, err = encode(layer, gguf)
    assert qtype == T[name] and err == 0.0 and data.shape == (layer.out_features, gguf.quants.quant_shape_to_byte_shape(
        (layer.in_features,), qtype)[0])


@given(st.sampled_from([(0, False), (1, False), (1, True)]), st.integers(1, 2), st.integers(1, 4),
       st.integers(0, 2**31 - 1))
@settings(max_examples=20, deadline=None)
def test_one_bit_grids_pack_to_tq2_0_exactly(zkind, n, out, seed):
    """A 1-bit grid with z' ∈ {0, 1} (a Matryoshka int8 → int1 slice: z' = 1) has values in {−α', 0, α'}."""
    z, sym = zkind
    layer = make_layer(1, out, 256 * n, 256 * n, sym, seed)
    layer.zero.fill_(float(z))
    assert plan(layer, gguf) == ("TQ2_0", EXACT)
    assert torch.equal(decoded(layer, "TQ2_0"), layer.weight())


def _bound(layer: Layer, name: str) -> float:
    """What the fit guarantees: the candidate d0 = a_max/smax is among those tried, so each sub-block scale is off
    by ≤ d0/2 (and each min by ≤ dmin0/2, or by the scale's error where a min would have to be negative)."""
    k, b = KINDS[name], layer.bits
    a = float(layer.scale.float().max())
    slack = 2.0 ** -21 * a * (1 << b)  # fp32 rounding of the two sides
    d0 = a / k.smax * (1 + 2.0 ** -10) + 2.0 ** -24
    if not k.has_min:
        return d0 / 2 * (1 << (b - 1)) + slack
    mu = a * float(layer.zero.abs().max()) + d0 / 2 * ((1 << b) - 1)
    return d0 * ((1 << b) - 1) * 0.75 + (mu / k.mmax * (1 + 2.0 ** -10) + 2.0 ** -24) / 2 + slack


@given(st.sampled_from([(2, True), (2, False), (3, True), (6, True)]), st.sampled_from([16, 32, 64, 128]),
       st.integers(1, 2), st.integers(1, 4), st.sampled_from(["int", "real"]), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_small_groups_are_approximate_with_the_reported_bounded_error(grid, g, n, out, zero, seed):
    """Groups smaller than a super-block: the per-group α' (and α'z') are fitted to d·sc (and dmin·m). Only with
    approximate=True; the reported change is the measured one (gguf's decoder vs ŵ) and within the fit's bound."""
    bits, sym = grid
    layer = make_layer(bits, out, 256 * n, g, sym, seed, zero=zero, lo=-6.0, hi=2.0)
    name, _ = plan(layer, gguf)
    assert name == {2: "Q2_K", 3: "Q3_K", 6: "Q6_K"}[bits]
    qtype, data, err = encode(layer, gguf, approximate=True)
    measured = float((torch.from_numpy(gguf.quants.dequantize(data, qtype).copy()) - layer.weight()).abs().max())
    assert err == measured and err <= _bound(layer, name)
    if err > 0:
        with pytest.raises(BitnestError, match="--approximate") as e:
            encode(layer, gguf)
        assert "multiple of 256" in str(e.value) and "int_zero" in str(e.value) and "\n" not in str(e.value)


@given(st.sampled_from(["Q4_K", "Q5_K"]), st.sampled_from([32, 64, 128]), st.integers(0, 2**31 - 1))
@settings(max_examples=20, deadline=None)
def test_q4_k_q5_k_small_group_packing_is_bounded(name, g, seed):
    """Q4_K/Q5_K with 6-bit sub-block scales and mins (not chosen for these grids — Q4_1/Q5_1 are closer — but the
    same fit): within the bound."""
    layer = make_layer(KINDS[name].width, 3, 512, g, False, seed, lo=-6.0, hi=2.0)
    err = float((decoded(layer, name) - layer.weight()).abs().max())
    assert err <= _bound(layer, name)


@given(st.sampled_from([2, 4, 5]), st.integers(1, 3), st.integers(0, 2**31 - 1))
@settings(max_examples=20, deadline=None)
def test_real_zero_points_per_channel_are_off_by_fp16_rounding_of_the_min(bits, out, seed):
    """The paper's real-valued z': d = α' exactly, dmin·m fitted to α'z' (≤ half an fp16 ulp of it)."""
    layer = make_layer(bits, out, 512, 512, False, seed, zero="real", lo=-6.0, hi=2.0)
    name, _ = plan(layer, gguf)
    assert name == {2: "Q2_K", 4: "Q4_K", 5: "Q5_K"}[bits]
    _, _, err = encode(layer, gguf, approximate=True)
    a = float(layer.scale.float().max())
    assert err <= a * float(layer.zero.max()) * 2.0 ** -11 + 2.0 ** -21 * a * (1 << bits) + 2.0 ** -24


# ---------------------------------------------------------------------------------------------- what cannot be held


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


@pytest.mark.parametrize("bits,sym", [(1, True), (2, False), (2, True), (3, True), (6, True)])
def test_k_only_widths_need_rows_of_whole_super_blocks(bits, sym):
    layer = make_layer(bits, 2, 384, 384, sym, 0)  # 384 = 12 · 32: the 32-weight types would fit, the K-quants not
    with pytest.raises(BitnestError) as e:
        plan(layer, gguf)
    assert "in_features 384 is not a multiple of 256" in _one_line(e)


@pytest.mark.parametrize("bits,sym,want", [(4, True, "Q4_0"), (4, False, "Q4_1"), (5, True, "Q5_0"),
                                           (5, False, "Q5_1"), (8, True, "Q8_0"), (3, False, "Q4_0")])
def test_rows_of_32_weight_blocks_keep_the_legacy_types(bits, sym, want):
    layer = make_layer(bits, 2, 384, 384, sym, 0, lo=-6.0, hi=2.0)
    assert plan(layer, gguf)[0] == want
    _, _, err = encode(layer, gguf, approximate=True)
    assert err == 0 or want in ("Q4_1", "Q5_1")


@pytest.mark.parametrize("bits,sym,zero,g,msg", [
    (8, False, "int", 256, "asymmetric 8-bit"),            # Q8_0 has no min
    (6, False, "real", 256, "real-valued zero points"),   # nor any 6/7-bit type
    (4, True, "int", 16, "group size 16"),                 # 32-weight sub-blocks
    (1, False, "int", 128, "TQ2_0 holds one scale per 256"),
])
def test_grids_no_type_holds_are_one_line_errors(bits, sym, zero, g, msg):
    layer = make_layer(bits, 2, 512, g, sym, 0, zero=zero)
    with pytest.raises(BitnestError) as e:
        plan(layer, gguf)
    assert msg in _one_line(e)


def test_small_groups_without_approximate_say_how_to_export_exactly():
    layer = make_layer(2, 4, 256, 64, False, 3, lo=-6.0, hi=2.0)
    with pytest.raises(BitnestError) as e:
        encode(layer, gguf)
    msg = _one_line(e)
    assert "Q2_K" in msg and "--approximate" in msg and "per channel" in msg and "multiple of 256" in msg \
        and "int_zero=true" in msg


class _Model(torch.nn.Module):
    def __init__(self, **mods):
        super().__init__()
        for k, v in mods.items():
            setattr(self, k, v)


def test_bitnet_signs_are_tq2_0_exactly_and_onebit_is_an_error():
    from bitnest.nn.onebit import PackedSignLinear
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 512, generator=gen)
    beta = torch.tensor([0.0371])
    bitnet = PackedSignLinear.from_parts(W, None, beta, post_ln=False, method="bitnet")
    (layer,) = gguf_layers(_Model(proj=bitnet))
    assert plan(layer, gguf) == ("TQ2_0", EXACT)
    want = bitnet.signs() * beta.half().float()  # ŵ = β·sign(W): the weight the module multiplies by
    assert torch.equal(layer.weight(), want) and torch.equal(decoded(layer, "TQ2_0"), want)
    x = torch.randn(3, 512, generator=gen)
    assert torch.allclose(bitnet(x), x @ want.t(), atol=1e-4, rtol=1e-5)  # the same map, summed in another order

    post_ln = PackedSignLinear.from_parts(W, None, beta, post_ln=True, method="bitnet")
    with pytest.raises(BitnestError) as e:
        gguf_layers(_Model(proj=post_ln))
    assert "post_ln" in _one_line(e) and "LayerNorm" in str(e.value)
    onebit = PackedSignLinear.from_parts(W, torch.rand(512, generator=gen), torch.rand(6, generator=gen), post_ln=True)
    with pytest.raises(BitnestError) as e:
        gguf_layers(_Model(proj=onebit))
    assert "onebit" in _one_line(e) and "per input column" in str(e.value)


# ---------------------------------------------------------------------------------------------- ref-10m, llama.cpp

CTX, WINDOWS = 256, 3
CASES = {  # checkpoint → the GGML types its GGUF holds
    "asym": {"Q2_K", "Q4_K", "Q5_K", "Q4_0", "Q8_0"},   # int_zero per channel: 2 (base), 4, 5, 3 → Q4_0, 6 → Q8_0
    "sym": {"Q3_K", "Q6_K", "Q2_K", "Q5_0"},            # symmetric per channel: 3 (base), 6, 2, 5
    "bitnet": {"TQ2_0"},                                 # bitnest quantize --method bitnet (BitNet-style signs)
}


@pytest.fixture(scope="module")
def ref_ck(ref10m_path, tmp_path_factory, one_thread):
    from bitnest.api import make_config, quantization_config, quantize
    from bitnest.formats.checkpoint import save_quantized
    from bitnest.models.hf import load_model
    root = tmp_path_factory.mktemp("kq")
    for name, kw in (("asym", dict(bits=2, int_zero=True, overrides=(("*.mlp.*", 4), ("*.v_proj", 5), ("*.o_proj", 3),
                                                                      ("*.k_proj", 6)))),
                     ("sym", dict(bits=3, symmetric=True,
                                  overrides=(("*.mlp.*", 6), ("*.v_proj", 2), ("*.o_proj", 5))))):
        loaded = load_model(ref10m_path)
        cfg = make_config("rtn", **kw)
        quantize(loaded.model, "rtn", cfg, progress=False)
        save_quantized(loaded.model, loaded.tokenizer, root / name, quantization_config("rtn", cfg, str(ref10m_path)),
                       storage_dtype=loaded.storage_dtype)
    assert main(["quantize", "--model", str(ref10m_path), "--method", "bitnet", "-o", "steps=1", "-o", "batch=2",
                 "-o", "seq_len=16", "-o", "samples=4", "-o", "gen_batch=4", "--out", str(root / "bitnet"),
                 "--no-progress"]) == 0
    assert main(["quantize", "--model", str(ref10m_path), "--method", "rtn", "--bits", "2", "--group-size", "64",
                 "-o", "int_zero=true", "--out", str(root / "g64"), "--no-progress"]) == 0
    return root


@pytest.fixture(scope="module")
def c4_ids(ref10m_path, shared):
    from bitnest.eval.data import load_eval_text, tokenize_eval_text
    from bitnest.models.hf import load_model
    flat = tokenize_eval_text(load_model(ref10m_path).tokenizer, load_eval_text("c4", shared))
    return flat[: WINDOWS * CTX].reshape(WINDOWS, CTX)


def nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    return float(-lp.gather(-1, ids[:, 1:, None]).mean())


def bitnest_logits(ckpt, ids) -> torch.Tensor:
    from bitnest.models.hf import load_model
    m = load_model(ckpt).model
    with torch.no_grad():
        return torch.cat([m(w[None]).logits.float() for w in ids])


def llama_cpp_logits(path, ids) -> torch.Tensor:
    pytest.importorskip("llama_cpp")
    from bitnest.export.gguf import llama_cpp_logits as logits
    return logits(path, ids)


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_computes_bitnest_perplexity_on_ref10m(ref_ck, c4_ids, tmp_path, capsys, case):
    pytest.importorskip("llama_cpp")
    out = tmp_path / f"{case}.gguf"
    assert main(["export", "--model", str(ref_ck / case), "--to", "gguf", "--out", str(out)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(", exact")
    r = gguf.GGUFReader(str(out))
    types = {t.tensor_type.name for t in r.tensors} - {"F16", "F32"}
    assert types == CASES[case]
    theirs, ours = llama_cpp_logits(out, c4_ids), bitnest_logits(ref_ck / case, c4_ids)
    p_theirs, p_ours = math.exp(nll(theirs, c4_ids)), math.exp(nll(ours, c4_ids))
    print(f"{case}: ppl bitnest {p_ours:.3f}, llama.cpp {p_theirs:.3f} ({100 * (p_theirs / p_ours - 1):+.3f} %), "
          f"max |Δlogit| {float((theirs - ours).abs().max()):.3g}")
    assert abs(p_theirs / p_ours - 1) < 0.01
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.95


def test_small_group_export_needs_approximate_and_reports_the_measured_change(ref_ck, tmp_path, capsys):
    out = tmp_path / "g64.gguf"
    assert main(["export", "--model", str(ref_ck / "g64"), "--to", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitnest: error:") and err.count("\n") == 1 and "--approximate" in err and "Q2_K" in err
    assert not out.exists()
    assert main(["export", "--model", str(ref_ck / "g64"), "--to", "gguf", "--out", str(out), "--approximate"]) == 0
    reported = float(re.search(r"largest weight change ([0-9.e+-]+)\)", capsys.readouterr().out).group(1))
    loaded = load_for_export(str(ref_ck / "g64"))
    cfg = loaded.model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    measured = 0.0
    for l in affine_layers(loaded.model):
        t = tensors[names.get_name(l.name + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == "Q2_K"
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(l.name.rsplit(".", 1)[1])
        if heads:  # undo llama.cpp's rotary row order
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        measured = max(measured, float((w - l.weight()).abs().max()))
        assert float((w - l.weight()).abs().max()) <= _bound(l, "Q2_K")
    assert measured > 0 and reported == float(f"{measured:.3g}")
