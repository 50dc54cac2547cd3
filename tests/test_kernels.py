"""Every fast kernel path against the pure-torch reference (kernels/reference.py), over widths, group sizes,
symmetry, Matryoshka slices, Extra Precision lists, shapes, batch sizes (GEMV kernels and the tiled GEMM path)
and activation dtypes; the vector (AVX-512) and the portable C++ paths both; integer paths bit for bit."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_tol import assert_close, condition

from bitnest import kernels
from bitnest.formats.packing import pack, packed_len, unpack
from bitnest.grids.nested import slice_codes
from bitnest.kernels import cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="C++ kernels could not be built here")

SETTINGS = dict(deadline=None, max_examples=int(os.environ.get("BITNEST_HYPOTHESIS_EXAMPLES", 60)), suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
GROUPS = [None, -1, 16, 32, 64, 128, 256]
BATCHES = [1, 2, 3, 5, 8, 13, 16, 40]  # ≤ 16: packed GEMV/GEMM kernels; 40: dequantized tiles + torch.mm
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=["simd", "portable"])
def simd(request, monkeypatch):
    monkeypatch.setenv("BITNEST_CPU_SIMD", "1" if request.param == "simd" else "0")
    return request.param


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def random_affine(g: torch.Generator, out: int, n_in: int, bits: int, parent: int, group_size, symmetric: bool,
                  extra: bool = False, act_bits=None) -> kernels.Affine:
    gl, G = kernels.groups(n_in, group_size)
    R = 1 if group_size == -1 else out
    G = 1 if group_size == -1 else G
    codes = torch.randint(0, 1 << bits, (out, n_in), generator=g, dtype=torch.int64).to(torch.uint8)
    scale = _fp16(torch.rand(R, G, generator=g) * 0.02 + 1e-3)
    zero = None if symmetric else _fp16(torch.rand(R, G, generator=g) * ((1 << parent) - 1))
    rowptr = cols = None
    if extra:  # positions whose slice code is 2^b are stored as 2^b − 1 (the Extra Precision bucket)
        top = codes == (1 << bits) - 1
        keep = top & (torch.rand(out, n_in, generator=g) < 0.5)
        rowptr = torch.zeros(out + 1, dtype=torch.int32)
        rowptr[1:] = torch.cumsum(keep.sum(1), 0)
        cols = keep.nonzero()[:, 1].to(torch.int32)
    act_scale = None
    return kernels.Affine(pack(codes, bits), bits, n_in, scale, zero, group_size, parent, rowptr, cols, act_bits, act_scale)


def _x(g, m, n_in, dtype):
    return torch.randn(m, n_in, generator=g).to(dtype)


@st.composite
def affine_case(draw):
    bits = draw(st.integers(1, 8))
    parent = draw(st.integers(bits, 8))
    group_size = draw(st.sampled_from(GROUPS))
    aligned = draw(st.booleans())
    if group_size in (None, -1):
        n_in = draw(st.sampled_from([64, 128, 256, 512, 768, 1024])) if aligned else draw(st.integers(1, 150))
    else:
        n_in = group_size * draw(st.integers(1, 6 if group_size < 256 else 3))
    return dict(bits=bits, parent=parent, group_size=group_size, n_in=n_in, out=draw(st.integers(1, 40)),
                symmetric=draw(st.booleans()) and parent >= 2, m=draw(st.sampled_from(BATCHES)),
                dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**31 - 1)))


@given(affine_case())
@settings(**SETTINGS)
def test_affine_fast_equals_reference(simd, c):
    g = torch.Generator().manual_seed(c["seed"])
    p = random_affine(g, c["out"], c["n_in"], c["bits"], c["parent"], c["group_size"], c["symmetric"])
    x = _x(g, c["m"], c["n_in"], c["dtype"])
    assert kernels.path_for(x, p) == "cpu"
    ref = reference.affine_linear(x.float(), p)  # the reference in fp32: bf16 x is exact there
    assert_close(kernels.linear(x, p), ref, c["dtype"], what=str(c), scale=condition(x, reference.affine_weight(p)))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32, 64, 128, 256, 512])
def test_bf16_pair_kernels_equal_reference(bits, group_size):
    """bf16 activations at b = 1–4 on blocks that tile (K a multiple of 16·32/b, 128 for b = 3): the vdpbf16ps pair kernels
    where the CPU has AVX512-BF16 (both halves of every dword, every group layout, 1–16 rows; the look-up-table
    kernel off, so every row takes them)."""
    with cpu.lut_max_batch(0):
        _bf16_pairs(bits, group_size)


def _bf16_pairs(bits, group_size):
    g = torch.Generator().manual_seed(bits * 1000 + (group_size or 0))
    for n_in, m in ((1024, 1), (512, 5), (2048, 16)):
        if group_size and group_size > n_in:
            continue
        for symmetric in ((False, True) if bits >= 2 else (False,)):
            p = random_affine(g, 24, n_in, bits, 8 if bits > 1 else 1, group_size, symmetric)
            x = _x(g, m, n_in, torch.bfloat16)
            ref = reference.affine_linear(x.float(), p)
            assert_close(kernels.linear(x, p), ref, torch.bfloat16, what=f"b={bits} g={group_size} K={n_in} m={m}",
                         scale=condition(x, reference.affine_weight(p)))


@given(st.integers(1, 7), st.sampled_from([None, 64, 128]), st.sampled_from(BATCHES), st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_extra_precision_and_activation_quantization(simd, bits, group_size, m, seed):
    g = torch.Generator().manual_seed(seed)
    n_in = 256
    p = random_affine(g, 24, n_in, bits, 8, group_size, False, extra=True)
    x = _x(g, m, n_in, torch.float32)
    cond = condition(x, reference.affine_weight(p))
    assert_close(kernels.linear(x, p), reference.affine_linear(x, p), what="extra precision", scale=cond)
    for act_scale in (None, torch.tensor([0.02])):  # W·A8 dynamic and static
        pa = kernels.Affine(p.qweight, p.bits, n_in, p.scale, p.zero, group_size, 8, act_bits=8, act_scale=act_scale)
        assert_close(kernels.linear(x, pa), reference.affine_linear(x, pa), what="activation-quantized", scale=cond)


def test_extra_precision_weight_raises_bucket_by_one_step():
    g = torch.Generator().manual_seed(0)
    p = random_affine(g, 8, 64, 3, 8, None, False, extra=True)
    assert p.extra_cols.numel() > 0
    W = reference.affine_weight(p)
    plain = reference.affine_weight(kernels.Affine(p.qweight, 3, 64, p.scale, p.zero, None, 8))
    step = p.scale.float() * 2 ** 5  # α · 2^(c − r), one slice step on the parent grid
    assert torch.allclose(W - plain, (W != plain) * step, atol=1e-6)
    assert int((W != plain).sum()) == p.extra_cols.numel()


@given(st.integers(1, 300), st.integers(1, 30), st.sampled_from(BATCHES), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from(DTYPES), st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_sign_fast_equals_reference(simd, n_in, out, m, has_g, h_kind, post_ln, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n_in = n_in if seed % 2 else 64 * (1 + n_in % 16)  # half aligned (vector path), half any width
    q = pack(torch.randint(0, 2, (out, n_in), generator=g).to(torch.uint8), 1)
    gv = _fp16(torch.rand(n_in, generator=g) + 0.5) if has_g else None
    h = _fp16(torch.rand(out if h_kind else 1, generator=g) + 0.5)
    post_ln = post_ln and out >= 4  # a LayerNorm over 1–3 features is degenerate (its outputs are ±1 or 0)
    p = kernels.Sign(q, n_in, gv, h, post_ln)
    x = _x(g, m, n_in, dtype)
    W = reference.unpack_signs(q, n_in) * (1 if gv is None else gv.float()) * h.float()[:, None]
    cond = condition(x, W)
    if post_ln:  # an error e of a pre-LayerNorm row becomes ≈ e / σ(row) after it: few or nearly equal outputs
        y0 = reference.sign_packed_linear(x.float(), kernels.Sign(q, n_in, gv, h, False))  # (m, out) before the LN
        sd = torch.sqrt(y0.var(-1, unbiased=False) + reference.LN_EPS)  # (m,)
        rows = x.float().abs() @ W.abs().T  # (m, out): Σ_j |ŵ_ij x_j|
        cond = (rows.max(-1).values / sd).max().item()  # (seen: out = 4, bf16, 40 rows: error 0.097 at |y| ≤ 1.7)
    for lut in (0, 16):  # the split/pair kernels on every row, then the look-up-table kernel where it applies
        with cpu.lut_max_batch(lut):
            assert_close(kernels.linear(x, p), reference.sign_packed_linear(x.float(), p), dtype, what=f"sign lut={lut}",
                         scale=cond)


@pytest.mark.skipif(not cpu.has_avx512(), reason="the look-up-table kernel is AVX-512 only")
@given(st.sampled_from([1, 2, 4]), st.sampled_from([None, -1, 32, 64, 128, 256]), st.integers(1, 5),
       st.integers(16, 70), st.sampled_from([1, 2, 3, 4, 5, 7, 16]), st.booleans(), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_lut_kernel_equals_reference_and_spread(bits, group_size, k, out, m, symmetric, sliced, extra, seed):
    """The look-up-table kernel (16 output rows per vector, rows transposed in the kernel, tail rows by the
    spread kernels): K from one dword to several 64-byte chunks with a partial last one, every group size, slices of
    a wider parent, Extra Precision lists — equal to the reference and to the kernel it replaces."""
    g = torch.Generator().manual_seed(seed)
    if group_size in (None, -1):
        n_in = 32 // bits * (k if seed % 2 else 16 * k + 1)  # whole dwords: 1–5, or 17–81 (a partial 64-byte chunk)
    else:
        n_in = group_size * k
    parent = 8 if sliced else bits
    p = random_affine(g, out, n_in, bits, parent, group_size, symmetric and parent >= 2, extra=extra and bits < parent)
    x = _x(g, m, n_in, torch.float32)
    ref = reference.affine_linear(x, p)
    cond = condition(x, reference.affine_weight(p))
    with cpu.lut_max_batch(16, force=True):  # every width and batch, not only where it is the faster kernel
        fast = kernels.linear(x, p)
    with cpu.lut_max_batch(0):
        spread = kernels.linear(x, p)
    assert_close(fast, ref, what=f"lut b={bits} g={group_size} K={n_in} N={out} m={m}", scale=cond)
    assert_close(fast, spread, what="lut vs spread", scale=cond)


@pytest.mark.skipif(not cpu.has_avx512(), reason="the look-up-table kernel is AVX-512 only")
@pytest.mark.parametrize("n_in", [512, 1056, 4096])
def test_lut_sign_layers(n_in):
    """OneBit / BitNet layers through the look-up-table kernel (centred tables: y = −2·acc, no group sums),
    with and without g, with OneBit's LayerNorm, 50 rows (two 16-row sets, one, two tail rows), 1–16 activation rows."""
    g = torch.Generator().manual_seed(n_in)
    out = 50
    q = pack(torch.randint(0, 2, (out, n_in), generator=g).to(torch.uint8), 1)
    for gv, post_ln in ((_fp16(torch.rand(n_in, generator=g) + 0.5), False), (None, False), (None, True)):
        p = kernels.Sign(q, n_in, gv, _fp16(torch.rand(out, generator=g) + 0.5), post_ln)
        W = reference.unpack_signs(q, n_in) * (1 if gv is None else gv.float()) * p.h.float()[:, None]
        for m in (1, 2, 16):
            x = _x(g, m, n_in, torch.float32)
            with cpu.lut_max_batch(16):
                assert_close(kernels.linear(x, p), reference.sign_packed_linear(x, p), what=f"sign K={n_in} m={m}",
                             scale=None if post_ln else condition(x, W))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("group_size", [None, 32, 128])
