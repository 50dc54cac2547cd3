"""Hostile files and faults (issue 15, item 4): each bad input is a one-line `bitnest: error:` (a BitnestError
from the Python loaders, exit 2 from the CLI) — never a traceback, a hang, or a silently wrong model.

Every checkpoint here is the tiny random Llama of conftest quantized (RTN 4-bit groups of 32, or sliced int8
served at 4) and then damaged; the fuzz tests at the end mutate it with hypothesis (bounded examples)."""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from bitnest.cli import main
from bitnest.errors import BitnestError
from bitnest.models.hf import load_model

UP = "model.layers.0.mlp.up_proj"  # 64 → 128 in the tiny Llama
# bounded for CI (all fuzz tests together ≈ 25 s on 2 cores); BITNEST_FUZZ_EXAMPLES=500 for a longer hunt
FUZZ = settings(max_examples=int(os.environ.get("BITNEST_FUZZ_EXAMPLES", 40)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line(code, err, *needles):
    assert code == 2 and err.startswith("bitnest: error:") and err.count("\n") == 1, (code, err)
    for n in needles:
        assert n in err, (n, err)


def variant(src: Path, dst: Path, cfg=None, state=None) -> Path:
    """A copy of checkpoint `src` at `dst`; `cfg(config_dict)` / `state(tensors)` edit it in place."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    if cfg is not None:
        c = json.loads((dst / "config.json").read_text())
        cfg(c)
        (dst / "config.json").write_text(json.dumps(c))
    if state is not None:
        sd = load_file(dst / "model.safetensors")
        state(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def mods(c):
    return c["quantization_config"]["modules"]


@pytest.fixture(scope="module")
def ck(tiny_llama_dir, tmp_path_factory):
    """Checkpoints of the tiny Llama: rtn4 (4-bit, groups of 32, asymmetric), sliced (int8 codes served at 4)."""
    d = tmp_path_factory.mktemp("hostile")
    out = {"fp": tiny_llama_dir}
    for name, argv in (("rtn4", ["--method", "rtn", "--bits", "4", "--group-size", "32"]),
                       ("sliced", ["--method", "sliced", "--bits", "4"])):
        assert main(["quantize", "--model", str(tiny_llama_dir), *argv, "--out", str(d / name), "--no-progress"]) == 0
        out[name] = d / name
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "eval.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    return f


# ------------------------------------------------------------------------- 1. tensors vs quantization_config


@pytest.mark.parametrize("case,edit,needles", [
    ("bits8_in_config", dict(cfg=lambda c: mods(c)[UP].update(bits=8, parent_bits=8, serve_bits=8)),
     [f"{UP}.qweight", "uint8 [128, 32]", "[128, 64]", "8-bit"]),
    ("group64_in_config", dict(cfg=lambda c: mods(c)[UP].update(group_size=64)),
     [f"{UP}.scale", "[128, 2]", "[128, 1]", "group 64"]),
    ("truncated_qweight", dict(state=lambda sd: sd.__setitem__(f"{UP}.qweight", sd[f"{UP}.qweight"][:, :7].contiguous())),
     [f"{UP}.qweight", "[128, 7]", "[128, 32]"]),
    ("scale_wrong_shape", dict(state=lambda sd: sd.__setitem__(f"{UP}.scale", sd[f"{UP}.scale"][:5].contiguous())),
     [f"{UP}.scale", "[5, 2]", "[128, 2]"]),
    ("qweight_int8", dict(state=lambda sd: sd.__setitem__(f"{UP}.qweight", sd[f"{UP}.qweight"].view(torch.int8))),
     [f"{UP}.qweight", "int8", "needs uint8"]),
])
def test_tensor_disagreeing_with_config_is_named(capsys, ck, tmp_path, case, edit, needles):
    bad = variant(ck["rtn4"], tmp_path / case, **edit)
    with pytest.raises(BitnestError) as e:
        load_model(bad)
    assert "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    code, _, err = run(capsys, "eval", "--model", bad, "--data", "wikitext2", "--no-progress")
    one_line(code, err, f"tensor {UP}.")


def test_parent_bits_below_stored_codes(capsys, ck, tmp_path):
    bad = variant(ck["sliced"], tmp_path / "p7", cfg=lambda c: mods(c)[UP].update(parent_bits=7))
    code, _, err = run(capsys, "info", "--model", bad)
    one_line(code, err, UP, "parent_bits 7", "8 bits")
    with pytest.raises(BitnestError, match="parent_bits 7"):
        load_model(bad, bits=8)


@pytest.fixture(scope="module")
def intonly(shared, tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("intonly") / "io"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--method", "intonly", "-o", "n_calib=2",
                 "-o", "calib_len=32", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("k", [0, -3, 100])
def test_integer_requantization_constants_out_of_range(intonly, tmp_path, k):
    def edit(sd):
        sd[f"{UP}.k"][3] = k
    with pytest.raises(BitnestError, match=f"{UP} holds shift k outside 1..62"):
        load_model(variant(intonly, tmp_path / "k", state=edit))


# ------------------------------------------------------------------------- 2. silently wrong results


def test_fp_weight_stored_as_int32_is_refused(capsys, ck, tmp_path):
    k = f"{UP}.weight"
    bad = variant(ck["fp"], tmp_path / "int32", state=lambda sd: sd.__setitem__(k, (sd[k] * 100).to(torch.int32)))
    code, _, err = run(capsys, "quantize", "--model", bad, "--out", tmp_path / "out", "--no-progress")
    one_line(code, err, k, "I32", "float")
    assert not (tmp_path / "out").exists()


def test_fp_shape_mismatch_names_the_tensor(capsys, ck, tmp_path):
    k = f"{UP}.weight"
    bad = variant(ck["fp"], tmp_path / "shape", state=lambda sd: sd.__setitem__(k, sd[k][:, :32].contiguous()))
    code, _, err = run(capsys, "quantize", "--model", bad, "--out", tmp_path / "out", "--no-progress")
    one_line(code, err, k, "[128, 32]", "[128, 64]")
    assert "above report" not in err


def test_fp_missing_or_extra_weights_are_refused(ck, tmp_path):
    k = f"{UP}.weight"
    with pytest.raises(BitnestError, match="lacks 1 weight"):  # transformers would fill it with random values
        load_model(variant(ck["fp"], tmp_path / "miss", state=lambda sd: sd.pop(k)))
    with pytest.raises(BitnestError, match="num_hidden_layers=1"):  # transformers would drop layer 1
        load_model(variant(ck["fp"], tmp_path / "fewer", cfg=lambda c: c.update(num_hidden_layers=1)))


def test_info_shows_the_layers_and_flags_a_disagreeing_recipe(capsys, ck, tmp_path):
    # The per-layer entries are what loads (and what the tensors are checked against); the top-level `config`
    # only records what the method was asked for, and a slice legitimately keeps its parent's. So a disagreement
    # is not a load error: `info` shows the layers' truth and says the recorded recipe disagrees.
    bad = variant(ck["rtn4"], tmp_path / "cfg2", cfg=lambda c: c["quantization_config"]["config"].update(bits=2))
    code, out, _ = run(capsys, "info", "--model", bad)
    assert code == 0 and "layers: serve int4, store int4, group 32" in out
    assert "warning: the recorded recipe disagrees" in out and "bits=2" in out
    code, out, _ = run(capsys, "info", "--model", bad, "--json")
    info = json.loads(out)
    assert info["stored"]["served"] == [4] and info["config_mismatch"] and "bits=2" in info["config_mismatch"][0]
    code, out, _ = run(capsys, "info", "--model", ck["rtn4"], "--json")
    assert json.loads(out)["config_mismatch"] == []


def test_ctx_zero_and_beyond_positions_are_errors(capsys, shared, ck, text_file):
    code, _, err = run(capsys, "eval", "--model", ck["fp"], "--data", text_file, "--ctx", "0", "--no-progress")
    one_line(code, err, "ctx", "at least 2")
    code, _, err = run(capsys, "eval", "--model", ck["fp"], "--data", text_file, "--ctx", "256", "--no-progress",
                       "--limit", "1")
    one_line(code, err, "ctx 256", "128 positions", "max_position_embeddings")
    from bitnest.eval.report import evaluate
    loaded = load_model(ck["fp"])
    with pytest.raises(BitnestError, match="at least 2"):
        evaluate(loaded.model, loaded.tokenizer, str(text_file), ctx=0, progress=False)


# ------------------------------------------------------------------------- 3. encodings, unwritable --out


def test_eval_text_not_utf8_names_the_file(capsys, shared, ck, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café, naïve, über ".encode("latin-1") * 100)
    code, _, err = run(capsys, "eval", "--model", ck["fp"], "--data", bad, "--ctx", "16", "--no-progress")
    one_line(code, err, str(bad), "not UTF-8")
    from bitnest.train.data import read_text
    with pytest.raises(BitnestError, match="not UTF-8"):
        read_text(bad)


@pytest.mark.parametrize("method", ["rtn", "onebit"])
def test_unwritable_out_is_found_before_any_work(capsys, ck, tmp_path, monkeypatch, method):
    import bitnest.commands as commands

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(commands, "load_model", no_work)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run(capsys, "quantize", "--model", ck["fp"], "--method", method, "--out", blocker / "sub" / "out",
                       "--no-progress")
    one_line(code, err, "cannot write", "not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_directory_is_found_before_any_work(capsys, ck, tmp_path, monkeypatch):
    import bitnest.commands as commands
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("loaded before checking --out"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run(capsys, "quantize", "--model", ck["fp"], "--out", ro / "out", "--no-progress")
    finally:
        ro.chmod(0o700)
    one_line(code, err, "cannot write", "not writable")


# ------------------------------------------------------------------------- 4. --overwrite and stale temporaries


def test_overwrite_refuses_a_directory_with_unrelated_files(capsys, ck, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("my notes")
    code, _, err = run(capsys, "quantize", "--model", ck["fp"], "--out", out, "--overwrite", "--no-progress")
    one_line(code, err, "notes.txt", "not a checkpoint file")
    assert (out / "notes.txt").read_text() == "my notes"


def test_overwrite_replaces_a_checkpoint_and_a_file_leaving_nothing(capsys, ck, tmp_path):
    out = tmp_path / "ck"
    shutil.copytree(ck["rtn4"], out)
    code, _, _ = run(capsys, "quantize", "--model", ck["fp"], "--bits", "8", "--out", out, "--overwrite", "--no-progress")
    assert code == 0 and json.loads((out / "config.json").read_text())["quantization_config"]["config"]["bits"] == 8
    f = tmp_path / "file"
    f.write_text("old")
    code, _, _ = run(capsys, "quantize", "--model", ck["fp"], "--out", f, "--overwrite", "--no-progress")
    assert code == 0 and (f / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "file"]  # no .NAME.old-PID / .NAME.tmp-* left


def test_stale_temporaries_of_dead_writers_are_removed(capsys, ck, tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead, live = p.pid, os.getppid()
    for name in (f".out.tmp-{dead}-k3j2", f".out.old-{dead}", f".out.tmp-{live}-busy"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".out.tmp-{dead}").write_bytes(b"a killed gguf export")
    code, _, _ = run(capsys, "quantize", "--model", ck["fp"], "--out", tmp_path / "out", "--no-progress")
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{live}-busy", "out"]  # a live writer's stays


# ------------------------------------------------------------------------- 5. resuming a changed recipe


def _tiny_lm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


class _WeightedCE:
    def __init__(self, lam):
        self.lam = lam

    def __call__(self, model, ids):
        logits = model(input_ids=ids).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return {"loss": self.lam * ce, "ce": ce}


@pytest.mark.parametrize("change,needle", [
    (dict(batch=2), "batch 3 → 2"), (dict(seed=6), "seed 5 → 6"), (dict(lam=0.5), "_WeightedCE.lam 1.0 → 0.5"),
    (dict(clip=0.5), "clip 1.0 → 0.5"),
])
def test_resume_refuses_a_changed_recipe(tmp_path, change, needle):
    from bitnest.train.data import Batches
    from bitnest.train.loop import train

    data = torch.randint(0, 64, (12, 8), generator=torch.Generator().manual_seed(0))

    def go(batch=3, seed=5, lam=1.0, clip=1.0, steps=4):
        return train(_tiny_lm(), Batches(data, batch, seed=seed), _WeightedCE(lam), steps=steps, lr=1e-3, clip=clip,
                     ckpt_dir=tmp_path, ckpt_every=2, progress=False)

    go(steps=4)
    with pytest.raises(BitnestError) as e:
        go(**change, steps=4)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert go(steps=4).resumed_from == 4  # the same recipe still resumes


def test_recipe_records_matquant_lambdas_and_plan():
    from bitnest.methods.matquant import MatQuantConfig, MatQuantLoss
    from bitnest.train.loop import recipe_of

    a = recipe_of(lambda s: None, MatQuantLoss([], MatQuantConfig(precisions=(8, 4, 2), lambdas=(0.1, 0.1, 1)).plan()))
    b = recipe_of(lambda s: None, MatQuantLoss([], MatQuantConfig(precisions=(8, 4, 2), lambdas=(1, 1, 1)).plan()))
    assert a["MatQuantLoss.plan"]["lam"] == [[8, 0.1], [4, 0.1], [2, 1.0]] and a != b
    json.dumps(a)  # stored in the training checkpoint: plain data only
    from bitnest.train.loop import _flat
    assert _flat(b)["MatQuantLoss.plan.lam"] == [[8, 1.0], [4, 1.0], [2, 1.0]]  # a change names the field that moved


# ------------------------------------------------------------------------- 6. messages that mislead


def test_negative_steps_reports_only_steps(capsys, ck, tmp_path):
    code, _, err = run(capsys, "quantize", "--model", ck["fp"], "--method", "matquant", "-o", "steps=-5",
                       "--out", tmp_path / "o", "--no-progress")
    one_line(code, err, "steps")
    assert "warmup" not in err


def test_group_size_help_and_validation_agree(capsys, ck, tmp_path):
    from bitnest.cli import build_parser, group_size
    q = build_parser()._subparsers._group_actions[0].choices["quantize"]
    help_ = next(a.help for a in q._actions if a.dest == "group_size")
    assert "'channel', 'tensor' or a positive N" in help_
    assert group_size("tensor") == -1 and group_size("channel") is None and group_size("64") == 64
    for bad in ("-1", "0", "-8"):
        code, _, err = run(capsys, "quantize", "--model", ck["fp"], "--group-size", bad, "--out", tmp_path / "o",
                           "--no-progress")
        one_line(code, err, "group size", "'tensor'")
    assert not (tmp_path / "o").exists()


def test_self_generate_uses_the_current_cache_argument(ck):
    import warnings

    from bitnest.train.data import self_generate
    m = load_model(ck["fp"]).model
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        ids = self_generate(m, 2, 6, progress=False, seed=1)
    assert ids.shape == (2, 6)


# ------------------------------------------------------------------------- 7. fuzz: loaders and unpackers


@pytest.fixture(scope="module")
def fuzz_base(ck, tmp_path_factory):
    """The rtn4 checkpoint without its tokenizer (faster to load) and a scratch directory for the examples."""
    base = tmp_path_factory.mktemp("fuzzbase") / "ck"
    shutil.copytree(ck["rtn4"], base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (base / f).unlink(missing_ok=True)
    return base, tmp_path_factory.mktemp("fuzz")


class _Example:
    """A fresh copy of a checkpoint for one hypothesis example, removed afterwards."""

    def __init__(self, src: Path, scratch: Path):
        self.src, self.scratch = src, scratch

    def __enter__(self) -> Path:
        self.dir = Path(tempfile.mkdtemp(dir=self.scratch))
        shutil.copytree(self.src, self.dir / "ck")
        return self.dir / "ck"

    def __exit__(self, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)


def _clean_or_working(path: Path, **kw):
    """Loading gives a one-line BitnestError, or a model that runs a forward pass with finite logits."""
    try:
        loaded = load_model(path, **kw)
    except BitnestError as e:
        assert "\n" not in str(e)
        return None
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    return loaded


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 10 ** 6), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=6))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                          max_leaves=5)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(obj, path, op, value):
    if not path:
        return value
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if op == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


@FUZZ
@given(data=st.data())
def test_fuzz_config_json_mutations(fuzz_base, data):
    base, scratch = fuzz_base
    cfg = json.loads((base / "config.json").read_text())
    in_qc = data.draw(st.booleans(), "quantization_config?")
    paths = [p for p in _paths(cfg) if p and (p[0] == "quantization_config") == in_qc]
    path = data.draw(st.sampled_from(paths), "path")
    op = data.draw(st.sampled_from(["replace", "delete"]), "op")
    value = data.draw(json_value, "value")
    with _Example(base, scratch) as d:
        (d / "config.json").write_text(json.dumps(_mutate(cfg, path, op, value)))
        _clean_or_working(d)


@FUZZ
@given(module=st.sampled_from([f"model.layers.{i}.{m}" for i in (0, 1) for m in
                               ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]),
       kind=st.one_of(st.text(max_size=12), st.integers(), st.lists(st.integers(), max_size=2),
                      st.sampled_from(["onebit", "codebook", "actquant", "intlinear", "matquant_ep", "gptq", ""])))
def test_fuzz_unknown_or_wrong_module_kinds(fuzz_base, module, kind):
    """An unknown kind is a one-line error; a known one on another kind's tensors is an error or, where its
    tensors are the same (matquant_ep's nested form holds exactly QuantLinear's), a model that works."""
    from bitnest.formats.checkpoint import MODULE_KINDS

    base, scratch = fuzz_base
    with _Example(base, scratch) as d:
        c = json.loads((d / "config.json").read_text())
        mods(c)[module]["kind"] = kind
        (d / "config.json").write_text(json.dumps(c))
        if isinstance(kind, str) and kind in MODULE_KINDS:
            _clean_or_working(d)
        else:
            with pytest.raises(BitnestError, match="cannot load") as e:
                load_model(d)
            assert "\n" not in str(e.value)


_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
           torch.float32, torch.bool]


@FUZZ
@given(data=st.data())
def test_fuzz_tensor_shape_and_dtype_disagreeing_with_config(fuzz_base, data):
    base, scratch = fuzz_base
    sd = load_file(base / "model.safetensors")
    k = data.draw(st.sampled_from(sorted(sd)), "tensor")
    t = sd[k]
    shape = list(t.shape)
    if data.draw(st.booleans(), "change shape?") and shape:
        i = data.draw(st.integers(0, len(shape) - 1), "dim")
        shape[i] = data.draw(st.integers(0, shape[i] + 3).filter(lambda n, s=shape[i]: n != s), "size")
    dtype = data.draw(st.sampled_from(_DTYPES), "dtype")
    same = shape == list(t.shape) and (dtype == t.dtype or (dtype.is_floating_point and t.is_floating_point()))
    with _Example(base, scratch) as d:
        sd2 = dict(sd)
        sd2[k] = torch.zeros(shape, dtype=dtype)
        save_file(sd2, d / "model.safetensors", metadata={"format": "pt"})
        if same:  # a float tensor in another float dtype is a valid checkpoint (cast on load, as before)
            load_model(d, check=False)
        else:
            with pytest.raises(BitnestError) as e:
                load_model(d)
            assert k in str(e.value) and "\n" not in str(e.value)


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_headers(fuzz_base, data):
    base, scratch = fuzz_base
    raw = (base / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    op = data.draw(st.sampled_from(["length", "truncate", "append", "entry"]), "op")
    if op == "length":  # a header length that lies (too short, too long, absurd)
        out = struct.pack("<Q", data.draw(st.integers(0, 2 ** 64 - 1), "n")) + raw[8:]
    elif op == "truncate":
        out = raw[:data.draw(st.integers(0, len(raw) - 1), "cut")]
    elif op == "append":  # oversized: bytes after the last tensor
        out = raw + data.draw(st.binary(min_size=1, max_size=64), "junk")
    else:  # one tensor's header entry: dtype, shape or offsets replaced
        k = data.draw(st.sampled_from(sorted(x for x in header if x != "__metadata__")), "tensor")
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), "field")
        header[k][field] = data.draw({"dtype": st.sampled_from(["U8", "I8", "F16", "F32", "BF16", "I64", "XX", ""]),
                                      "shape": st.lists(st.integers(-2, 300), max_size=3),
                                      "data_offsets": st.lists(st.integers(-5, len(raw) + 5), min_size=0, max_size=3)}[field],
                                     "value")
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        out = struct.pack("<Q", len(h)) + h + raw[8 + n:]
    with _Example(base, scratch) as d:
        (d / "model.safetensors").write_bytes(out)
        _clean_or_working(d)


@FUZZ
@given(data=st.data())
def test_fuzz_nan_inf_scales(fuzz_base, data):
    base, scratch = fuzz_base
    sd = load_file(base / "model.safetensors")
    k = data.draw(st.sampled_from(sorted(x for x in sd if x.endswith((".scale", ".zero")))), "tensor")
    i = data.draw(st.integers(0, sd[k].numel() - 1), "index")
    v = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]), "value")
    with _Example(base, scratch) as d:
        sd[k].view(-1)[i] = v
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(BitnestError, match="NaN or Inf") as e:
            load_model(d)
        assert k.rpartition(".")[0] in str(e.value)


@FUZZ
@given(data=st.data())
def test_fuzz_codes_any_bytes_and_any_served_width(ck, fuzz_base, data):
    """Packed codes hold every bit pattern legally (all widths 1-8, rows padded to bytes): random bytes in any
    qweight load and compute finite logits; a width outside 1..stored is a one-line error."""
    _, scratch = fuzz_base
    which = data.draw(st.sampled_from(["rtn4", "sliced"]), "checkpoint")
    sd = load_file(ck[which] / "model.safetensors")
    k = data.draw(st.sampled_from(sorted(x for x in sd if x.endswith(".qweight"))), "tensor")
    seed = data.draw(st.integers(0, 2 ** 31), "seed")
    bits = data.draw(st.one_of(st.none(), st.integers(-1, 10)), "bits") if which == "sliced" else None
    with _Example(ck[which], scratch) as d:
        sd[k] = torch.randint(0, 256, sd[k].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        loaded = _clean_or_working(d, bits=bits)
        assert (loaded is None) == (bits is not None and not 1 <= bits <= 8)


@FUZZ
@given(data=st.data())
def test_fuzz_tokenizer_files(shared, ck, fuzz_base, data):
    _, scratch = fuzz_base
    f = data.draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json"]), "file")
    raw = (ck["rtn4"] / f).read_bytes()
    op = data.draw(st.sampled_from(["truncate", "bytes", "other_json", "config_json"]), "op")
    if op == "truncate":
        new = raw[:data.draw(st.integers(0, len(raw) - 1), "cut")]
    elif op == "bytes":
        new = data.draw(st.binary(max_size=64), "bytes")
    elif op == "other_json":
        new = json.dumps(data.draw(json_value, "json")).encode()
    else:  # another file under the tokenizer's name
        new = (ck["rtn4"] / "config.json").read_bytes()
    with _Example(ck["rtn4"], scratch) as d:
        (d / f).write_bytes(new)
        loaded = _clean_or_working(d)
        if loaded is not None:  # the files still make a tokenizer (never silently none), and its ids fit the model
            ids = loaded.tokenizer("hello world").input_ids
            assert max(ids) < loaded.model.get_input_embeddings().num_embeddings


@pytest.mark.parametrize("case", ["truncated", "config_as_tokenizer", "other_models_vocab"])
def test_tokenizer_files_that_are_not_what_they_claim(shared, ck, tmp_path, case):
    d = variant(ck["rtn4"], tmp_path / case)
    tok = d / "tokenizer.json"
    if case == "truncated":
        tok.write_bytes(tok.read_bytes()[:5000])
    elif case == "config_as_tokenizer":
        shutil.copy(d / "config.json", tok)
    else:  # another model's tokenizer (8192 tokens) beside a model that embeds 4096: ids would index past it
        from transformers import LlamaConfig, LlamaForCausalLM
        shutil.rmtree(d)
        LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2)).save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(ck["rtn4"] / f, d / f)
    with pytest.raises(BitnestError, match="tokenizer") as e:
        load_model(d)
    assert "\n" not in str(e.value)
    if case == "other_models_vocab":
        assert "8192 tokens" in str(e.value) and "4096" in str(e.value)


# ------------------------------------------------------------------------- the CLI end to end (subprocesses)


def test_cli_subprocess_exit_2_and_one_line(ck, tmp_path):
    """The real entry point: exit status 2 and one `bitnest:` line on stderr, no traceback."""
    cases = [
        ["info", "--model", variant(ck["rtn4"], tmp_path / "i8", state=lambda sd: sd.__setitem__(
            f"{UP}.qweight", sd[f"{UP}.qweight"].view(torch.int8)))],
        ["info", "--model", variant(ck["rtn4"], tmp_path / "kind", cfg=lambda c: mods(c)[UP].update(kind="nope"))],
        ["quantize", "--model", ck["fp"], "--group-size", "-1", "--out", tmp_path / "o"],
    ]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    procs = [subprocess.Popen([sys.executable, "-m", "bitnest.cli", *map(str, argv)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for argv in cases]
    for argv, p in zip(cases, procs):
        _, err = p.communicate(timeout=300)
        ours = [line for line in err.splitlines() if line.startswith("bitnest:")]
        assert p.returncode == 2, (argv, err)
        assert len(ours) == 1 and ours[0].startswith("bitnest: error:") and "Traceback" not in err, (argv, err)
