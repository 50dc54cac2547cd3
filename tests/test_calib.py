"""The calibration driver: captured block inputs are exact, quantized outputs propagate, Hessians are 2XᵀX/n,
true-sequential groups follow the data flow, calibration data never touches the held-out C4 rows."""
import pytest
import torch
from torch import nn

from bitnest.calib.data import C4_TRAIN, CalibOptions, calibration_tokens, text_windows
from bitnest.calib.driver import BlockRunner, Hessian, blockwise, capture_block_inputs
from bitnest.grids.affine import AffineSpec
from bitnest.models.blocks import get_blocks, replace_module
from bitnest.nn.qlinear import QuantLinear


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def block_outputs(model, ids):
    """Every block's output in one ordinary forward pass, via forward hooks."""
    blocks = model.model.layers  # (get_blocks looks for nn.Linear, which a quantized model no longer has)
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)) for b in blocks]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return outs


def test_captured_inputs_reproduce_the_forward(tiny):
    ids = torch.randint(0, 128, (6, 16))
    _, blocks = get_blocks(tiny)
    inps, kws = capture_block_inputs(tiny, blocks[0], ids, batch_size=4)
    assert [x.shape for x in inps] == [(4, 16, 32), (2, 16, 32)]
    assert "position_embeddings" in kws[0]  # HF Llama passes RoPE cos/sin as a keyword
    with torch.no_grad():
        out = torch.cat(BlockRunner(blocks[0], inps, kws).forward())
    assert torch.equal(out, block_outputs(tiny, ids)[0])


def test_quantized_outputs_propagate(tiny):
    """Each block is calibrated on the outputs of the already-quantized blocks before it."""
    import copy
    model = copy.deepcopy(tiny)
    ids = torch.randint(0, 128, (4, 16))
    seen = {}

    def process(prefix, block, runner):
        seen[prefix] = torch.cat(runner.inps)
        for n, m in list(block.named_modules()):
            if isinstance(m, nn.Linear):
                replace_module(block, n, QuantLinear.from_linear(m, AffineSpec(2, 16)))

    last = blockwise(model, ids, process, batch_size=4, progress=False)
    ref = block_outputs(model, ids)  # the fully quantized model, run normally
    assert torch.allclose(seen["model.layers.1"], ref[0], atol=1e-5)
    assert torch.allclose(seen["model.layers.2"], ref[1], atol=1e-5)
    assert torch.allclose(torch.cat(last), ref[2], atol=1e-5)
    assert not torch.allclose(ref[2], block_outputs(tiny, ids)[2], atol=1e-2)  # quantization did change them


def test_collect_sees_the_true_inputs_and_groups_follow_the_data(tiny):
    ids = torch.randint(0, 128, (4, 16))
    _, blocks = get_blocks(tiny)
    inps, kws = capture_block_inputs(tiny, blocks[0], ids, batch_size=2)
    runner = BlockRunner(blocks[0], inps, kws)
    names = [n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)]
    assert runner.groups(names) == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                     ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    got, full = [], []
    runner.collect({blocks[0].mlp.down_proj: got.append})  # early exit happens after down_proj's input
    h = blocks[0].mlp.down_proj.register_forward_hook(lambda m, a, o: full.append(a[0]))
    with torch.no_grad():
        runner.forward()
    h.remove()
    assert all(torch.equal(a, b) for a, b in zip(got, full)) and len(got) == 2


def test_hessian_running_average():
    X = torch.randn(3, 50, 16)
    acc = Hessian(16)
    for x in X:
        acc.add(x)
    Xf = X.reshape(-1, 16)
    assert torch.allclose(acc.H, 2 * Xf.T @ Xf / len(Xf), rtol=1e-5, atol=1e-5) and acc.n == 150


def test_c4_calibration_rows_exclude_held_out(shared, ref10m_path):
    from bitnest.eval.data import C4_HELDOUT
    from bitnest.models.hf import load_model
    assert C4_TRAIN.stop <= C4_HELDOUT.start
    loaded = load_model(ref10m_path)
    t = calibration_tokens(loaded.model, CalibOptions(n_calib=4, calib_len=64, seed=1))  # auto -> c4 via the tokenizer
    assert t.shape == (4, 64) and t.dtype == torch.long and int(t.max()) < 8192
    assert torch.equal(t, calibration_tokens(loaded.model, CalibOptions(n_calib=4, calib_len=64, seed=1, calib_data="c4")))
    assert not torch.equal(t, calibration_tokens(loaded.model, CalibOptions(n_calib=4, calib_len=64, seed=2)))


