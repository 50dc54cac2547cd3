import pytest
import torch
from hypothesis import given, settings, strategies as st

from bitnest.errors import BitnestError
from bitnest.grids.affine import AffineSpec, dequantize, fake_quant, fit, grouped, quantize
from bitnest.grids.nested import S, slice_codes, slice_ste

GRANULARITIES = [None, -1, 16]


def rtn(W, spec):
    a, z = fit(W, spec)
    q = quantize(W, spec, a, z)
    return q, a, z, dequantize(q, spec, a, z)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("gs", GRANULARITIES)
@pytest.mark.parametrize("sym", [False, True])
def test_codes_in_range_error_bound_and_idempotent(bits, gs, sym):
    if sym and bits == 1:
        pytest.skip("symmetric needs ≥ 2 bits")
    torch.manual_seed(bits)
    W = torch.randn(24, 64)
    spec = AffineSpec(bits, gs, sym)
    q, a, z, Wh = rtn(W, spec)
    assert int(q.max()) <= spec.qmax
    # RTN error ≤ α/2 inside the range (plus fp16 slack of the stored α, z); symmetric clips only -max.
    err = (grouped(W, gs) - grouped(Wh, gs)).abs().amax(-1)
    slack = 1e-3 * grouped(W, gs).abs().amax(-1)
    bound = a.float() / 2 + slack if not sym else a.float() + slack
    assert (err <= bound).all()
    # quantize ∘ dequantize is idempotent on the grid
    assert torch.equal(quantize(Wh, spec, a, z), q)


def test_error_falls_with_bits():
    W = torch.randn(64, 128)
    errs = [(rtn(W, AffineSpec(b, 32))[3] - W).pow(2).mean().item() for b in range(1, 9)]
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:]))


def test_fake_quant_forward_equals_rtn_and_passes_gradients():
    W = torch.randn(16, 32, requires_grad=True)
    spec = AffineSpec(4, 8)
    Wq = fake_quant(W, spec)
    assert torch.equal(Wq, rtn(W.detach(), spec)[3])
    Wq.sum().backward()
    assert W.grad is not None and (W.grad != 0).float().mean() > 0.9  # straight-through, not zero


def test_group_size_must_divide():
    with pytest.raises(BitnestError, match="does not divide"):
        AffineSpec(4, 48).check_shape(16, 64)
    with pytest.raises(BitnestError):
        AffineSpec(9)
    with pytest.raises(BitnestError):
        AffineSpec(0)


# --- MatQuant slicing (methods.md §1, Eq. 6) ---

def test_paper_worked_examples():
    q = torch.tensor([53, 240, 234], dtype=torch.uint8)
    assert S(q, 8, 2).tolist() == [64, 192, 192]
    assert S(q, 8, 2, clamp=False).tolist() == [64, 256, 256]  # Extra Precision: 234 → 256


def test_int2_grid_and_identity():
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert sorted(set(S(q, 8, 2).tolist())) == [0, 64, 128, 192]
    assert torch.equal(S(q, 8, 8).to(torch.uint8), q)  # S(q, c) == q


@settings(max_examples=50, deadline=None)
@given(r=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_slice_bit_form_equals_formula(r, seed):
    q = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    formula = torch.clamp(torch.floor(q / 2 ** (8 - r) + 0.5), 0, 2**r - 1) * 2 ** (8 - r)  # round half up
    assert torch.equal(S(q.to(torch.uint8), 8, r).long(), formula.long())
    assert torch.equal(slice_ste(q.float(), 8, r), formula.float())
    assert int(slice_codes(q.to(torch.uint8), 8, r).max()) <= 2**r - 1


def test_slice_error_falls_as_r_grows():
    W = torch.randn(32, 64)
    spec = AffineSpec(8)
    _, a, z, _ = rtn(W, spec)
    q = quantize(W, spec, a, z)
    errs = [(dequantize(slice_codes(q, 8, r), spec, a, z, shift=8 - r) - W).pow(2).mean().item() for r in range(2, 9)]
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:]))
