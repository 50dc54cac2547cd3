"""The Triton (CUDA) kernels against the reference: on a GPU when there is one, else under Triton's interpreter
(TRITON_INTERPRET=1, numpy on the CPU) in a subprocess, so the kernels' indexing, masking and dequantization are
checked on every machine where triton installs. Skipped when triton is not installed."""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_kernels import random_affine
    from bitnest import kernels
    from bitnest.kernels import reference, triton_kernels as tk
    from bitnest.formats.packing import pack
    dev = {device!r}
    g = torch.Generator().manual_seed(0)
    def close(y, r, what):
        err = ((y.float().cpu() - r.float()).abs().max() / (r.float().abs().max() + 1e-9)).item()
        assert err < 2e-5, (what, err)
    def to(p):
        import dataclasses
        return dataclasses.replace(p, **{{f.name: getattr(p, f.name).to(dev) for f in dataclasses.fields(p)
                                         if torch.is_tensor(getattr(p, f.name))}})
    for bits in range(1, 9):
        for gs in (None, -1, 32, 64):
            for sym, extra in ((False, bits < 8), (bits >= 2, False)):
                p = random_affine(g, 20, 128, bits, 8, gs, sym, extra=extra)
                for M in (1, 7, 33):
                    x = torch.randn(M, 128, generator=g)
                    close(tk.affine(x.to(dev), to(p)), reference.affine_linear(x, p), (bits, gs, sym, extra, M))
    q = pack(torch.randint(0, 2, (24, 100), generator=g).to(torch.uint8), 1)
    for gv, h, ln in ((torch.rand(100, generator=g).half() + .5, torch.rand(24, generator=g).half() + .5, True),
                      (None, torch.rand(1, generator=g).half() + .5, False)):
        p = kernels.Sign(q, 100, gv, h, ln)
        x = torch.randn(5, 100, generator=g)
        close(tk.sign(x.to(dev), to(p)), reference.sign_packed_linear(x, p), "sign")
    for bits in (1, 3, 4, 6):
        for table, scale in (((20, 2), None), ((1, 1), (20, 2))):
            p = kernels.Codebook(pack(torch.randint(0, 1 << bits, (20, 128), generator=g).to(torch.uint8), bits), bits, 128,
                                 torch.randn(*table, 1 << bits, generator=g).half(),
                                 None if scale is None else torch.rand(*scale, generator=g).half() + .5, 64)
            x = torch.randn(3, 128, generator=g)
            close(tk.codebook(x.to(dev), to(p)), reference.codebook_linear(x, p), ("codebook", bits, table))
    print("ok")
""")


def test_triton_kernels_equal_reference():
    tests = str(Path(__file__).parent)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests, device=device)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_dispatch_takes_triton():
    from bitnest import kernels
    from test_kernels import random_affine
    p = random_affine(torch.Generator().manual_seed(0), 64, 256, 4, 4, 128, False)
    import dataclasses
    pc = dataclasses.replace(p, qweight=p.qweight.cuda(), scale=p.scale.cuda(), zero=p.zero.cuda())
    x = torch.randn(2, 256, device="cuda")
    assert kernels.path_for(x, pc) == "triton"
    torch.testing.assert_close(kernels.linear(x, pc).cpu(), kernels.reference.affine_linear(x.cpu(), p), rtol=1e-4, atol=1e-4)