def test_weight_row_pairs_and_segments(bits, group_size):
    """From 8 activation rows the spread kernels take weight rows in pairs against L2-sized K-segments: odd row counts
    (a last unpaired row), 8–16 activation rows with a remainder of 1–7 (their own passes after the pairs), K over
    several segments (16 rows: 4096 floats each) — affine (fp32 and bf16: the pair kernels) and codebook layers. One
    row: K = 9216 fp32 activations exceed L1, so rows of b = 2, 4 (per channel and grouped) run in two pieces of 4608."""
    g = torch.Generator().manual_seed(bits * 100 + (group_size or 0))
    n_in, out = 3 * 3072, 7  # 9216: two segments and a partial third at 16 rows; every spread block width divides it
    with cpu.lut_max_batch(0):
        for m, dtype in ((1, torch.float32), (1, torch.bfloat16), (8, torch.float32), (13, torch.bfloat16),
                         (16, torch.float32), (16, torch.bfloat16)):
            x = _x(g, m, n_in, dtype)
            p = random_affine(g, out, n_in, bits, 8, group_size, False)
            assert_close(kernels.linear(x, p), reference.affine_linear(x.float(), p), dtype, what=f"affine b={bits} m={m}",
                         scale=condition(x, reference.affine_weight(p)))
            if bits <= 4:
                codes = torch.randint(0, 1 << bits, (out, n_in), generator=g).to(torch.uint8)
                G = kernels.groups(n_in, group_size)[1]
                c = kernels.Codebook(pack(codes, bits), bits, n_in, _fp16(torch.randn(out, 1, 1 << bits, generator=g)),
                                     _fp16(torch.rand(out, G, generator=g) + 0.1), group_size)
                assert_close(kernels.linear(x, c), reference.codebook_linear(x.float(), c), dtype,
                             what=f"codebook b={bits} m={m}", scale=condition(x, reference.codebook_weight(c)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_prefill_over_several_tiles(monkeypatch, dtype):
    """Batches above GEMV_MAX_ROWS multiply dequantized tiles; with a small TILE_BYTES a layer spans several tiles
    and a partial last one (the default 16 MB covers the small layers of the other tests in one)."""
    monkeypatch.setattr(cpu, "TILE_BYTES", 16 * 256 * 4)  # 16 fp32 rows of K = 256 per tile
    g = torch.Generator().manual_seed(7)
    for p in (random_affine(g, 70, 256, 4, 8, 64, False),
              kernels.Sign(pack(torch.randint(0, 2, (70, 256), generator=g).to(torch.uint8), 1), 256, None,
                           _fp16(torch.rand(70, generator=g) + 0.5), False)):
        x = _x(g, 40, 256, dtype)
        ref = (reference.affine_linear(x.float(), p) if isinstance(p, kernels.Affine)
               else reference.sign_packed_linear(x.float(), p))
        W = reference.affine_weight(p) if isinstance(p, kernels.Affine) else reference.unpack_signs(p.qweight, 256) * p.h.float()[:, None]
        assert_close(kernels.linear(x, p), ref, dtype, what=f"tiled {type(p).__name__}", scale=condition(x, W))


@st.composite
def codebook_case(draw):
    bits = draw(st.integers(1, 8))
    group_size = draw(st.sampled_from([None, -1, 64, 128]))
    n_in = (draw(st.sampled_from([128, 256, 512])) if group_size in (None, -1)
            else group_size * draw(st.integers(1, 4)))
    out = draw(st.integers(1, 24))
    R, G = (1, 1) if group_size == -1 else (out, kernels.groups(n_in, group_size)[1])
    table = draw(st.sampled_from(["shared", "row", "group"]))
    Rt, Gt = {"shared": (1, 1), "row": (R, 1), "group": (R, G)}[table]
    return dict(bits=bits, group_size=group_size, n_in=n_in, out=out, table=(Rt, Gt),
                scaled=draw(st.booleans()), RG=(R, G), m=draw(st.sampled_from(BATCHES)),
                dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**31 - 1)))


