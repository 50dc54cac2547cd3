"""transformers-native loading: after `import bitnest`, `AutoModelForCausalLM.from_pretrained` loads sliced, MatQuant,
GPTQ and OneBit checkpoints onto the packed layers with the logits of bitnest's own loader; a bits / mix override
serves a Matryoshka checkpoint at that precision; generate works; save_pretrained round-trips."""
import json
import subprocess
import sys

import pytest
import torch

import bitnest
from bitnest.cli import main
from bitnest.errors import BitnestError
from bitnest.models.hf import load_model

CASES = {
    "sliced8": ["--method", "sliced", "--bits", "8"],
    "matquant": ["--method", "matquant", "--bits", "8,4,2", "-o", "steps=2", "-o", "batch=2", "-o", "n_calib=2",
                 "-o", "calib_len=16", "-o", "calib_data=generate"],
    "gptq3g32": ["--method", "gptq", "--bits", "3", "--group-size", "32", "-o", "n_calib=4", "-o", "calib_len=32",
                 "-o", "calib_data=generate"],
    "onebit": ["--method", "onebit", "-o", "steps=2", "-o", "batch=2", "-o", "seq_len=16", "-o", "samples=4",
               "-o", "gen_batch=4"],
}


@pytest.fixture(scope="module")
def ckpts(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hfq")
    out = {}
    for name, argv in CASES.items():
        rc = main(["quantize", "--model", str(tiny_llama_dir), *argv, "--out", str(root / name), "--no-progress"])
        assert rc == 0, name
        out[name] = root / name
    return out


@pytest.fixture
def ids():
    return torch.randint(0, 8192, (2, 17), generator=torch.Generator().manual_seed(3))


def _hf(path, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_from_pretrained_equals_bitnest_loader(ckpts, ids, name, one_thread):
    hf = _hf(ckpts[name])
    ours = load_model(ckpts[name]).model
    packed = [type(m).__name__ for m in hf.modules() if hasattr(m, "packed")]
    assert packed and len(packed) == len([m for m in ours.modules() if hasattr(m, "packed")])
    assert not any(isinstance(m, torch.nn.Linear) and "mlp" in n for n, m in hf.named_modules())
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("override,kw", [({"bits": 4}, {"bits": 4}), ({"bits": 2}, {"bits": 2}),
                                         ({"mix": {"*.layers.0.*": 2}}, None)])
def test_precision_override_serves_that_width(ckpts, ids, override, kw, one_thread):
    hf = _hf(ckpts["matquant"], quantization_config=bitnest.BitnestConfig(**override))
    if kw is not None:
        ref = load_model(ckpts["matquant"], **kw).model
    else:
        ref = load_model(ckpts["matquant"]).model
        ref.set_precision({"*.layers.0.*": 2})
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ref(ids).logits)
    layers = hf.precision()["layers"]
    if "bits" in override:
        assert set(layers.values()) == {override["bits"]}
    else:
        assert {r for n, r in layers.items() if ".layers.0." in n} == {2} and 8 in layers.values()


def test_override_on_a_standalone_checkpoint_is_a_clear_error(ckpts):
    with pytest.raises(BitnestError, match="Matryoshka"):
        _hf(ckpts["gptq3g32"], quantization_config=bitnest.BitnestConfig(bits=2))


def test_generate_and_save_pretrained_round_trip(ckpts, ids, tmp_path, one_thread):
    hf = _hf(ckpts["matquant"], quantization_config=bitnest.BitnestConfig(bits=4))
    out = hf.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    ref = load_model(ckpts["matquant"], bits=4).model
    assert torch.equal(out, ref.generate(ids[:1, :5], max_new_tokens=6, do_sample=False))
    hf.save_pretrained(tmp_path / "saved")
    qc = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitnest" and "bits" not in qc and qc["nested"]
    assert {m["serve_bits"] for m in qc["modules"].values()} == {4}
    for again in (load_model(tmp_path / "saved").model, _hf(tmp_path / "saved")):
        with torch.no_grad():
            assert torch.equal(again(ids).logits, ref(ids).logits)
        again.set_precision(8)  # still the int8 parent underneath: the saved checkpoint serves every width
    with torch.no_grad():
        assert torch.equal(again(ids).logits, load_model(ckpts["matquant"], bits=8).model(ids).logits)


def test_plain_import_registers(ckpts):
    """The issue's literal check, in a fresh interpreter."""
    code = ("import bitnest, torch; from transformers import AutoModelForCausalLM as A; "
            f"m = A.from_pretrained({str(ckpts['onebit'])!r}); "
            "print(type(m.model.layers[0].mlp.down_proj).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "PackedSignLinear"
