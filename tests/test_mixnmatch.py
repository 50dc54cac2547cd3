"""Mix'n'Match: the paper's four layer-wise strategies give the right per-layer maps, mixes meet their budget,
the greedy search spends bits where they matter, and `bitnest slice --budget` writes the mix it reports."""
import copy
import json

import pytest
import torch

from bitnest.api import quantization_config, quantize
from bitnest.errors import BitnestError
from bitnest.eval.bits import bits_report
from bitnest.formats.checkpoint import load_quantized, save_quantized
from bitnest.mixnmatch import (apply_mix, layer_groups, mean_nll, mix_summary, priority, search_mix, strategy_bits,
                               strategy_mix)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest


def nested_tiny(layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    fp = LlamaForCausalLM(cfg).eval()
    return fp, quantize(copy.deepcopy(fp), "sliced", bits=8, targets="ffn", progress=False)


def trained_nested(layers=4):
    """A tiny Llama trained on x_{t+1} = π(x_t) (its FFNs matter), sliced-int8 on the FFN, and test tokens."""
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitnest.train import Batches, train
    V = 64
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
    fp = LlamaForCausalLM(cfg)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(5))
    x = torch.empty(160, 32, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (160,), generator=torch.Generator().manual_seed(0))
    for t in range(1, 32):
        x[:, t] = perm[x[:, t - 1]]
    ce = lambda m, b: F.cross_entropy(m(input_ids=b).logits[:, :-1].reshape(-1, V), b[:, 1:].reshape(-1))
    train(fp, Batches(x[:128], 16), ce, steps=120, lr=1e-2, warmup=10, progress=False)
    fp.eval()
    return quantize(copy.deepcopy(fp), "sliced", bits=8, targets="ffn", progress=False), x[128:]


def ffn_names(model):
    return [n for n, m in model.named_modules() if hasattr(m, "serve_bits") and ".mlp." in n]


def per_block(mix):
    return [int(x) for x in mix_summary(mix).split()]


def test_strategies_give_the_papers_layer_maps():
    counts = (2, 2, 2)  # 2 blocks at 8, 2 at 4, 2 at 2
    assert strategy_bits("pyramid", 6, counts) == [2, 4, 8, 8, 4, 2]
    assert strategy_bits("reverse_pyramid", 6, counts) == [8, 4, 2, 2, 4, 8]
    assert strategy_bits("increasing", 6, counts) == [2, 2, 4, 4, 8, 8]
    assert strategy_bits("decreasing", 6, counts) == [8, 8, 4, 4, 2, 2]
    assert strategy_bits("pyramid", 5, (1, 2, 2)) == [2, 4, 8, 4, 2]
    assert strategy_bits("reverse_pyramid", 5, (2, 2, 1)) == [8, 4, 2, 4, 8]
    assert sorted(priority("pyramid", 10)[:2]) == [4, 5]
    with pytest.raises(BitnestError):
        priority("zigzag", 4)
    with pytest.raises(BitnestError):
        strategy_bits("pyramid", 6, (3, 3, 1))


