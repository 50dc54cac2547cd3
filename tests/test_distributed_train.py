"""Data-parallel training under torchrun (gloo, CPU): MatQuant QAT and OneBit distillation on 2 processes, each
taking half of every step's global batch and summing gradients, train the parameters 1 process trains (within
floating-point rounding); a checkpoint written by 2 processes resumes on 1 and one written by 1 resumes on 2."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import HERE, TORCHRUN, _torchrun  # noqa: E402  (the 2-rank launch pattern, free port, gloo)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not Path(TORCHRUN).exists(),
                                reason="torch.distributed / torchrun not available")

STEPS, STOP = 6, 3
RUNS = {  # name: (method, options); a global batch of 4 sequences of 16 tokens, 6 steps
    "matquant": ("matquant", dict(steps=STEPS, batch=4, lr=5e-3, warmup=1)),
    "onebit": ("onebit", dict(steps=STEPS, batch=4, seq_len=16, lr=3e-3, warmup=1)),
}
# the same runs with the student (and OneBit's teacher) sharded by FSDP2: on 1 rank fsdp changes nothing
SHARDED = {f"{k}-fsdp": (m, {**kw, "fsdp": True}) for k, (m, kw) in RUNS.items()}


def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (STEPS * 4, 16), generator=torch.Generator().manual_seed(5))


def run(name: str, ckpt_dir: str | Path, stop_at: int | None = None, ckpt_every: int = 100):
    """Train RUNS[name] on tiny() with the checkpoint in `ckpt_dir`; `stop_at`: raise during that step (the
    loss function of step `stop_at` fails, on every rank), after the checkpoint of the step before."""
    from bitnest.api import quantize
    from bitnest.methods.matquant import MatQuantLoss
    from bitnest.train.distill import Distill

    method, kw = {**RUNS, **SHARDED}[name]
    cls = MatQuantLoss if method == "matquant" else Distill
    real = cls.__call__
    calls = {"n": 0}

    def stopping(self, student, batch):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise RuntimeError("stopped")
        return real(self, student, batch)

    cls.__call__ = stopping
    try:
        quantize(tiny(), method, calib=tokens(), ckpt_dir=str(ckpt_dir), ckpt_every=ckpt_every, progress=False, **kw)
    except RuntimeError as e:
        if str(e) != "stopped":
            raise
    finally:
        cls.__call__ = real


def trained(ckpt_dir: Path) -> dict:
    """(step, trained parameters, loss history) of the run's train_state.pt."""
    s = torch.load(Path(ckpt_dir) / "train_state.pt", weights_only=True)
    return {"step": s["step"], "params": s["params"], "history": s["history"], "tokens": s["tokens"]}