@given(codebook_case())
@settings(**SETTINGS)
def test_codebook_fast_equals_reference(simd, c):
    g = torch.Generator().manual_seed(c["seed"])
    codes = torch.randint(0, 1 << c["bits"], (c["out"], c["n_in"]), generator=g).to(torch.uint8)
    table = _fp16(torch.randn(*c["table"], 1 << c["bits"], generator=g))
    scale = _fp16(torch.rand(*c["RG"], generator=g) + 0.1) if c["scaled"] else None
    p = kernels.Codebook(pack(codes, c["bits"]), c["bits"], c["n_in"], table, scale, c["group_size"])
    x = _x(g, c["m"], c["n_in"], c["dtype"])
    assert_close(kernels.linear(x, p), reference.codebook_linear(x.float(), p), c["dtype"], what=str(c),
                 scale=condition(x, reference.codebook_weight(p)))


@given(st.integers(1, 200), st.integers(1, 30), st.sampled_from(BATCHES), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_int8_fast_is_bit_exact(simd, n_in, out, m, bias, per_channel, seed):
    from bitnest.kernels.integer import quantize_multiplier
    g = torch.Generator().manual_seed(seed)
    n_in = n_in if seed % 2 else 64 * (1 + n_in % 8)
    W = torch.randint(-127, 128, (out, n_in), generator=g, dtype=torch.int8)
    y_scale = torch.rand(out if per_channel else 1, generator=g) * 0.5 + 0.1
    M0, k = quantize_multiplier(torch.full((out,), 0.05 * 0.01) / y_scale.expand(out))
    bias_q = torch.randint(-1000, 1000, (out,), generator=g, dtype=torch.int32) if bias else None
    p = kernels.Int8(W, M0.to(torch.int32), k.to(torch.int8), bias_q, torch.tensor([0.05]), y_scale)
    x = torch.randn(m, n_in, generator=g) * 3
    assert torch.equal(kernels.linear(x, p), reference.int8_linear(x, p))


@given(st.integers(2, 8), st.data(), st.integers(1, 100), st.integers(1, 12), st.booleans(), st.integers(0, 2**31 - 1))
@settings(**SETTINGS)
def test_slice_pack_equals_slice_then_pack(c, data, n_in, out, clamp, seed):
    r = data.draw(st.integers(1, c - 1 if clamp or c < 8 else 6))
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << c, (out, n_in), generator=g).to(torch.uint8)
    fast = kernels.slice_pack(pack(q, c), c, r, n_in, clamp)
    expect = pack(slice_codes(q, c, r, clamp), r if clamp else r + 1)
    assert torch.equal(fast, expect)
    with kernels.use("reference"):
        assert torch.equal(kernels.slice_pack(pack(q, c), c, r, n_in, clamp), expect)