def test_layer_groups_follow_depth():
    names = ["model.layers.10.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
    assert layer_groups(names) == [["model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"],
                                   ["model.layers.10.mlp.up_proj"]]


@pytest.mark.parametrize("strategy", ["pyramid", "reverse_pyramid", "increasing", "decreasing"])
def test_strategy_mix_meets_the_budget_with_the_most_bits(strategy):
    _, model = nested_tiny(layers=6)
    names = ffn_names(model)
    mix = strategy_mix(model, strategy, budget=4.5)
    apply_mix(model, mix)
    bpw = bits_report(model, only=names).bits_per_weight
    assert bpw <= 4.5
    widths = per_block(mix)
    assert widths == strategy_bits(strategy, 6, (widths.count(8), widths.count(4), widths.count(2)))
    # no other split of the same strategy fits the budget with more bits
    for n8 in range(7):
        for n4 in range(7 - n8):
            w = strategy_bits(strategy, 6, (n8, n4, 6 - n8 - n4))
            apply_mix(model, {n: w[i] for i, g in enumerate(layer_groups(names)) for n in g})
            b = bits_report(model, only=names).bits_per_weight
            assert b > 4.5 or b <= bpw + 1e-12
    with pytest.raises(BitnestError, match="fits the budget"):
        strategy_mix(model, strategy, budget=1.5)


def test_search_meets_its_budget_and_finds_the_best_mix():
    """A trained 4-block model whose block 0 FFN output is scaled by 5 and the others' by 0.05 (so block 0's
    quantization error matters most). For three budgets the greedy search meets the budget, keeps block 0 at
    the highest width of its mix, and finds the mix with the lowest NLL among all 3^4 mixes that fit — so it
    is at least as good as every strategy."""
    import itertools
    model, ids = trained_nested(layers=4)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.scale.mul_(5.0 if i == 0 else 0.05)  # scales the dequantized weight and its error
    names = ffn_names(model)
    groups = layer_groups(names)
    every = []
    for w in itertools.product((8, 4, 2), repeat=4):
        apply_mix(model, {n: w[i] for i, g in enumerate(groups) for n in g})
        every.append((bits_report(model, only=names).bits_per_weight, mean_nll(model, ids), w))
    for budget in (3.5, 4.25, 5.25):
        best = min((e for e in every if e[0] <= budget), key=lambda e: e[1])
        for lazy in ((True, False) if budget == 4.25 else (True,)):
            apply_mix(model, {n: 8 for n in names})
            mix, path = search_mix(model, ids, budget, levels=(8, 4, 2), lazy=lazy, progress=False)
            bpw = bits_report(model, only=names).bits_per_weight
            nll = mean_nll(model, ids)
            assert bpw <= budget and path[-1]["nll"] == pytest.approx(nll)
            assert [p["bits"] for p in path] == sorted((p["bits"] for p in path), reverse=True)
            assert nll == pytest.approx(best[1], abs=1e-9), (budget, lazy, per_block(mix), best)
            widths = per_block(mix)
            assert widths[0] == max(widths)
        for strategy in ("pyramid", "reverse_pyramid", "increasing", "decreasing"):
            apply_mix(model, strategy_mix(model, strategy, budget))
            assert mean_nll(model, ids) >= best[1] - 1e-9
    # budget already met: nothing to lower; impossible budget: one-line error
    apply_mix(model, {n: 8 for n in names})
    mix, path = search_mix(model, ids, 9.0, progress=False)
    assert set(mix.values()) == {8} and len(path) == 1
    with pytest.raises(BitnestError, match="cannot be met"):
        search_mix(model, ids, 2.0, levels=(8, 4, 2), progress=False)


def test_overrides_at_load_equal_the_in_memory_mix(tmp_path):
    fp, model = nested_tiny(layers=4)
    save_quantized(model, None, tmp_path / "n", quantization_config("sliced", model.bitnest_method[1], "tiny"),
                   storage_dtype=torch.float32)
    mix = strategy_mix(model, "pyramid", budget=4.0)
    apply_mix(model, mix)
    loaded = load_quantized(tmp_path / "n", overrides=mix).model
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert {n: loaded.get_submodule(n).serve_bits for n in mix} == mix


def test_cli_slice_budget_writes_the_mix(tiny_llama_dir, tmp_path, capsys, shared):
    from bitnest.cli import main
    ck = tmp_path / "int8"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--method", "sliced", "--bits", "8", "--targets", "ffn",
                 "--out", str(ck), "--no-progress"]) == 0
    for extra in (["--levels", "8,4,2"], ["--strategy", "pyramid"], ["--strategy", "evo", "--levels", "8,4,2"]):
        out = tmp_path / ("mix" + "".join(extra))
        assert main(["slice", "--model", str(ck), "--budget", "3.5", "--calib-samples", "2", "--out", str(out),
                     "--no-progress"] + extra) == 0, capsys.readouterr().err
        msg = capsys.readouterr().out
        assert "bits per FFN weight" in msg
        assert main(["info", "--model", str(out), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        loaded = load_quantized(out).model
        names = list(info["layers"])
        assert bits_report(loaded, only=names).bits_per_weight <= 3.5
        widths = {lc["bits"] for lc in info["layers"].values()}
        assert len(widths) > 1 and all(lc["stored_bits"] == lc["bits"] for lc in info["layers"].values())
    assert main(["slice", "--model", str(ck), "--strategy", "pyramid", "--out", str(tmp_path / "x")]) == 2
    assert "--budget" in capsys.readouterr().err


def test_evolutionary_search_finds_the_best_mix_by_kl():
    """The same skewed 4-block model: for two budgets the evolutionary search meets the budget, its KL never rises
    over the generations, and it finds the mix of lowest KL to the widest slice among all 3^4 that fit; per-layer
    units meet the budget too; the same seed gives the same mix."""
    import itertools
    from bitnest.mixnmatch import _logprobs, evo_mix, kl_to
    model, ids = trained_nested(layers=4)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.scale.mul_(5.0 if i == 0 else 0.05)
    names = ffn_names(model)
    groups = layer_groups(names)
    apply_mix(model, {n: 8 for n in names})
    teacher = _logprobs(model, ids)
    every = []
    for w in itertools.product((8, 4, 2), repeat=4):
        apply_mix(model, {n: w[i] for i, g in enumerate(groups) for n in g})
        every.append((bits_report(model, only=names).bits_per_weight, kl_to(teacher, model, ids), w))
    for budget in (3.5, 4.25):
        best = min((e for e in every if e[0] <= budget), key=lambda e: e[1])
        mix, path = evo_mix(model, ids, budget, levels=(8, 4, 2), generations=15, offspring=6, progress=False)
        assert bits_report(model, only=names).bits_per_weight <= budget
        kls = [p["kl"] for p in path]
        assert kls == sorted(kls, reverse=True)
        assert kls[-1] == pytest.approx(best[1], abs=1e-7), (budget, per_block(mix), best)
    again, _ = evo_mix(model, ids, 4.25, levels=(8, 4, 2), generations=15, offspring=6, progress=False)
    assert again == mix
    mix, path = evo_mix(model, ids, 4.25, levels=(8, 4, 2), per_layer=True, generations=5, offspring=4, progress=False)
    assert bits_report(model, only=names).bits_per_weight <= 4.25 and len(set(mix.values())) >= 2
    greedy, _ = search_mix(model, ids, 3.5, levels=(8, 4, 2), progress=False)
    mix, path = evo_mix(model, ids, 3.5, levels=(8, 4, 2), init="greedy", generations=3, offspring=4, progress=False)
    apply_mix(model, greedy)
    assert path[0]["kl"] == pytest.approx(kl_to(teacher, model, ids)) and path[-1]["kl"] <= path[0]["kl"]
    with pytest.raises(BitnestError, match="cannot be met"):
        evo_mix(model, ids, 2.0, levels=(8, 4, 2), progress=False)