def sharding_record(path: str) -> None:
    """Under torchrun: shard tiny() with train/fsdp.Sharded, record what this rank holds, give it back, and record
    whether it is the model it was (the same Parameter objects and classes, the same values)."""
    import json

    from bitnest.distributed import rank_world
    from bitnest.train.fsdp import Sharded

    model = tiny()
    params = list(model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    classes = [type(m) for m in model.modules()]
    sh = Sharded(model, params)
    held = sum(p.to_local().numel() for p in sh.params)  # this rank's shards
    freed = all(p.numel() == 0 for p in params)  # the originals hold no storage while sharded
    sh.restore()
    same = (all(a is b for a, b in zip(model.parameters(), params)) and classes == [type(m) for m in model.modules()]
            and all(torch.equal(before[n], p) for n, p in model.named_parameters()))
    model.load_state_dict(model.state_dict())  # no FSDP state_dict hook left behind
    again = Sharded(model, params)  # a second run on the same modules (OmniQuant's blocks, a second train call)
    again.restore()
    same = same and all(torch.equal(before[n], p) for n, p in model.named_parameters())
    # an error every rank raises alike (here a non-finite loss) gives the model back before it propagates
    from bitnest.errors import BitnestError
    from bitnest.train.loop import train
    try:
        train(model, [torch.zeros(4, 8, dtype=torch.long)], lambda m, b: m(b).logits.sum() * float("nan"), steps=2,
              lr=1e-3, progress=False, fsdp=True)
    except BitnestError:
        same = same and classes == [type(m) for m in model.modules()] and all(
            torch.equal(before[n], p) for n, p in model.named_parameters())
    else:
        same = False
    Path(f"{path}-{rank_world()[0]}.json").write_text(json.dumps(
        {"held": held, "total": sum(v.numel() for v in before.values()), "freed": freed, "same": same}))


WORKER = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {here!r})
from test_distributed_train import run, RUNS, SHARDED, STOP, sharding_record
from bitnest.distributed import from_env, rank_world
d = {d!r}
with from_env():
    assert rank_world()[1] == 2, rank_world()
    for name in RUNS:
        run(name, f"{{d}}/{{name}}-2")
    run("matquant", f"{{d}}/stop-2", stop_at=STOP + 1, ckpt_every=1)  # 2 ranks, stopped after step 3
    run("matquant", f"{{d}}/stop-1", ckpt_every=1)  # resumes a 1-rank checkpoint of step 3 on 2 ranks
    sharding_record(f"{{d}}/sharding")
    for name in SHARDED:
        run(name, f"{{d}}/{{name}}-2")
    run("matquant-fsdp", f"{{d}}/stop-fsdp-2", stop_at=STOP + 1, ckpt_every=1)  # FSDP on 2 ranks, stopped after step 3
    run("matquant-fsdp", f"{{d}}/stop-1-fsdp", ckpt_every=1)  # a 1-rank checkpoint of step 3 resumed under FSDP
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist-train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker
    try:
        run("matquant", d / "stop-1", stop_at=STOP + 1, ckpt_every=1)  # 1 rank, stopped after step 3
        assert trained(d / "stop-1")["step"] == STOP
        shutil.copytree(d / "stop-1", d / "stop-1-fsdp")  # the same checkpoint, resumed under FSDP on 2 ranks
        (d / "worker.py").write_text(WORKER.format(here=str(HERE), d=str(d)))
        _torchrun([str(d / "worker.py")], timeout=300)
        assert trained(d / "stop-2")["step"] == STOP
        run("matquant", d / "stop-2", ckpt_every=1)  # the 2-rank checkpoint, resumed on 1 rank to the end
        assert trained(d / "stop-fsdp-2")["step"] == STOP
        run("matquant", d / "stop-fsdp-2", ckpt_every=1)  # the 2-rank FSDP checkpoint, resumed on 1 rank, no FSDP
        for name in RUNS:
            run(name, d / f"{name}-1")
    finally:
        torch.set_num_threads(threads)
    return d


def diffs(two: dict, one: dict) -> dict:
    """How far apart two runs' trained parameters are: max |Δw|, ‖Δw‖ / ‖w‖ over all of them, and the largest
    max |Δw| / max |w| of one tensor."""
    a, b = two["params"], one["params"]
    assert a.keys() == b.keys() and a
    return {"max_abs": max(float((a[k] - b[k]).abs().max()) for k in b),
            "rel_norm": (sum(float((a[k] - b[k]).pow(2).sum()) for k in b) / sum(float(b[k].pow(2).sum()) for k in b)) ** 0.5,
            "max_rel": max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)}