@given(affine_case())
@settings(**SETTINGS)
def test_dequantized_tiles_equal_reference_weight(simd, c):
    g = torch.Generator().manual_seed(c["seed"])
    p = random_affine(g, c["out"], c["n_in"], c["bits"], c["parent"], c["group_size"], c["symmetric"])
    W = reference.affine_weight(p)
    r0 = c["seed"] % p.out_features
    tile = cpu.ext().affine_dequant(*cpu._affine_args(p), r0, p.out_features, torch.float32, cpu._simd())
    assert torch.allclose(tile, W[r0:], rtol=1e-6, atol=1e-7)
    tile16 = cpu.ext().affine_dequant(*cpu._affine_args(p), 0, p.out_features, torch.bfloat16, cpu._simd())
    assert torch.equal(tile16, W.to(torch.bfloat16))


def test_paths_and_forcing():
    g = torch.Generator().manual_seed(0)
    p = random_affine(g, 8, 64, 4, 4, None, False)
    x = torch.randn(2, 64)
    assert kernels.path_for(x, p) == "cpu"
    with kernels.use("reference"):
        assert kernels.path_for(x, p) == "reference"
    fp32_scales = kernels.Affine(p.qweight, 4, 64, p.scale.float(), p.zero.float(), None, 4)
    assert kernels.path_for(x, fp32_scales) == "reference"  # a layout the kernels do not take: the reference runs
    assert_close(kernels.linear(x, fp32_scales), kernels.linear(x, p))


