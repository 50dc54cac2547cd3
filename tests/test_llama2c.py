"""llama2.c legacy .bin loader and tokenizer, checked against the real stories260K checkpoint."""
from __future__ import annotations

import shutil

import pytest
import torch

from bitnest.errors import BitnestError
from bitnest.models.llama2c import Llama2cTokenizer, load_llama2c, read_header
from bitnest.paths import data_dir

# The sample in llama2.c's doc/stories260K.md (run.c, temperature 0, from BOS).
EXPECTED_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high"
)


@pytest.fixture(scope="module")
def stories():
    try:
        d = data_dir() / "data" / "stories260K"
    except BitnestError:
        pytest.skip("shared data directory not available")
    if not (d / "stories260K.bin").is_file() or not (d / "tok512.bin").is_file():
        pytest.skip(f"stories260K not found in {d}")
    return d


@pytest.fixture(scope="module")
def loaded(stories):
    torch.set_num_threads(2)
    return load_llama2c(stories / "stories260K.bin")


@pytest.fixture(scope="module")
def greedy_ids(loaded):
    model, _ = loaded
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=60, do_sample=False)  # (1, 61)
    return out[0].tolist()


def test_header(stories):
    h = read_header(stories / "stories260K.bin")
    assert (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert h.shared_classifier


def test_config(loaded):
    model, tok = loaded
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (8, 4, 512)
    assert c.max_position_embeddings == 512 and c.rms_norm_eps == 1e-5
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert not model.training and model.dtype == torch.float32
    assert tok.vocab_size == 512 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_greedy_matches_llama2c(loaded, greedy_ids):
    _, tok = loaded
    # Exact equality, no stripping: decode drops the BOS and the dummy-prefix space after it, as run.c prints.
    assert tok.decode(greedy_ids) == EXPECTED_GREEDY


def test_encode_matches_generated_prefix(loaded, greedy_ids):
    _, tok = loaded
    ids = tok.encode("Once upon a time")
    assert ids[0] == 1
    assert ids == greedy_ids[:len(ids)]


@pytest.mark.parametrize("text", [
    "Once upon a time",
    "Lily and Tom went to the park.\nThey played!",
    "  two leading spaces, trailing one ",
    "Ünïcödé café 日本 🙂",  # not in the 512-token vocab: byte fallback
])
def test_round_trip(loaded, text):
    _, tok = loaded
    assert tok.decode(tok.encode(text)) == text


def test_byte_fallback_ids(loaded):
    _, tok = loaded
    ids = tok.encode("🙂", bos=False)  # 4 UTF-8 bytes F0 9F 99 82 -> ids byte + 3
    assert ids[-4:] == [0xF0 + 3, 0x9F + 3, 0x99 + 3, 0x82 + 3]
    assert tok.decode(ids[-4:]) == "🙂"


def _reference_bpe(tok: Llama2cTokenizer, text: str) -> list[int]:
    """run.c's O(n^2) merge loop, to check the heap implementation against."""
    ids = tok._initial_ids(" " + text)
    while True:
        best = None  # (score, index, merged id); strict > keeps the leftmost on ties
        for i in range(len(ids) - 1):
            m = tok._lookup.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if m is not None and (best is None or tok.scores[m] > best[0]):
                best = (tok.scores[m], i, m)
        if best is None:
            return ids
        ids[best[1]:best[1] + 2] = [best[2]]


def test_heap_bpe_matches_runc_loop(loaded):
    _, tok = loaded
    text = ("One day, a little boy named Tim found a shiny red ball in the garden. He was very happy! "
            "\"Can I play too?\" asked his friend Sue. They laughed and ran, and ran... café 123 ™")
    assert tok.encode(text, bos=False) == _reference_bpe(tok, text)


def test_call_and_eos(loaded):
    _, tok = loaded
    enc = tok("Once upon a time", return_tensors="pt")
    assert enc["input_ids"].shape == (1, 5) and enc.input_ids.dtype == torch.long
    assert tok("Once upon a time")["input_ids"] == tok.encode("Once upon a time")
    assert tok.encode("", bos=True, eos=True) == [1, 2]


def test_save_pretrained_and_from_file(loaded, tmp_path):
    _, tok = loaded
    tok.save_pretrained(tmp_path / "ckpt")
    again = Llama2cTokenizer.from_file(tmp_path / "ckpt" / "tokenizer.bin")
    assert again.pieces == tok.pieces and again.scores == tok.scores
    assert again.encode("Once upon a time") == tok.encode("Once upon a time")


def test_truncated_bin_raises(stories, tmp_path):
    data = (stories / "stories260K.bin").read_bytes()
    (tmp_path / "tok512.bin").write_bytes((stories / "tok512.bin").read_bytes())
    for name, blob in [("cut.bin", data[:-4]), ("tiny.bin", data[:10]), ("long.bin", data + b"\0" * 4)]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(BitnestError, match=r"bytes"):
            load_llama2c(tmp_path / name)


def test_bad_header_raises(tmp_path):
    import struct
    (tmp_path / "m.bin").write_bytes(struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + b"\0" * 64)
    with pytest.raises(BitnestError, match="valid llama2.c header"):
        read_header(tmp_path / "m.bin")


def test_missing_files_raise(stories, tmp_path):
    with pytest.raises(BitnestError, match="not found"):
        load_llama2c(tmp_path / "nope.bin")
    shutil.copyfile(stories / "stories260K.bin", tmp_path / "m.bin")
    with pytest.raises(BitnestError, match="no llama2.c tokenizer"):
        load_llama2c(tmp_path / "m.bin")
    (tmp_path / "tok512.bin").write_bytes((stories / "tok512.bin").read_bytes()[:-3])
    with pytest.raises(BitnestError, match="truncated"):
        load_llama2c(tmp_path / "m.bin")
