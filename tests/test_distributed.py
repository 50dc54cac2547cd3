"""Data-parallel calibration under torchrun (gloo, CPU): 2 processes give the bit-identical packed model of 1."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
METHODS = {"gptq": dict(bits=4, group_size=32, batch_size=2),
           "matgptq": dict(precisions=(8, 4, 2), group_size=32, batch_size=2)}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not Path(TORCHRUN).exists(),
                                reason="torch.distributed / torchrun not available")


def _tiny(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def _calib() -> torch.Tensor:
    return torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(3))  # batch 2: 3 batches, 2 + 1


def quantize_all(model_dir: str) -> dict:
    """{method: state dict of the quantized model} for METHODS, and {"actquant": the error it raised or None}."""
    from bitnest.api import quantize
    from bitnest.errors import BitnestError
    from bitnest.models.hf import load_model

    out = {}
    for method, kw in METHODS.items():
        model = load_model(model_dir).model
        quantize(model, method, calib=_calib(), progress=False, **kw)
        out[method] = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        quantize(load_model(model_dir).model, "actquant", calib=_calib(), progress=False, batch_size=2,
                 act_mode="static")  # observers: not data-parallel
        out["actquant"] = None
    except BitnestError as e:
        out["actquant"] = str(e)
    return out


WORKER = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {here!r})
from test_distributed import quantize_all
from bitnest.distributed import from_env, rank_world
with from_env():
    rank, world = rank_world()
    assert world == 2, world
    torch.save(quantize_all({model!r}), f"{out}/rank{{rank}}.pt")
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    src = str(HERE.parent / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _torchrun(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(1-process results, [rank 0, rank 1] results, seconds 1 process, seconds 2 processes)."""
    d = tmp_path_factory.mktemp("dist")
    model = str(_tiny(d / "tiny"))
    (d / "worker.py").write_text(WORKER.format(here=str(HERE), model=model, out=str(d)))
    t0 = time.perf_counter()
    _torchrun([str(d / "worker.py")])
    t2 = time.perf_counter() - t0
    ranks = [torch.load(d / f"rank{r}.pt") for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker: the same matmul kernels, the same bits
    try:
        t0 = time.perf_counter()
        one = quantize_all(model)
        t1 = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return one, ranks, t1, t2


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_bit_identical_to_one(runs, method):
    one, ranks, t1, t2 = runs
    want = one[method]
    packed = [k for k in want if k.rsplit(".", 1)[-1] in ("qweight", "scale", "zero")]
    assert {k.rsplit(".", 1)[-1] for k in packed} == {"qweight", "scale", "zero"}
    assert len([k for k in packed if k.endswith(".qweight")]) == 3 * 7  # every Linear of the 3 blocks
    for r, got in enumerate(ranks):
        assert got[method].keys() == want.keys()
        for k in want:
            assert torch.equal(got[method][k], want[k]), f"rank {r}: {k} differs from the 1-process run"
    print(f"{method}: 1 process quantize_all {t1:.1f} s; torchrun 2 processes (with start-up) {t2:.1f} s")


def test_unsupported_stat_raises_under_torchrun(runs):
    one, ranks, _, _ = runs
    assert one["actquant"] is None  # one process: fine
    for got in ranks:
        assert "not data-parallel" in got["actquant"]


def test_cli_quantize_under_torchrun_rank0_writes(tmp_path):
    """`torchrun -m bitnest.cli quantize --method gptq` writes one checkpoint (rank 0), equal to the 1-process CLI's;
    its calibration tokens are self-generated (no tokenizer), the same on every rank."""
    from safetensors.torch import load_file

    model = str(_tiny(tmp_path / "tiny"))
    opts = ["quantize", "--method", "gptq", "--model", model, "--bits", "4", "--group-size", "32", "--no-progress",
            "-o", "n_calib=6", "-o", "calib_len=16", "-o", "batch_size=2"]
    one = subprocess.run([sys.executable, "-m", "bitnest.cli", *opts, "--out", str(tmp_path / "one")], env=_env(),
                         capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    r = _torchrun(["-m", "bitnest.cli", *opts, "--out", str(tmp_path / "two")])
    assert r.stdout.count("wrote ") == 1, r.stdout  # rank 0 alone reports (and writes)
    a = {k: v for f in sorted((tmp_path / "one").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    b = {k: v for f in sorted((tmp_path / "two").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert a.keys() == b.keys() and any(k.endswith(".qweight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
