"""lpfit: the data-free ℓp grid fit (grids/lpfit.py, methods/lpfit.py)."""
import json

import pytest
import torch

from bitnest.api import quantization_config, quantize
from bitnest.errors import BitnestError
from bitnest.formats.checkpoint import load_quantized, save_quantized
from bitnest.grids.affine import STORE_DTYPE, AffineSpec, dequantize, fit, quantize as grid_quantize
from bitnest.grids.affine import grouped
from bitnest.grids.lpfit import fit_lp, importance, shrink_lp
from bitnest.grids.nested import slice_codes
from bitnest.models.hf import load_model
from bitnest.nn.qlinear import QuantLinear

SETTINGS = [(b, g) for b in (2, 3, 4) for g in (None, 64)]


@pytest.fixture(scope="module")
def W():
    """Heavy-tailed weights (Student-t, 4 degrees of freedom), the scale of a small LM's."""
    torch.manual_seed(0)
    return torch.distributions.StudentT(4.0).sample((96, 192)) * 0.02


def _err(W, Wh, imp=None):
    """(ℓ0.7, ℓ2) error, each weight's term times imp (R, G, g) when given."""
    e = (W - Wh).abs()
    if imp is None:
        return e.pow(0.7).sum().item(), e.pow(2).sum().item()
    e = grouped(e, imp.shape[-1])  # (R, G, g) like imp
    return (e.pow(0.7) * imp).sum().item(), (e.pow(2) * imp).sum().item()


def _deq(W, spec, a, z):
    return dequantize(grid_quantize(W, spec, a, z), spec, a, z)