def test_env_forces_reference(monkeypatch):
    g = torch.Generator().manual_seed(0)
    p = random_affine(g, 8, 64, 4, 4, None, False)
    monkeypatch.setenv("BITNEST_KERNELS", "reference")
    assert kernels.path_for(torch.randn(1, 64), p) == "reference"


def test_gradient_through_fast_path_equals_reference():
    g = torch.Generator().manual_seed(0)
    for p in (random_affine(g, 24, 128, 3, 8, 64, False),
              kernels.Sign(pack(torch.randint(0, 2, (24, 128), generator=g).to(torch.uint8), 1), 128,
                           _fp16(torch.rand(128, generator=g) + .5), _fp16(torch.rand(24, generator=g) + .5), True)):
        x = torch.randn(3, 128, generator=g, requires_grad=True)
        r = torch.randn(3, 24, generator=g)  # a random projection (Σ y² is constant after a LayerNorm)
        (kernels.linear(x, p) * r).sum().backward()
        gx = x.grad.clone()
        x.grad = None
        with kernels.use("reference"):
            (kernels.linear(x, p) * r).sum().backward()
        assert_close(gx, x.grad, what=p.kind)


def test_no_compiler_falls_back_with_one_notice(monkeypatch, capsys):
    """Without a working compiler the extension is None, a one-line notice is printed once, the reference runs."""
    state = dict(cpu._state)
    cpu._state.clear()
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: (_ for _ in ()).throw(RuntimeError("g++: not found")))
    try:
        assert cpu.ext() is None and cpu.ext() is None
        err = capsys.readouterr().err
        assert err.count("bitnest: C++ CPU kernels unavailable (g++: not found)") == 1
    finally:
        cpu._state.clear()
        cpu._state.update(state)
        kernels._CHOICE.clear()


