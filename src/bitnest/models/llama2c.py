"""Load Karpathy's llama2.c checkpoints (legacy `.bin`) as a Hugging Face `LlamaForCausalLM`.

The legacy `.bin` is 7 int32 header values (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len; a negative vocab_size means the classifier is stored separately) followed by
float32 weights in run.c's order. The tokenizer `tok*.bin` is int32 max_token_length, then per
token: float32 score, int32 byte length, the bytes (sentencepiece's "▁" already replaced by " ").

Conventions checked against llama2.c run.c / export.py / tokenizer.py:
- run.c's RoPE rotates adjacent pairs (2i, 2i+1) of each head; HF Llama rotates halves (i, i+d/2).
  So wq / wk rows are permuted within each head, exactly like HF's convert_llama_weights_to_hf
  `permute` (export.py's `permute_reverse` is the inverse, used for the HF -> llama2.c direction).
- rms_norm_eps 1e-5, rope theta 10000, BOS = 1, EOS = 2; w1 = gate, w3 = up, w2 = down.
"""
from __future__ import annotations

import heapq
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import BitnestError

__all__ = ["Llama2cHeader", "Llama2cTokenizer", "load_llama2c", "read_header"]

_HEADER = struct.Struct("<7i")
_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export versions, which this loader does not read
BOS_ID, EOS_ID = 1, 2
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


# --------------------------------------------------------------------------- checkpoint header


class Llama2cHeader:
    """The 7 header values, with `vocab_size` made positive and its sign kept in `shared_classifier`."""

    def __init__(self, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len):
        self.dim, self.hidden_dim, self.n_layers = dim, hidden_dim, n_layers
        self.n_heads, self.n_kv_heads, self.seq_len = n_heads, n_kv_heads, seq_len
        self.shared_classifier = vocab_size > 0  # llama2.c's sign hack
        self.vocab_size = abs(vocab_size)

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def n_floats(self) -> int:
        """How many float32 values follow the header (must match the file size exactly)."""
        d, h, L, v = self.dim, self.hidden_dim, self.n_layers, self.vocab_size
        per_layer = 2 * d + 2 * d * d + 2 * self.kv_dim * d + 3 * h * d  # norms, wq+wo, wk+wv, ffn
        freqs = self.seq_len * self.head_size  # freq_cis_real + freq_cis_imag, (seq, hs/2) each
        return v * d + L * per_layer + d + freqs + (0 if self.shared_classifier else v * d)

    def __repr__(self) -> str:
        return (f"Llama2cHeader(dim={self.dim}, hidden_dim={self.hidden_dim}, n_layers={self.n_layers}, "
                f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, vocab_size={self.vocab_size}, "
                f"seq_len={self.seq_len}, shared_classifier={self.shared_classifier})")