@pytest.mark.parametrize("t", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("bits,group", SETTINGS)
def test_lp_and_l2_error_at_most_rtn(W, bits, group, t):
    """The guarantee in the objective's own weights ι = σ + t|w| (t = 0: the plain errors)."""
    spec = AffineSpec(bits, group)
    a, z = fit_lp(W, spec, magnitude_weight=t)
    assert a.dtype == STORE_DTYPE and z.dtype == STORE_DTYPE and a.shape == z.shape
    imp = importance(grouped(W, group), t)
    lp, l2 = _err(W, _deq(W, spec, a, z), imp)
    lp0, l20 = _err(W, _deq(W, spec, *fit(W, spec)), imp)
    assert lp <= lp0 and l2 <= l20, (lp, lp0, l2, l20)
    if bits == 2:  # where the grid is coarse the fit must matter, not just tie
        assert lp < 0.85 * lp0 and l2 < 0.85 * l20


@pytest.mark.parametrize("bits,group", SETTINGS)
def test_at_most_hqq_optimizer(W, bits, group):
    pytest.importorskip("hqq")
    from hqq.core.quantize import Quantizer
    Wq, meta = Quantizer.quantize(W, nbits=bits, channel_wise=True, group_size=group or W.shape[1], optimize=True,
                                  round_zero=False, axis=1, bitpack=False, compute_dtype=torch.float32, device="cpu")
    lph, l2h = _err(W, Quantizer.dequantize(Wq, meta).reshape(W.shape))
    spec = AffineSpec(bits, group)
    lp, l2 = _err(W, _deq(W, spec, *fit_lp(W, spec, magnitude_weight=0.0)))  # HQQ's objective: every weight alike
    assert lp <= lph and l2 <= l2h, (lp, lph, l2, l2h)


@pytest.mark.parametrize("bits,group", SETTINGS)
def test_magnitude_weight_protects_the_largest_weights(W, bits, group):
    """ι = σ + t|w| (the default t) fits the top 1 % of |w| closer than the unweighted fit (which clips them)."""
    spec = AffineSpec(bits, group)
    top = W.abs() >= W.abs().flatten().quantile(0.99)
    err = {t: (W - _deq(W, spec, *fit_lp(W, spec, magnitude_weight=t)))[top].pow(2).sum().item() for t in (0.0, 0.25)}
    assert err[0.25] < 0.9 * err[0.0], err


@pytest.mark.parametrize("symmetric,int_zero", [(True, False), (False, True)])
def test_symmetric_and_integer_zero(W, symmetric, int_zero):
    spec = AffineSpec(3, 64, symmetric, int_zero)
    a, z = fit_lp(W, spec)
    if symmetric:
        assert z is None
    else:
        assert torch.equal(z.float(), torch.round(z.float())) and z.min() >= 0 and z.max() <= spec.qmax
    lp, l2 = _err(W, _deq(W, spec, a, z))
    lp0, l20 = _err(W, _deq(W, spec, *fit(W, spec)))
    assert lp <= lp0 and l2 <= l20


def test_hqq_style_zero_only_and_no_iterations(W):
    spec = AffineSpec(2, 64)
    a0, _ = fit(W, spec)
    a, z = fit_lp(W, spec, update_scale=False, clips=(1.0,))
    assert torch.equal(a, a0)  # the scale stays MinMax's: only z moved
    lp, _ = _err(W, _deq(W, spec, a, z))
    assert lp < _err(W, _deq(W, spec, a0, fit(W, spec)[1]))[0]
    a, z = fit_lp(W, spec, iters=0, clips=(1.0,))  # nothing to try: MinMax itself
    assert torch.equal(a, a0) and torch.equal(z, fit(W, spec)[1])


def test_shrink_is_the_lp_prox():
    x = torch.tensor([-3.0, -0.1, 0.0, 0.1, 3.0])
    y = shrink_lp(x, 1.0, 0.7)
    assert torch.equal(y[1:4], torch.zeros(3))  # small residuals: no sparse error (fitted by the grid)
    assert 0 < y[4] < 3 and y[0] == -y[4]


def test_slice_aware_lowers_summed_error_over_widths(W):
    widths = (8, 4, 3, 2)
    for group in (None, 64):
        spec = AffineSpec(8, group)

        for t, bound in ((0.0, 0.97), (0.25, 1.0)):  # unweighted: clear gain; the default ι keeps MinMax's range more
            imp = importance(grouped(W[:32], group), t)

            def summed(a, z):
                q = grid_quantize(W[:32], spec, a, z)
                return sum(_err(W[:32], dequantize(slice_codes(q, 8, r), spec, a, z, shift=8 - r), imp)[0] for r in widths)
            plain = summed(*fit(W[:32], spec))
            assert summed(*fit_lp(W[:32], spec, widths=widths, iters=10, magnitude_weight=t)) < bound * plain, (group, t)


def test_method_checkpoint_roundtrip(tiny_llama_dir, tmp_path):
    ids = torch.randint(3, 8000, (2, 16), generator=torch.Generator().manual_seed(0))
    m = load_model(tiny_llama_dir).model
    fp = m(ids).logits
    quantize(m, "lpfit", bits=3, group_size=16, iters=10, progress=False)
    qs = [q for q in m.modules() if isinstance(q, QuantLinear)]
    assert qs and all(q.bits == 3 and q.group_size == 16 for q in qs)
    out = save_quantized(m, None, tmp_path / "ck", quantization_config("lpfit", m.bitnest_method[1], "src"),
                         storage_dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["method"] == "lpfit" and cfg["config"]["p"] == 0.95 and not cfg["nested"]
    m2 = load_model(out).model
    assert torch.equal(m(ids).logits, m2(ids).logits)
    assert (m2(ids).logits - fp).abs().mean() < fp.abs().mean()


def test_nested_checkpoint_serves_every_width(tiny_llama_dir, tmp_path):
    ids = torch.randint(3, 8000, (1, 16), generator=torch.Generator().manual_seed(1))
    m = load_model(tiny_llama_dir).model
    quantize(m, "lpfit", bits=8, nested=True, iters=3, progress=False)
    out = save_quantized(m, None, tmp_path / "nested", quantization_config("lpfit", m.bitnest_method[1], "src"),
                         storage_dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["nested"]
    for r in (8, 4, 2):
        served = load_quantized(out, bits=r).model
        assert all(q.serve_bits == r and q.bits == 8 for q in served.modules() if isinstance(q, QuantLinear))
        assert torch.isfinite(served(ids).logits).all()


def test_bad_config():
    with pytest.raises(BitnestError):
        quantize(torch.nn.Module(), "lpfit", p=0.0)
    with pytest.raises(BitnestError):
        quantize(torch.nn.Module(), "lpfit", nested=True, bits=4, widths=(9, 4))


def test_cli(tiny_llama_dir, tmp_path, capsys):
    from bitnest.cli import main
    assert main(["quantize", "--model", str(tiny_llama_dir), "--method", "lpfit", "--bits", "2", "--group-size", "32",
                 "-o", "iters=5", "-o", "p=0.8", "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    assert "lpfit 2-bit" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["config"]["iters"] == 5 and cfg["config"]["p"] == 0.8 and cfg["config"]["group_size"] == 32
    assert main(["quantize", "--model", str(tiny_llama_dir), "--method", "lpfit", "--bits", "4", "-o", "nested=true",
                 "-o", "widths=8,4", "-o", "iters=3", "--out", str(tmp_path / "n"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "n" / "config.json").read_text())["quantization_config"]["nested"]


def test_lpfit_select_counts_wins_against_p07():
    """bench/lpfit_select.py's table: bold marks the lowest ΔNLL among the p columns, and a p 'beats 0.7' only in
    the cells where its ΔNLL is strictly lower (ties do not count)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import lpfit_select as ls

    def row(p, wiki, c4, method="lpfit"):
        r = {"model": "m", "bits": 3, "group_size": "channel", "method": method, "p": p,
             "d_nll_wikitext2_valid": wiki, "d_nll_c4_1600": c4}
        if method == "lpfit":
            r.update(vs_hqq_opt_wikitext2_valid=[wiki - 0.1, wiki - 0.2, wiki], vs_hqq_opt_c4_1600=[c4 - 0.1, c4 - 0.2, c4])
        return r

    rows = [row(0.7, 0.1, 0.1, "hqq_opt"), row(0.7, 0.05, 0.02), row(0.95, 0.04, 0.02), row(1.0, 0.06, 0.01)]
    text, lines = ls.table(rows, [0.7, 0.95, 1.0])
    assert lines == ["p = 0.95: lower ΔNLL than p = 0.7 in 1 of 2 cells", "p = 1.0: lower ΔNLL than p = 0.7 in 1 of 2 cells"]
    wiki, c4 = [ln for ln in text.splitlines() if ln.startswith("| m ")]
    bold = lambda line: [i for i, c in enumerate(line.split(" | ")[5:]) if c.startswith("**")]  # p columns
    assert bold(wiki) == [1] and bold(c4) == [2]  # p = 0.95 on WikiText-2, p = 1 on C4