def test_text_windows_and_generation(tiny):
    class Tok:
        def encode(self, text, bos=True, eos=False):
            return [0] + [ord(c) % 100 for c in text]
    w = text_windows(Tok(), ["abc" * 50, "xyz" * 50], n=3, seq=40)
    assert w.shape == (3, 40)
    with pytest.raises(Exception, match="fewer than"):
        text_windows(Tok(), ["ab"], n=3, seq=40)
    g = calibration_tokens(tiny, CalibOptions(calib_data="generate", n_calib=3, calib_len=8))
    assert g.shape == (3, 8) and int(g.max()) < 128
    assert CalibOptions(calib_data="self").calib_data == "generate"  # the name for it
    assert torch.equal(g, calibration_tokens(tiny, CalibOptions(calib_data="self", n_calib=3, calib_len=8)))


def test_calibration_from_any_text_or_jsonl(tmp_path, ref10m_path):
    """A .txt file and a .jsonl file ("text" fields) calibrate; a file that is neither is a one-line error."""
    import json
    from bitnest.errors import BitnestError
    from bitnest.models.hf import load_model
    loaded = load_model(ref10m_path)
    doc = "The committee met on Tuesday to discuss the budget for the coming year. " * 40
    (tmp_path / "t.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": doc}) for _ in range(2)), encoding="utf-8")
    for f in ("t.txt", "t.jsonl"):
        t = calibration_tokens(loaded.model, CalibOptions(calib_data=str(tmp_path / f), n_calib=2, calib_len=64))
        assert t.shape == (2, 64) and int(t.max()) < 8192
    with pytest.raises(BitnestError, match="not auto, c4, self"):
        calibration_tokens(loaded.model, CalibOptions(calib_data=str(tmp_path / "missing.txt"), n_calib=2))


def test_allocate_bits_meets_budget_and_narrows_the_least_sensitive():
    from bitnest.calib.sensitivity import allocate_bits, as_overrides
    from bitnest.methods.rtn import RTNConfig
    sens = {"a": {2: 5.0, 4: 0.1}, "b": {2: 0.5, 4: 0.1}, "c": {2: 0.3, 4: 0.0}}
    cost = {n: {2: 200, 4: 400} for n in sens}
    sizes = {n: 100 for n in sens}
    bits = allocate_bits(sens, cost, sizes, budget=3.0)  # room for one layer at 4 bits
    assert bits == {"a": 4, "b": 2, "c": 2}
    assert allocate_bits(sens, cost, sizes, budget=4.0) == {"a": 4, "b": 4, "c": 4}
    with pytest.raises(Exception, match="below the narrowest"):
        allocate_bits(sens, cost, sizes, budget=1.5)
    default, overrides = as_overrides(bits)
    assert (default, overrides) == (2, (("a", 4),))
    cfg = RTNConfig(bits=default, overrides=overrides)  # the overrides format QuantConfig takes
    assert [cfg.bits_for(n) for n in "abc"] == [4, 2, 2]


def test_mixed_gives_the_sensitive_layer_more_bits(tiny):
    import copy
    from bitnest.api import quantize
    from bitnest.eval.bits import bits_report
    model = copy.deepcopy(tiny)
    v = model.model.layers[1].self_attn.v_proj.weight
    v.data[:, 0] *= 40  # an outlier input column: 2-bit per-channel RTN wipes out the rest of each row
    quantize(model, "mixed", budget=3.2, candidates=(2, 4), calib=torch.randint(0, 128, (2, 16)),
             progress=False)
    default, overrides = model.bitnest_allocation
    chosen = {n: m.bits for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert chosen["model.layers.1.self_attn.v_proj"] == 4 and set(chosen.values()) == {2, 4}
    assert sum(b == 4 for b in chosen.values()) <= len(chosen) // 4  # few layers fit at 4 bits: it was chosen
    assert bits_report(model).bits_per_weight <= 3.2  # (2-bit per channel is 3 bits/weight at width 32)
    assert all(chosen[n] == b for n, b in overrides) and sum(b == default for b in chosen.values()) >= len(chosen) / 2
