import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and two threads oversubscribe a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="session")
def shared():
    from bitnest.errors import BitnestError
    from bitnest.paths import data_dir
    try:
        return data_dir()
    except BitnestError:
        pytest.skip("shared data directory not found (set BITNEST_DATA_DIR)")


@pytest.fixture(scope="session")
def ref10m_path(shared):
    p = shared / "models" / "ref-10m"
    if not p.is_dir():
        pytest.skip("ref-10m not found")
    return p


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama saved as a HF directory (safetensors) with the ref-10m tokenizer when present."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny")
    m.save_pretrained(d, safe_serialization=True)
    from bitnest.paths import data_dir
    try:
        tok = data_dir() / "models" / "ref-10m"
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok / f, d / f)
    except Exception:  # no shared data: tests that need a tokenizer skip through `shared` or needs_tokenizer
        pass
    return d


def needs_tokenizer(model_dir) -> None:
    """Skip (not fail) where tiny_llama_dir got no tokenizer: the shared data is not beside the checkout."""
    if not (Path(model_dir) / "tokenizer.json").exists():
        pytest.skip("needs the ref-10m tokenizer (shared data directory not found; set BITNEST_DATA_DIR)")