def _close(two: dict, one: dict, what: str) -> None:  # what: a RUNS name, then a note
    """Equal within floating-point rounding. The gradients agree to ~1e-7 relative (the per-rank halves are summed
    in another order than one backward over the whole batch), but training amplifies that: Adam divides by √v, and
    QAT's rounding is a step function, so a weight ~1e-7 from a grid boundary can round to the other code on one side
    (MatQuant here: losses equal to 1e-7 for 5 steps, then one int2 code flips at step 6; max |Δw| ≈ 5e-5 = 1% of
    one step's lr). Hence the bounds: ‖Δw‖/‖w‖ ≤ 1e-4, max |Δw| ≤ 2% of lr, losses within 1e-4 relative."""
    assert two["step"] == one["step"] == STEPS
    assert two["tokens"] == one["tokens"] == STEPS * 4 * 16  # the global batch is counted, whatever W
    d = diffs(two, one)
    print(f"{what}: 2 ranks vs 1: max |Δw| {d['max_abs']:.2e}, ‖Δw‖/‖w‖ {d['rel_norm']:.2e}, "
          f"max over tensors of max |Δw| / max |w| {d['max_rel']:.2e}")
    lr = {**RUNS, **SHARDED}[what.split()[0].rstrip(":")][1]["lr"]
    assert d["rel_norm"] <= 1e-4 and d["max_abs"] <= 0.02 * lr, d
    for h2, h1 in zip(two["history"], one["history"], strict=True):
        assert h2.keys() == h1.keys()
        assert h2["lr"] == h1["lr"] and h2["tokens"] == h1["tokens"]
        for k in h1:
            assert h2[k] == pytest.approx(h1[k], rel=1e-3 if k == "grad_norm" else 1e-4, abs=1e-6), (h2["step"], k)
    assert two["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-6)  # step 1: same weights
    losses = [h["loss"] for h in one["history"]]
    assert losses[-1] < losses[0] and all(h["grad_norm"] > 0 for h in one["history"])  # it did train


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_train_what_one_trains(runs, name):
    _close(trained(runs / f"{name}-2"), trained(runs / f"{name}-1"), name)


@pytest.mark.parametrize("name", list(RUNS))
def test_fsdp_two_ranks_train_what_one_trains(runs, name):
    """FSDP2 shards the student over 2 ranks (each holds half of every parameter and of Adam's state) and gives back
    a plain model the method converts: the trained parameters are those of 1 process within rounding."""
    _close(trained(runs / f"{name}-fsdp-2"), trained(runs / f"{name}-1"), f"{name}-fsdp")


def test_fsdp_each_rank_holds_half_and_gives_the_model_back(runs):
    import json

    recs = [json.loads((runs / f"sharding-{r}.json").read_text()) for r in (0, 1)]
    total = recs[0]["total"]
    for r in recs:  # dim-0 shards: half of every tensor, rounded up per tensor
        assert r["freed"] and r["same"], r
        assert total / 2 - 64 * 16 <= r["held"] <= total / 2 + 64 * 16, (r["held"], total)
    assert sum(r["held"] for r in recs) == total


def test_fsdp_checkpoint_resumes_without_fsdp_and_back(runs):
    """A checkpoint written under FSDP holds whole tensors: 1 process without FSDP resumes it, and a 1-process
    checkpoint resumes under FSDP on 2 ranks; both end where the uninterrupted 1-process run does."""
    _close(trained(runs / "stop-fsdp-2"), trained(runs / "matquant-1"), "matquant-fsdp: FSDP on 2 ranks to step 3, then 1 rank")
    _close(trained(runs / "stop-1-fsdp"), trained(runs / "matquant-1"), "matquant-fsdp: 1 rank to step 3, then FSDP on 2")


def test_two_rank_checkpoint_resumes_on_one_rank(runs):
    assert trained(runs / "stop-2")["history"][STOP - 1]["step"] == STOP
    _close(trained(runs / "stop-2"), trained(runs / "matquant-1"), "matquant: 2 ranks to step 3, then 1 rank")


def test_one_rank_checkpoint_resumes_on_two_ranks(runs):
    _close(trained(runs / "stop-1"), trained(runs / "matquant-1"), "matquant: 1 rank to step 3, then 2 ranks")


def test_cli_training_under_torchrun_rank0_writes(tmp_path):
    """`torchrun -m bitnest.cli quantize --method onebit`: teacher-generated data (the same on both ranks: rank 0's),
    one checkpoint written by rank 0, its training history counting the global batch's tokens."""
    import json

    from test_distributed import _tiny

    model = str(_tiny(tmp_path / "tiny"))
    r = _torchrun(["-m", "bitnest.cli", "quantize", "--method", "onebit", "--model", model, "--no-progress",
                   "-o", "steps=3", "-o", "batch=4", "-o", "seq_len=16", "-o", "samples=12", "-o", "gen_batch=12",
                   "-o", f"ckpt_dir={tmp_path / 'ck'}", "--out", str(tmp_path / "out")])
    assert r.stdout.count("wrote ") == 1, r.stdout  # rank 0 alone reports (and writes)
    history = json.loads((tmp_path / "out" / "training_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3] and history[-1]["tokens"] == 3 * 4 * 16
    assert trained(tmp_path / "ck")["step"] == 3
