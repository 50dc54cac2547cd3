"""Zero-shot tasks (bitnest.eval.tasks): the local files parse into lm-eval's prompts, the batched scorer equals a
one-sequence-at-a-time computation, the metrics and bootstrap errors are what they claim, the CLI refuses bad
input, and (where lm-eval installs) our log-likelihoods equal lm-eval's HFLM on the same requests."""
import json
import math

import pytest
import torch

from bitnest.errors import BitnestError
from bitnest.eval.tasks import (TASKS, Item, encode_pair, evaluate_tasks, load_task, loglikelihoods, parse_tasks,
                                score_items)

SIZES = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1171, "boolq": 3270, "winogrande": 1267, "lambada": 5153,
         "openbookqa": 500, "copa": 100, "hellaswag": 10042}


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_parses_with_its_published_size(shared, name):
    items = load_task(name)
    assert len(items) == SIZES[name]
    for it in items:
        assert len(it.contexts) == len(it.continuations) >= 1 and 0 <= it.gold < len(it.continuations)
        assert all(c.startswith(" ") for c in it.continuations)  # lm-eval keeps the data as is (PIQA has "  …")
        assert all(x for x in it.contexts)


def test_prompts_follow_lm_eval(shared):
    arc = load_task("arc_easy", limit=1)[0]
    assert arc.contexts[0].startswith("Question: ") and arc.contexts[0].endswith("\nAnswer:")
    assert arc.continuations[0] == " " + arc.choices[0]
    boolq = load_task("boolq", limit=1)[0]
    assert not boolq.contexts[0].startswith("Passage:") and boolq.contexts[0].endswith("?\nAnswer:")
    assert boolq.continuations == [" no", " yes"]
    copa = load_task("copa", limit=3)
    assert copa[0].contexts[0] == "The man turned on the faucet, therefore"
    assert copa[0].continuations[1] == " Water flowed from the spout."
    piqa = load_task("piqa", limit=1)[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:" and piqa.gold == 0
    wino = load_task("winogrande", limit=1)[0]
    assert wino.contexts[0].endswith("so Sarah") and wino.contexts[1].endswith("so Maria") and wino.gold == 1
    assert wino.continuations == [" always got the easier cases."] * 2
    lam = load_task("lambada", limit=1)[0]
    assert lam.continuations == [" signs"] and not lam.contexts[0].endswith(" ")


def test_data_dir_may_be_the_data_folder_itself(shared):
    assert len(load_task("copa", data_dir=shared / "data")) == 100
    assert len(load_task("copa", data_dir=shared)) == 100


def test_bad_task_names_are_one_line_errors():
    for bad in ("pika", "", "piqa,nope"):
        with pytest.raises(BitnestError) as e:
            parse_tasks(bad)
        assert "\n" not in str(e.value)
    assert parse_tasks("default")[0] == "piqa" and "hellaswag" in parse_tasks("all")


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding():
    enc = lambda s: [ord(c) for c in s.replace("ab", "\x01")]  # noqa: E731  a "tokenizer" with one merge
    assert encode_pair(enc, "xa ", "b") == ([ord("x"), ord("a")], [ord(" "), ord("b")])
    # a merge across the boundary: the context's tokens are a prefix only up to the merge, as in lm-eval
    ctx, cont = encode_pair(enc, "xa", "by")
    assert ctx == [ord("x"), ord("a")] and cont == [ord("y")]


@pytest.fixture(scope="module")
def ref10m(ref10m_path):
    from bitnest.models.hf import load_model
    return load_model(ref10m_path)


def test_batched_scores_equal_one_at_a_time(ref10m, shared, one_thread):
    model, tok = ref10m.model, ref10m.tokenizer
    items = load_task("arc_easy", limit=3) + load_task("winogrande", limit=2)
    pairs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
    batched = loglikelihoods(model, tok, pairs, max_length=256, batch_size=7, progress=False)
    for (ctx, cont), (ll, greedy) in zip(pairs, batched):
        c, k = encode_pair(lambda s: tok(s)["input_ids"], ctx, cont)
        seq = torch.tensor([c + k])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq).logits[0, :-1].float(), -1)  # (T-1, V)
        tgt = seq[0, len(c):]
        want = lp[len(c) - 1:].gather(1, tgt[:, None]).sum()
        assert ll == pytest.approx(float(want), abs=2e-4)
        assert greedy == bool((lp[len(c) - 1:].argmax(-1) == tgt).all())


