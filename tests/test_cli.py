import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnest.cli import main
from conftest import needs_tokenizer


def run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def bad_models(tiny_llama_dir, tmp_path):
    d = {}
    d["missing"] = tmp_path / "nope"
    d["corrupt_config"] = _copy(tiny_llama_dir, tmp_path / "cc")
    (d["corrupt_config"] / "config.json").write_text("{not json")
    d["pickle_only"] = _copy(tiny_llama_dir, tmp_path / "pk")
    (d["pickle_only"] / "model.safetensors").unlink()
    torch.save({}, d["pickle_only"] / "pytorch_model.bin")
    d["truncated"] = _copy(tiny_llama_dir, tmp_path / "tr")
    f = d["truncated"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    d["nan"] = _copy(tiny_llama_dir, tmp_path / "nan")
    sd = load_file(d["nan"] / "model.safetensors")
    k = next(k for k in sd if "mlp.up_proj" in k)
    sd[k][0, 0] = float("nan")
    save_file(sd, d["nan"] / "model.safetensors", metadata={"format": "pt"})
    d["no_weights"] = _copy(tiny_llama_dir, tmp_path / "nw")
    (d["no_weights"] / "model.safetensors").unlink()
    return d


@pytest.mark.parametrize("case,needle", [
    ("missing", "not found"), ("corrupt_config", "not valid JSON"), ("pickle_only", "pickle"),
    ("truncated", "safetensors"), ("nan", "NaN"), ("no_weights", "no weights"),
])
def test_bad_models_one_line_no_output(capsys, bad_models, tmp_path, case, needle):
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", "--model", str(bad_models[case]), "--bits", "4", "--out", str(out), "--no-progress")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bitnest: error:") and needle in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("argv,needle", [
    (["--bits", "9"], "bits"), (["--bits", "0"], "bits"), (["--method", "nope"], "unknown method"),
    (["--group-size", "48"], "does not divide"), (["--group-size", "abc"], "group size"),
    (["--calib-data", "self"], "uses no calibration data"),
    (["--method", "gptq", "--calib-data", "/nonexistent/calib.txt"], "not auto, c4, self"),
    (["--method", "matgptq", "--bits", "8,4", "--lambdas", "1,2,3"], "lambdas for 2 precisions"),
])
def test_bad_options_one_line(capsys, tiny_llama_dir, tmp_path, argv, needle):
    if "--calib-data" in argv and argv[argv.index("--calib-data") + 1] != "self":
        needs_tokenizer(tiny_llama_dir)  # a text file is read with the model's tokenizer first
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--out", str(out), "--no-progress", *argv)
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_quantize_info_eval_json(capsys, tiny_llama_dir, tmp_path, shared):
    out = tmp_path / "q"
    code, o, _ = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--bits", "8", "--method", "sliced",
                     "--out", str(out), "--no-progress")
    assert code == 0 and "wrote" in o
    code, o, _ = run(capsys, "info", "--model", str(out), "--json")
    info = json.loads(o)
    assert code == 0 and info["method"] == "sliced" and info["nested"]
    assert set(v["bits"] for v in info["layers"].values()) == {8}
    code, o, _ = run(capsys, "eval", "--model", str(out), "--bits", "2", "--data", "c4", "--ctx", "64",
                     "--limit", "3", "--json", "--no-progress", "--teacher", str(tiny_llama_dir))
    res = json.loads(o)
    assert code == 0 and res["tokens"] == 3 * 63 and res["limited"]
    assert {"ppl", "nll", "tokens", "bits_per_weight", "model_bytes", "kl", "top1"} <= set(res)
    # int2 codes + fp16 scale and zero per row: 2 + 32/64 on the 64-wide inputs, 2 + 32/128 on down_proj
    per_block = 4 * 64 * 64 * (2 + 32 / 64) + 2 * 128 * 64 * (2 + 32 / 64) + 64 * 128 * (2 + 32 / 128)
    assert res["bits_per_weight"] == pytest.approx(per_block / (4 * 64 * 64 + 3 * 128 * 64))


def test_eval_limit_is_announced(capsys, tiny_llama_dir, shared):
    code, o, _ = run(capsys, "eval", "--model", str(tiny_llama_dir), "--data", "c4", "--ctx", "64", "--limit", "2", "--no-progress")
    assert code == 0 and "--limit" in o


def test_entry_point_no_traceback(tmp_path):
    """The installed console script: bad input → exit 2, one line, no traceback."""
    p = subprocess.run([sys.executable, "-m", "bitnest.cli", "quantize", "--model", str(tmp_path / "x"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2
    lines = [l for l in p.stderr.splitlines() if l.startswith("bitnest")]
    assert len(lines) == 1 and "Traceback" not in p.stderr


def test_options_are_typed_and_checked(capsys, tiny_llama_dir, tmp_path):
    from bitnest.commands import parse_options
    assert parse_options("sliced", ["parent_bits=6"]) == {"parent_bits": 6}
    assert parse_options("gptq", ["act_order=false", "percdamp=0.05"]) == {"act_order": False, "percdamp": 0.05}
    code, _, err = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"),
                       "-o", "nonsense=1", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "nonsense" in err
    code, _, err = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"),
                       "--method", "sliced", "-o", "parent_bits=x", "--no-progress")
    assert code == 2 and "expected int" in err and not (tmp_path / "o").exists()


def test_unset_options_keep_method_defaults(capsys, tiny_llama_dir, tmp_path):
    code, _, _ = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--method", "nf", "--bits", "4",
                     "--out", str(tmp_path / "nf"), "--no-progress")
    cfg = json.loads((tmp_path / "nf" / "config.json").read_text())["quantization_config"]["config"]
    assert code == 0 and cfg["group_size"] == 64  # nf's own default, not per-channel


def test_matgptq_from_self_generated_calibration(capsys, tiny_llama_dir, tmp_path):
    """--method matgptq --bits 8,4,2 --lambdas … --calib-data self: no corpus needed; the checkpoint records the widths
    and λ, and serves int2 at load time."""
    out = tmp_path / "mg"
    code, text, err = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--method", "matgptq", "--bits", "8,4,2",
                          "--lambdas", "4,2,1", "--calib-data", "self", "-o", "n_calib=4", "-o", "calib_len=32",
                          "--group-size", "32", "--out", str(out), "--no-progress")
    assert code == 0, err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "matgptq" and qc["nested"] and qc["config"]["precisions"] == [8, 4, 2]
    assert qc["config"]["lambdas"] == [4.0, 2.0, 1.0] and qc["config"]["calib_data"] == "generate"
    from bitnest.models.hf import load_model
    m = load_model(out, bits=2).model
    assert {l.serve_bits for l in m.modules() if hasattr(l, "serve_bits")} == {2}