def test_layers_hold_no_dequantized_weight():
    """Every packed kind computes from its packed buffers: no (out, in) float tensor appears, even after a forward."""
    from bitnest.grids.affine import AffineSpec
    from bitnest.nn.onebit import PackedSignLinear
    from bitnest.nn.qlinear import QuantLinear
    lin = torch.nn.Linear(256, 64, bias=False)
    layers = [QuantLinear.from_linear(lin, AffineSpec(8, None, False), serve_bits=3),
              PackedSignLinear.from_parts(lin.weight, torch.ones(256), torch.ones(64), post_ln=True)]
    for layer in layers:
        with torch.no_grad():
            layer(torch.randn(2, 256))
        tensors = list(layer.buffers()) + list(layer.parameters()) + [v for v in vars(layer).values() if torch.is_tensor(v)]
        assert not any(t.is_floating_point() and t.numel() >= 64 * 256 for t in tensors)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("group_size", [None, 32, 64, 128, 256])
def test_vector_kernels_on_tiling_layouts(bits, group_size):
    """Layouts whose codes tile the vector blocks of every ISA (K = 1536: a multiple of the AVX-512 and AVX2 block
    of each width), so the spread kernels run, not the fallbacks: fp32 and bf16 activations, 1–16 rows (every
    pass of 8, 4, 2 and 1 rows), symmetric and asymmetric, sliced from a wider parent, with the look-up-table kernel
    off and on — against the reference."""
    from bitnest.kernels import cpu
    g = torch.Generator().manual_seed(bits * 1000 + (group_size or 0))
    for m in (1, 3, 7, 16):
        for symmetric, parent in ((False, 8), (True, 8), (False, bits)):
            if symmetric and bits < 2:
                continue
            p = random_affine(g, 20, 1536, bits, parent, group_size, symmetric)
            for dtype in (torch.float32, torch.bfloat16):
                x = _x(g, m, 1536, dtype)
                assert kernels.path_for(x, p) == ("cpu" if cpu.available() else "reference")
                ref = reference.affine_linear(x.float(), p)
                for lut in (0, 16):  # the spread kernels on every row, then the look-up-table kernel where it applies
                    with cpu.lut_max_batch(lut, force=bool(lut)):
                        assert_close(kernels.linear(x, p), ref, dtype, scale=condition(x, reference.affine_weight(p)),
                                     what=f"b={bits} g={group_size} m={m} sym={symmetric} lut={lut}")


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("tables", ["shared", "row", "group"])
def test_vector_codebook_kernels_on_tiling_layouts(bits, tables):
    """Codebooks in the spread kernels (tables held in registers; 16-entry tables take two look-ups and a blend on
    AVX2): K = 1536, groups of 128, 1–16 rows, against the reference."""
    g = torch.Generator().manual_seed(bits)
    out, n_in, gs = 12, 1536, 128
    G = n_in // gs
    Rt, Gt = {"shared": (1, 1), "row": (out, 1), "group": (out, G)}[tables]
    for m in (1, 5, 16):
        codes = torch.randint(0, 1 << bits, (out, n_in), generator=g).to(torch.uint8)
        table = _fp16(torch.randn(Rt, Gt, 1 << bits, generator=g))
        scale = _fp16(torch.rand(out, G, generator=g) + 0.1)
        p = kernels.Codebook(pack(codes, bits), bits, n_in, table, scale, gs)
        x = _x(g, m, n_in, torch.float32)
        assert_close(kernels.linear(x, p), reference.codebook_linear(x, p), torch.float32, what=f"b={bits} {tables} m={m}",
                     scale=condition(x, reference.codebook_weight(p)))
