"""The shared training loop, distillation losses and training data."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitnest.errors import BitnestError
from bitnest.train import (Batches, Distill, frozen_copy, hidden_mse, kd_kl, lr_lambda, self_generate, soft_ce,
                           text_sequences, train)
from bitnest.train.loop import STATE_FILE


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest


def tiny_llama(seed=0, dropout=0.0, vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      attention_dropout=dropout, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------------------ losses


def test_kd_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50) * 3
    assert kd_kl(logits, logits.clone()).abs().item() < 1e-6
    assert kd_kl(logits + 1.0, logits).abs().item() < 1e-5  # a logit shift is the same distribution
    assert kd_kl(torch.randn(2, 7, 50), logits).item() > 0.1


def test_soft_ce_is_kl_plus_teacher_entropy():
    torch.manual_seed(1)
    s, t = torch.randn(3, 5, 40), torch.randn(3, 5, 40)
    p = F.softmax(t, -1)
    entropy = -(p * F.log_softmax(t, -1)).sum(-1).mean()
    assert torch.allclose(soft_ce(s, t), kd_kl(s, t) + entropy, atol=1e-5)
    # same gradient w.r.t. the student
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    soft_ce(s1, t).backward()
    kd_kl(s2, t).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7)


def test_hidden_mse_normalizes_and_sums_over_layers():
    torch.manual_seed(2)
    h = [torch.randn(2, 4, 16) for _ in range(3)]
    assert hidden_mse(h, [x.clone() for x in h]).item() < 1e-10
    assert hidden_mse([3.0 * x for x in h], h).item() < 1e-10  # L2-normalized: scale-free
    # orthogonal unit directions: ‖a − b‖² = 2 per token, summed over 3 layers
    e0, e1 = torch.zeros(1, 5, 8), torch.zeros(1, 5, 8)
    e0[..., 0], e1[..., 1] = 1.0, 1.0
    assert hidden_mse([e0] * 3, [e1] * 3).item() == pytest.approx(6.0, abs=1e-6)
    # opposite directions: 4 per token
    assert hidden_mse([e0], [-e0]).item() == pytest.approx(4.0, abs=1e-6)


def test_distill_loss_is_zero_for_a_copy_of_the_teacher():
    m = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    out = Distill(frozen_copy(m), alpha=1.0, hidden=True)(m, ids)
    assert set(out) == {"loss", "kd", "hidden"}
    assert out["loss"].item() < 1e-5 and out["hidden"].item() < 1e-5
    with pytest.raises(BitnestError):
        Distill(m, kd="mse")


# ------------------------------------------------------------------------------------------------ schedule


def test_lr_schedule_warmup_then_cosine_to_zero():
    steps, warm = 100, 10
    lam = [lr_lambda(s, steps=steps, warmup=warm) for s in range(steps)]
    assert lam[:warm] == pytest.approx([(i + 1) / warm for i in range(warm)])
    assert lam[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lam[warm:], lam[warm + 1:]))  # non-increasing after warm-up
    assert lr_lambda(steps, steps=steps, warmup=warm) == pytest.approx(0.0, abs=1e-12)
    mid = warm + (steps - warm) // 2
    assert lam[mid] == pytest.approx(0.5, abs=1e-9)
    assert lr_lambda(50, steps=100, warmup=0, schedule="constant") == 1.0
    assert lr_lambda(55, steps=100, warmup=10, schedule="linear") == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ loop


def _run(model, steps, ckpt_dir=None, ckpt_every=3, die_at=None, lr=5e-3):
    teacher = frozen_copy(tiny_llama(seed=1))
    data = torch.randint(2, 128, (10, 16), generator=torch.Generator().manual_seed(3))

    def log_fn(rec):
        if die_at is not None and rec["step"] == die_at:
            raise RuntimeError("simulated crash")

    return train(model, Batches(data, 3, seed=5), Distill(teacher), steps=steps, lr=lr, warmup=2,
                 ckpt_dir=ckpt_dir, ckpt_every=ckpt_every, progress=False, log_fn=log_fn)


def test_resume_is_bit_identical(tmp_path, device):
    # attention dropout > 0: the result depends on the RNG stream, which the checkpoint must restore
    ref = tiny_llama(dropout=0.1).to(device)
    r_ref = _run(ref, 6)
    assert r_ref.steps == 6 and r_ref.tokens == 6 * 3 * 16

    m = tiny_llama(dropout=0.1).to(device)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(m, 6, ckpt_dir=tmp_path, die_at=4)  # steps 1-4 ran, the checkpoint holds step 3
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["step"] == 3
    m2 = tiny_llama(dropout=0.1).to(device)  # a fresh process: same initial model, nothing else
    r = _run(m2, 6, ckpt_dir=tmp_path)
    assert r.resumed_from == 3 and r.steps == 6 and r.tokens == r_ref.tokens
    for (n, a), (_, b) in zip(ref.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in r.history] == [h["loss"] for h in r_ref.history]
    assert not [p for p in tmp_path.iterdir() if p.name != STATE_FILE]  # no temporary files left behind

    # a finished run resumes to "done" without training
    r_again = _run(tiny_llama(dropout=0.1).to(device), 6, ckpt_dir=tmp_path)
    assert r_again.resumed_from == 6 and len(r_again.history) == 6


def test_resume_refuses_different_settings(tmp_path):
    _run(tiny_llama(), 3, ckpt_dir=tmp_path)
    with pytest.raises(BitnestError, match="lr"):
        _run(tiny_llama(), 3, ckpt_dir=tmp_path, lr=1e-2)


def test_train_lowers_loss_logs_parts_and_restores_mode():
    m = tiny_llama()
    m.eval()
    records = []
    teacher = frozen_copy(tiny_llama(seed=1))
    data = torch.randint(2, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # train enables grad itself (api.quantize runs methods under no_grad)
        r = train(m, Batches(data, 4), Distill(teacher), steps=30, lr=1e-2, warmup=3, progress=False,
                  log_fn=records.append)
    assert [x["step"] for x in records] == list(range(1, 31))
    assert {"loss", "kd", "hidden", "lr", "grad_norm", "tokens"} <= set(records[0])
    first = sum(x["loss"] for x in records[:3]) / 3
    last = sum(x["loss"] for x in records[-3:]) / 3
    assert last < 0.7 * first
    assert records[-1]["tokens"] == 30 * 4 * 16
    assert not m.training


def test_nan_loss_is_a_clear_error():
    m = tiny_llama()
    with pytest.raises(BitnestError, match="lower the learning rate"):
        train(m, [torch.zeros(1, 4, dtype=torch.long)], lambda s, b: torch.tensor(float("nan"), requires_grad=True),
              steps=2, lr=1e-3, progress=False)


def test_train_only_given_params():
    m = tiny_llama()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    only = [m.model.layers[0].mlp.up_proj.weight]
    data = torch.randint(2, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    train(m, Batches(data, 2), Distill(frozen_copy(tiny_llama(seed=1))), steps=2, lr=1e-2, params=only, progress=False)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.0.mlp.up_proj.weight"}


# ------------------------------------------------------------------------------------------------ data


def test_batches_deterministic_and_cover_every_row_each_epoch():
    data = torch.arange(10 * 3).view(10, 3)
    b1, b2 = Batches(data, 3, seed=7), Batches(data, 3, seed=7)
    assert len(b1) == 3
    for s in range(7):
        assert torch.equal(b1(s), b2(s))
    epoch0 = torch.cat([b1(s) for s in range(3)])[:, 0] // 3
    assert len(set(epoch0.tolist())) == 9  # 9 distinct rows, the 10th dropped this epoch
    assert not torch.equal(b1(0), b1(3))  # a new permutation each epoch
    with pytest.raises(BitnestError):
        Batches(data, 11)


def test_self_generate_is_seeded_greedy_then_sampled():
    m = tiny_llama(vocab=64)
    a = self_generate(m, 6, 20, batch_size=4, seed=0, progress=False)
    b = self_generate(m, 6, 20, batch_size=4, seed=0, progress=False)
    c = self_generate(m, 6, 20, batch_size=4, seed=1, progress=False)
    assert a.shape == (6, 20) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not set(a[:, 0].tolist()) & {0, 1}  # first token: never BOS/EOS
    with torch.no_grad():
        greedy = m(input_ids=a).logits.argmax(-1)  # (n, T): the greedy choice after each prefix
    assert torch.equal(a[:, 1:4], greedy[:, 0:3])  # positions 1..3 are always greedy
    # a random tiny model is close to uniform: sampled positions rarely equal its argmax
    assert (a[:, 7:] == greedy[:, 6:-1]).float().mean().item() < 0.5


def test_text_sequences(ref10m_path, shared, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ref10m_path))
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "Once upon a time there was a model."}\n{"text": "It had one bit per weight."}\n')
    full = tok("Once upon a time there was a model.\n\nIt had one bit per weight.", return_tensors="pt")["input_ids"][0]
    seqs = text_sequences(tok, f, 4)
    assert seqs.shape == (full.numel() // 4, 4)
    assert torch.equal(seqs.reshape(-1), full[: seqs.numel()])
    with pytest.raises(BitnestError):
        text_sequences(tok, tmp_path / "missing.txt", 4)


def test_fsdp_refuses_mixed_dtypes_in_one_block():
    """FSDP2 asserts at the first forward when one group trains parameters of two dtypes; bitnest says so before
    sharding, naming them (e.g. fp32 training twins next to bf16 norms with train_norms)."""
    from torch import nn

    from bitnest.train.fsdp import _check_dtypes

    block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4).to(torch.bfloat16))
    with pytest.raises(BitnestError, match="bfloat16, float32"):
        _check_dtypes([block])
    block[1].weight.requires_grad_(False)
    block[1].bias.requires_grad_(False)
    _check_dtypes([block])  # frozen half-precision parameters are fine
