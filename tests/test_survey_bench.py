"""bench/survey.py: the GPTQ transcription check (IST-DASLab/gptq's fasterquant vs bitnest's gptq), the identity
probe the peer GPTQ rows rely on, and the plan's coverage of every technique of issue 5."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
survey = pytest.importorskip("survey")


def correlated(n_in: int, n_rows: int = 2048, seed: int = 0):
    """Inputs with a strongly non-identity covariance and their GPTQ Hessian 2XᵀX/n."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + torch.eye(n_in)
    X = torch.randn(n_rows, n_in, generator=g) @ A * torch.linspace(0.2, 3, n_in)  # (n, in)
    return X, 2 * X.T @ X / n_rows


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 64), (2, None)])
def test_bitnest_gptq_equals_the_reference_loop_on_the_same_grid(bits, group, one_thread):
    """bitnest's GPTQ (act-order, static groups) gives the very weights of the transcribed reference loop run
    on bitnest's grid, and beats RTN in output error."""
    from bitnest.grids.affine import AffineSpec, dequantize, fit, quantize
    from bitnest.grids.affine import AffineGrid
    from bitnest.methods.gptq import gptq

    torch.manual_seed(0)
    _, H = correlated(256)
    W = torch.randn(48, 256) * 0.05
    spec = AffineSpec(bits, group)
    Q, alpha, z = gptq(W, H, AffineGrid(spec), act_order=True)
    Wb = dequantize(Q, spec, alpha, z)
    Wref = survey._reference_on_grid(W, H, spec, alpha, z)
    assert torch.allclose(Wb, Wref, atol=1e-6 * W.abs().max().item(), rtol=0)
    err = lambda Wq: torch.trace((W - Wq) @ H @ (W - Wq).T).item()  # noqa: E731
    a0, z0 = fit(W, spec)
    assert err(Wb) < 0.8 * err(dequantize(quantize(W, spec, a0, z0), spec, a0, z0))


def test_transcription_with_identity_hessian_is_rtn_on_its_own_grid(one_thread):
    """The transcription itself is sane: with H = I (and no damping) no error is spread to other columns, so
    fasterquant is round-to-nearest on the reference's grid (integer zero point, range widened to include 0)."""
    W = torch.randn(16, 128) * 0.1
    Q = survey.fasterquant_reference(W, torch.eye(128), 4, None, actorder=False, percdamp=0.0)
    xmin = torch.minimum(W.min(1)[0], torch.zeros(16))[:, None]
    xmax = torch.maximum(W.max(1)[0], torch.zeros(16))[:, None]
    scale = (xmax - xmin) / 15
    zero = torch.round(-xmin / scale)
    rtn = scale * (torch.clamp(torch.round(W / scale) + zero, 0, 15) - zero)
    assert torch.allclose(Q, rtn, atol=1e-7)


def test_served_weight_is_the_layer_weight():
    lin = torch.nn.Linear(24, 40, bias=False)
    assert torch.equal(survey.served_weight(lin, 24), lin.weight.detach())


@pytest.mark.slow
def test_transcription_check_on_a_real_ref10m_layer(ref10m_path, one_thread):
    args = argparse.Namespace(data_dir=None, n_calib=8, threads=1)
    rows = survey.transcription_check(args, n_calib=8, verbose=False)
    for r in rows:
        assert abs(r["rel_vs_same_grid"]) <= 0.01 and r["identical_same_grid"] > 0.999
        assert r["err_bitnest"] < r["err_rtn"]
        assert r["err_bitnest"] <= 1.01 * r["err_reference"]  # the real-valued zero point never loses here


def test_plan_covers_every_technique(shared, one_thread):
    """stories260K (widths 64 and 172): per channel only, and every method of issue 5 has a row."""
    if not (shared / "data" / "stories260K" / "stories260K.bin").is_file():
        pytest.skip("stories260K not found")
    args = argparse.Namespace(data_dir=None, quick=False, n_calib=4, mixed_calib=1, mixed_len=64, mixed_candidates=(2, 8),
                              matquant_steps=2, onebit_steps=2, onebit_ckpt=None, peer_python=None, limit=2, threads=1)
    s = survey.Survey("stories260K", args)
    assert s.groups == [None]
    plan = s.plan()
    methods = {(x.library, x.method) for x in plan}
    for m in ("rtn", "gptq", "gptq+clip", "kmeans", "share", "nf", "log", "mixed(gptq+clip)", "onebit", "w8a8_dynamic",
              "w8a8_static_minmax", "w8a8_static_percentile", "w8a8_static_mse", "w4a8_dynamic", "intonly_w8a8"):
        assert ("bitnest", m) in methods, m
    for p in (("hqq", "rtn"), ("hqq", "hqq_opt"), ("torchao", "rtn_intx"), ("optimum-quanto", "rtn")):
        assert p in methods
    assert {x.bits for x in plan if x.method == "gptq"} == {8, 4, 3, 2}
    assert {x.bits for x in plan if x.method == "mixed(gptq+clip)"} == {2.5, 3.0}