def read_header(bin_path: str | os.PathLike) -> Llama2cHeader:
    """Parse and validate the header, including that the file size matches it exactly."""
    path = Path(bin_path)
    if not path.is_file():
        raise BitnestError(f"llama2.c checkpoint {path} not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise BitnestError(f"{path} is truncated: {size} bytes, shorter than the 28-byte llama2.c header")
    values = _HEADER.unpack(raw)
    if values[0] == _V1_MAGIC:
        raise BitnestError(f"{path} is a versioned llama2.c export (magic 'ak42'); only the legacy .bin is supported")
    hdr = Llama2cHeader(*values)
    _check_header(hdr, path)
    expected = _HEADER.size + 4 * hdr.n_floats()
    if size != expected:
        raise BitnestError(f"{path} has {size} bytes but its header {_HEADER.unpack(raw)} implies {expected}; "
                           "truncated or not a legacy llama2.c .bin")
    return hdr


def _check_header(h: Llama2cHeader, path: Path) -> None:
    # Garbage headers give absurd or negative sizes; reject them before any size arithmetic matters.
    dims = (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len)
    ok = (all(x > 0 for x in dims) and h.dim % h.n_heads == 0 and h.n_heads % h.n_kv_heads == 0
          and h.head_size % 2 == 0)
    if not ok:
        raise BitnestError(f"{path} does not have a valid llama2.c header: {dims} "
                           "(need positive sizes, dim divisible by n_heads, n_heads by n_kv_heads, even head size)")


# --------------------------------------------------------------------------- weights


def _read_weights(path: Path, h: Llama2cHeader) -> dict[str, torch.Tensor]:
    """Slice the flat float32 payload into run.c's named tensors (file size already validated)."""
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=_HEADER.size))  # (n_floats,)
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = int(np.prod(shape))
        out = flat[pos:pos + n].view(*shape)
        pos += n
        return out

    d, hd, L, kv = h.dim, h.hidden_dim, h.n_layers, h.kv_dim
    w = {"tok_embeddings": take(h.vocab_size, d)}  # (vocab, dim)
    w["rms_att"] = take(L, d)  # (L, dim)
    w["wq"] = take(L, d, d)  # (L, dim, dim)  rows interleaved-RoPE order
    w["wk"] = take(L, kv, d)  # (L, kv_dim, dim)  rows interleaved-RoPE order
    w["wv"] = take(L, kv, d)  # (L, kv_dim, dim)
    w["wo"] = take(L, d, d)  # (L, dim, dim)
    w["rms_ffn"] = take(L, d)  # (L, dim)
    w["w1"] = take(L, hd, d)  # (L, hidden, dim)
    w["w2"] = take(L, d, hd)  # (L, dim, hidden)
    w["w3"] = take(L, hd, d)  # (L, hidden, dim)
    w["rms_final"] = take(d)  # (dim,)
    take(h.seq_len, h.head_size)  # freq_cis_real + freq_cis_imag: HF recomputes the same table
    w["wcls"] = w["tok_embeddings"] if h.shared_classifier else take(h.vocab_size, d)  # (vocab, dim)
    return w