def test_metrics_and_bootstrap_errors():
    items = [Item(["q"] * 2, [" a", " bbbb"], g, ["a", "bbbb"]) for g in [0] * 300 + [1] * 100]
    # choice 0 has the higher sum (-2 > -3), choice 1 the higher per-character score (-3/4 > -2/1)
    res = [r for _ in items for r in ((-2.0, False), (-3.0, True))]
    out = score_items(items, res, ("acc", "acc_norm"))
    assert out["acc"] == 0.75 and out["acc_norm"] == 0.25 and out["n"] == 400
    assert out["acc_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 400), rel=0.15)
    assert out["acc_norm_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 400), rel=0.15)
    lam = [Item(["c"], [" w"], 0, ["w"]) for _ in range(100)]
    out = score_items(lam, [(-math.log(4), i % 4 == 0) for i in range(100)], ("acc", "ppl"))
    assert out["ppl"] == pytest.approx(4.0) and out["acc"] == 0.25 and out["ppl_stderr"] < 1e-9


def test_ref10m_scores_its_training_text_far_above_chance(ref10m, shared, one_thread):
    """The scorer sees what a real LM knows: ref-10m was trained on HellaSwag's gold endings, so it picks them far
    above chance (0.25); on unseen tasks this 10M model is near chance (BENCHMARKS.md), and the errors are sized
    as the binomial's."""
    res = evaluate_tasks(ref10m.model, ref10m.tokenizer, "hellaswag", limit=300, ctx=256, progress=False)["hellaswag"]
    assert res["acc_norm"] > 0.25 + 4 * res["acc_norm_stderr"]
    p = res["acc_norm"]
    assert res["acc_norm_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 300), rel=0.2)


def test_cli_eval_tasks(ref10m_path, capsys):
    from bitnest.cli import main
    assert main(["eval", "--model", str(ref10m_path), "--tasks", "copa", "--limit", "20", "--ctx", "256", "--json",
                 "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"]["copa"]["n"] == 20 and 0 <= out["tasks"]["copa"]["acc"] <= 1
    assert main(["eval", "--model", str(ref10m_path), "--tasks", "copa,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitnest: error:") and err.count("\n") == 1


def test_scores_match_lm_eval(ref10m_path, shared, one_thread):
    """lm-eval's own HFLM, same requests: equal log-likelihoods and greedy flags (skipped where it is absent)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from bitnest.models.hf import load_model
    lm = HFLM(pretrained=str(ref10m_path), dtype="float32", batch_size=4, max_length=256, device="cpu")
    loaded = load_model(ref10m_path)
    items = load_task("piqa", limit=2) + load_task("copa", limit=2) + load_task("lambada", limit=2) + \
        load_task("winogrande", limit=2)
    pairs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    ours = loglikelihoods(loaded.model, loaded.tokenizer, pairs, max_length=256, progress=False)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
    assert lm_eval is not None


def test_lm_eval_adapter_serves_a_matryoshka_checkpoint(ref10m_path, shared, tmp_path, one_thread):
    """`--model bitnest` (lm-eval's HFLM through transformers' from_pretrained) at bits=4 scores what bitnest's
    own loader at 4 bits scores (skipped where lm-eval is absent)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from bitnest.cli import main
    from bitnest.integrations.lm_eval import BitnestLM
    from bitnest.models.hf import load_model
    ck = tmp_path / "s8"
    assert main(["quantize", "--model", str(ref10m_path), "--method", "sliced", "--out", str(ck), "--no-progress"]) == 0
    lm = BitnestLM(pretrained=str(ck), bits="4", dtype="float32", batch_size=4, max_length=256, device="cpu")
    assert lm.model.precision()["bits"] == 4
    pairs = [(c, k) for it in load_task("copa", limit=3) for c, k in zip(it.contexts, it.continuations)]
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    loaded = load_model(ck, bits=4)
    ours = loglikelihoods(loaded.model, loaded.tokenizer, pairs, max_length=256, progress=False)
    assert [round(a, 3) for a, _ in ours] == [round(b, 3) for b, _ in theirs]
