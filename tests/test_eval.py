"""Evaluation data loading, windowed perplexity and teacher agreement."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bitnest.errors import BitnestError
from bitnest.eval.data import load_eval_text, tokenize_eval_text
from bitnest.eval.perplexity import AgreementResult, PplResult, agreement, default_ctx, paired_interval, perplexity

CTX = 16
VOCAB = 64


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (7 * CTX + 5,), generator=g)  # 7 full windows + a 5-token tail


def _manual_nll(model, ids, ctx, n):
    with torch.inference_mode():
        x = ids[: n * ctx].view(n, ctx)
        logits = model(input_ids=x).logits.float()
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="mean").item()


def test_windows_drop_tail_and_count_tokens(tiny_model, ids):
    r = perplexity(tiny_model, ids, CTX, batch_size=3, progress=False)
    assert isinstance(r, PplResult)
    assert (r.windows, r.tokens, r.ctx, r.limited) == (7, 7 * (CTX - 1), CTX, False)
    assert r.nll == pytest.approx(_manual_nll(tiny_model, ids, CTX, 7), rel=1e-5)


def test_ppl_is_exp_nll(tiny_model, ids):
    r = perplexity(tiny_model, ids, CTX, progress=False)
    assert r.ppl == pytest.approx(math.exp(r.nll), rel=1e-12)
    assert math.log(VOCAB) * 0.5 < r.nll < math.log(VOCAB) * 2  # an untrained model is near uniform


def test_window_nlls_average_to_the_nll(tiny_model, ids):
    r = perplexity(tiny_model, ids, ctx=16, progress=False)
    assert len(r.window_nll) == r.windows
    assert sum(r.window_nll) / r.windows == pytest.approx(r.nll, rel=1e-9)


def test_paired_interval_separates_a_shift_from_noise():
    g = torch.Generator().manual_seed(0)
    base = (3 + torch.rand(200, generator=g)).tolist()           # hard and easy windows
    noisy = [b + 0.01 * (torch.rand(1, generator=g).item() - 0.5) for b in base]
    worse = [b + 0.02 for b in noisy]
    d, lo, hi = paired_interval(noisy, base)
    assert lo <= 0 <= hi and abs(d) < 0.002                       # the same model up to noise: inside
    d, lo, hi = paired_interval(worse, base)
    assert d == pytest.approx(0.02, abs=0.002) and lo > 0.015     # a real shift: outside, despite window spread
    with pytest.raises(BitnestError):
        paired_interval([1.0, 2.0], [1.0])


def test_limit_evaluates_exactly_n_windows(tiny_model, ids):
    r = perplexity(tiny_model, ids, CTX, batch_size=2, limit=3, progress=False)
    assert (r.windows, r.tokens, r.limited) == (3, 3 * (CTX - 1), True)
    assert r.nll == pytest.approx(_manual_nll(tiny_model, ids, CTX, 3), rel=1e-5)
    full = perplexity(tiny_model, ids, CTX, limit=100, progress=False)
    assert (full.windows, full.limited) == (7, False)


def test_batch_size_does_not_change_nll(tiny_model, ids):
    nlls = [perplexity(tiny_model, ids, CTX, batch_size=b, progress=False).nll for b in (1, 3, 8)]
    for nll in nlls[1:]:
        assert nll == pytest.approx(nlls[0], rel=1e-5)


def test_bad_inputs_raise(tiny_model, ids):
    with pytest.raises(BitnestError):
        perplexity(tiny_model, ids[: CTX - 1], CTX, progress=False)
    with pytest.raises(BitnestError):
        perplexity(tiny_model, ids.view(1, -1), CTX, progress=False)


def test_agreement_with_itself(tiny_model, ids):
    a = agreement(tiny_model, tiny_model, ids, CTX, batch_size=3, progress=False)
    assert isinstance(a, AgreementResult)
    assert a.tokens == 7 * (CTX - 1)
    assert abs(a.kl) < 1e-6
    assert a.top1 == 1.0


def test_agreement_with_perturbed_copy(tiny_model, ids):
    other = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std())
    a = agreement(other, tiny_model, ids, CTX, limit=4, progress=False)
    assert a.tokens == 4 * (CTX - 1)
    assert a.kl > 1e-4
    assert 0.0 <= a.top1 < 1.0


def test_default_ctx(tiny_model):
    assert default_ctx(tiny_model) == 64

    class Big:
        class config:
            max_position_embeddings = 4096

    assert default_ctx(Big()) == 2048


def test_tokenize_with_encode_only_tokenizer():
    class Llama2cTok:
        def encode(self, text, bos=True, eos=False):
            return ([1] if bos else []) + [ord(c) for c in text] + ([2] if eos else [])

    ids = tokenize_eval_text(Llama2cTok(), "ab")
    assert ids.dtype == torch.long and ids.tolist() == [1, 97, 98]


def test_tokenize_hf_adds_bos_once_and_is_quiet(caplog, ref10m_path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = ref10m_path
    if not (path / "tokenizer.json").is_file():
        pytest.skip("ref-10m not found")
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 8
    hf_logging.enable_propagation()
    try:
        ids = tokenize_eval_text(tok, "Hello world.\n\nHello again, world. " * 5)
    finally:
        hf_logging.disable_propagation()
    assert ids.dim() == 1 and ids.numel() > 8
    assert ids[0].item() == tok.bos_token_id and (ids == tok.bos_token_id).sum().item() == 1
    assert "longer than the specified maximum" not in caplog.text


def test_load_c4_heldout(shared):
    root = shared
    path = root / "data/c4_validation_sample/c4_validation_2k.jsonl"
    if not path.is_file():
        pytest.skip("C4 sample not found")
    rows = [json.loads(line)["text"] for line in path.open(encoding="utf-8")]
    text = load_eval_text("c4")
    assert text == "\n\n".join(rows[1800:2000])
    assert text.startswith(rows[1800]) and text.endswith(rows[1999])
    assert rows[1799] not in text


def test_load_wikitext2_gptq_join(shared):
    root = shared
    if not (root / "data/wikitext2_raw/wiki.test.raw").is_file():
        pytest.skip("WikiText-2 not found")
    text = load_eval_text("wikitext2")
    # HF rows: "", " = Robert Boulter = \n", "", " Robert Boulter is ...\n", ... joined by "\n\n".
    assert len(text) == 1_294_336
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert text.count("\n\n") > 4000


def test_load_user_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\n")
    assert load_eval_text(str(tmp_path / "a.txt")) == "line one\r\nline two\n"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert load_eval_text(str(tmp_path / "b.jsonl")) == "x\n\ny"
    (tmp_path / "bad.jsonl").write_text('{"url": "u"}\n')
    with pytest.raises(BitnestError):
        load_eval_text(str(tmp_path / "bad.jsonl"))


def test_unknown_dataset_raises(tmp_path):
    with pytest.raises(BitnestError, match="wikitext2"):
        load_eval_text("wikitext103")
    with pytest.raises(BitnestError):
        load_eval_text(str(tmp_path / "missing.txt"))


@pytest.mark.slow
def test_ref10m_c4_heldout_ppl(shared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = shared
    path = root / "models/ref-10m"
    if not path.is_dir() or not (root / "data/c4_validation_sample/c4_validation_2k.jsonl").is_file():
        pytest.skip("ref-10m or the C4 sample not found")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenize_eval_text(AutoTokenizer.from_pretrained(path), load_eval_text("c4"))
    r = perplexity(model, ids, ctx=256, progress=False)
    assert r.windows == ids.numel() // 256 and not r.limited
    assert r.ppl == pytest.approx(159.0, rel=0.02)