def _interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from run.c's (2i, 2i+1) RoPE pairs to HF's (i, i + hs/2).

    New row i of a head is old row 2i and new row hs/2 + i is old row 2i + 1 (HF's convert_llama
    `permute`); rotating halves of the permuted q/k then equals run.c's pairwise rotation.
    """
    out_dim, in_dim = w.shape  # (n_heads * hs, dim)
    hs = out_dim // n_heads
    return w.view(n_heads, hs // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)  # (n_heads*hs, dim)


def _hf_state_dict(w: dict[str, torch.Tensor], h: Llama2cHeader) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": w["tok_embeddings"], "model.norm.weight": w["rms_final"]}
    if not h.shared_classifier:  # a shared classifier is tied in the model, not loaded twice
        sd["lm_head.weight"] = w["wcls"]
    for i in range(h.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w["rms_att"][i]  # (dim,)
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]  # (dim,)
        sd[p + "self_attn.q_proj.weight"] = _interleaved_to_halves(w["wq"][i], h.n_heads)  # (dim, dim)
        sd[p + "self_attn.k_proj.weight"] = _interleaved_to_halves(w["wk"][i], h.n_kv_heads)  # (kv_dim, dim)
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]  # (kv_dim, dim): v is not rotated
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]  # (dim, dim)
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]  # (hidden, dim)
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]  # (hidden, dim)
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]  # (dim, hidden)
    return sd


def llama_config(h: Llama2cHeader):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=h.vocab_size, hidden_size=h.dim, intermediate_size=h.hidden_dim,
        num_hidden_layers=h.n_layers, num_attention_heads=h.n_heads, num_key_value_heads=h.n_kv_heads,
        max_position_embeddings=h.seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=h.shared_classifier, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        hidden_act="silu", attention_bias=False, mlp_bias=False, dtype="float32",
    )


def _build_model(h: Llama2cHeader, w: dict[str, torch.Tensor]):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(h)).float()
    missing, unexpected = model.load_state_dict(_hf_state_dict(w, h), strict=False)
    # Only the tied lm_head may be absent from the converted dict; anything else is a bug here.
    allowed = {"lm_head.weight"} if h.shared_classifier else set()
    if set(missing) - allowed or unexpected:
        raise BitnestError(f"llama2.c conversion mismatch: missing {missing}, unexpected {unexpected}")
    if h.shared_classifier:
        model.tie_weights()
    return model.eval()


# --------------------------------------------------------------------------- tokenizer


class Llama2cTokenizer:
    """llama2.c's sentencepiece-style BPE over a `tok*.bin` vocabulary, with a small HF-like surface."""

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id = None
    unk_token_id = 0

    def __init__(self, pieces: list[bytes], scores: list[float], max_token_length: int, path: Path):
        self.pieces, self.scores, self.max_token_length = pieces, scores, max_token_length
        self.path = Path(path)
        self.name_or_path = str(path)
        self.vocab_size = len(pieces)
        self._byte_value = {i: int(m.group(1), 16) for i, p in enumerate(pieces)
                            if (m := _BYTE_PIECE.fullmatch(p))}
        # Text only ever maps to normal pieces: run.c's lookup would also let text like "<0x41>"
        # merge into a byte/control piece, which sentencepiece never does.
        special = {0, BOS_ID, EOS_ID} | set(self._byte_value)
        self._lookup: dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            if i not in special:
                self._lookup.setdefault(p, i)  # first id wins on (unexpected) duplicates
        self._byte_id = {v: i for i, v in self._byte_value.items()}

    @classmethod
    def from_file(cls, path: str | os.PathLike, vocab_size: int | None = None) -> "Llama2cTokenizer":
        """Read a llama2.c `tok*.bin`; `vocab_size`, when given, must equal the number of tokens in it."""
        path = Path(path)
        if not path.is_file():
            raise BitnestError(f"llama2.c tokenizer {path} not found")
        pieces, scores, max_len = _parse_tokenizer(path.read_bytes(), path)
        if vocab_size is not None and len(pieces) != vocab_size:
            raise BitnestError(f"tokenizer {path} has {len(pieces)} tokens but the model expects {vocab_size}")
        return cls(pieces, scores, max_len, path)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encoding

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """run.c's encode: dummy-prefix space, per-char pieces or byte fallback, then greedy merges."""
        ids = self._bpe(self._initial_ids(" " + text)) if text else []  # sentencepiece's dummy prefix
        return [BOS_ID] * bos + ids + [EOS_ID] * eos

    def _initial_ids(self, text: str) -> list[int]:
        ids = []
        for ch in text:  # one Unicode code point = one UTF-8 sequence, as run.c groups bytes
            b = ch.encode("utf-8", errors="surrogatepass")
            if b in self._lookup:
                ids.append(self._lookup[b])
            else:  # byte fallback: one <0xXX> token per UTF-8 byte
                ids.extend(self._byte_token(x) for x in b)
        return ids

    def _byte_token(self, value: int) -> int:
        if value not in self._byte_id:
            return self.unk_token_id  # a vocabulary without byte pieces: sentencepiece's <unk>
        return self._byte_id[value]

    def _bpe(self, ids: list[int]) -> list[int]:
        """Repeatedly merge the adjacent pair whose concatenation has the highest score.

        Same result as run.c's O(n^2) scan (leftmost pair wins ties), in O(n log n) with a heap
        over a linked list, so long evaluation texts tokenize quickly.
        """
        toks = list(ids)
        nxt = list(range(1, len(toks) + 1))  # index of the next live token (len = none)
        prv = list(range(-1, len(toks) - 1))
        heap: list[tuple[float, int, int, int, int]] = []
        for i in range(len(toks) - 1):
            self._push_pair(heap, toks, i, i + 1)
        while heap:
            _, i, j, ti, tj = heapq.heappop(heap)
            if toks[i] != ti or toks[j] != tj or nxt[i] != j:
                continue  # stale: one side has merged since this pair was pushed
            toks[i] = self._lookup[self.pieces[ti] + self.pieces[tj]]
            toks[j] = -1  # dead
            nxt[i] = nxt[j]
            if nxt[j] < len(toks):
                prv[nxt[j]] = i
                self._push_pair(heap, toks, i, nxt[i])
            if prv[i] >= 0:
                self._push_pair(heap, toks, prv[i], i)
        return [t for t in toks if t >= 0]

    def _push_pair(self, heap: list, toks: list[int], i: int, j: int) -> None:
        merged = self._lookup.get(self.pieces[toks[i]] + self.pieces[toks[j]])
        if merged is not None:  # key: highest score first, then leftmost (smallest start index)
            heapq.heappush(heap, (-self.scores[merged], i, j, toks[i], toks[j]))

    # ---- decoding

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Concatenate pieces as run.c prints them: BOS/EOS emit nothing, the piece right after BOS
        loses its leading space (the dummy prefix), `<0xXX>` pieces become raw bytes."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out, prev = bytearray(), None
        for t in ids:
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise BitnestError(f"token id {t} is outside the vocabulary (0..{self.vocab_size - 1})")
            out += self._piece_bytes(t, prev, skip_special_tokens)
            prev = t
        return out.decode("utf-8", errors="replace")

    def _piece_bytes(self, t: int, prev: int | None, skip_special: bool) -> bytes:
        if t in (BOS_ID, EOS_ID) and skip_special:
            return b""
        if t in self._byte_value:
            return bytes([self._byte_value[t]])
        piece = self.pieces[t]
        return piece[1:] if prev == BOS_ID and piece.startswith(b" ") else piece

    # ---- HF-like surface

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = True):
        ids = self.encode(text, bos=add_special_tokens)
        if return_tensors == "pt":
            input_ids = torch.tensor([ids], dtype=torch.long)  # (1, T)
            return _Encoding(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        if return_tensors is not None:
            raise BitnestError(f"return_tensors={return_tensors!r} is not supported (use None or 'pt')")
        return _Encoding(input_ids=ids, attention_mask=[1] * len(ids))

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Copy the `tok*.bin` into `directory/tokenizer.bin` so a saved checkpoint carries it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dest = directory / "tokenizer.bin"
        if dest.resolve() != self.path.resolve():
            shutil.copyfile(self.path, dest)
        return [str(dest)]

    def __repr__(self) -> str:
        return f"Llama2cTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size})"


class _Encoding(dict):
    """A dict that also allows `enc.input_ids`, like HF's BatchEncoding."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _parse_tokenizer(data: bytes, path: Path) -> tuple[list[bytes], list[float], int]:
    """Parse int32 max_len, then (float32 score, int32 len, bytes) records until the end of the file."""
    if len(data) < 4:
        raise BitnestError(f"tokenizer {path} is truncated ({len(data)} bytes)")
    (max_len,) = struct.unpack_from("<i", data, 0)
    pieces, scores, pos = [], [], 4
    while pos < len(data):
        if pos + 8 > len(data):
            raise BitnestError(f"tokenizer {path} is truncated in token {len(pieces)}")
        score, n = struct.unpack_from("<fi", data, pos)
        if n < 0 or pos + 8 + n > len(data):
            raise BitnestError(f"tokenizer {path} is truncated or corrupt in token {len(pieces)}")
        pieces.append(bytes(data[pos + 8:pos + 8 + n]))
        scores.append(score)
        pos += 8 + n
    if len(pieces) <= EOS_ID:
        raise BitnestError(f"tokenizer {path} has only {len(pieces)} tokens; not a llama2.c tokenizer")
    return pieces, scores, max_len


# --------------------------------------------------------------------------- public entry point


def _default_tokenizer_path(bin_path: Path, vocab_size: int) -> Path:
    # llama2.c names custom tokenizers tok{vocab}.bin; the Llama-2 one is tokenizer.bin.
    candidates = [bin_path.parent / f"tok{vocab_size}.bin", bin_path.parent / "tokenizer.bin"]
    for p in candidates:
        if p.is_file():
            return p
    raise BitnestError(f"no llama2.c tokenizer beside {bin_path} (looked for "
                       f"{', '.join(p.name for p in candidates)}); pass tokenizer_path")


def load_llama2c(bin_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None):
    """Load a legacy llama2.c `.bin` as a float32, eval-mode `LlamaForCausalLM` plus its tokenizer."""
    bin_path = Path(bin_path)
    header = read_header(bin_path)
    tok_path = Path(tokenizer_path) if tokenizer_path is not None else _default_tokenizer_path(bin_path, header.vocab_size)
    tokenizer = Llama2cTokenizer.from_file(tok_path, vocab_size=header.vocab_size)
    model = _build_model(header, _read_weights(bin_path, header))
    model.config._name_or_path = str(bin_path)  # so reports/eval code can say which model this was
    return model, tokenizer
