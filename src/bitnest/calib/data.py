"""Calibration tokens: (n, seq) int64 windows from C4 training rows, a text file, or the model's own samples.

Sources (`calib_data`):
  "c4"        rows 0–1799 of the shared C4 sample (the rows ref-10m trained on; rows 1800–1999 are the
              held-out evaluation text and are never used here), documents in a seeded random order,
              joined by "\\n\\n", tokenized once, cut into non-overlapping windows.
  "generate"  sequences sampled from the model itself, LLM-QAT style (`train.data.self_generate`: first
  ("self")    token uniform over the vocabulary, the next 3–5 greedy, the rest sampled): no corpus needed, and
              the calibration follows the model's own distribution, not one dataset's domain (OneBit's choice).
  a path      a .txt / .jsonl file (jsonl: the "text" fields joined by "\\n\\n").
  "auto"      "c4" when the model's tokenizer can be found next to its weights, else "generate".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BitnestError

C4_TRAIN = range(0, 1800)  # never the held-out rows 1800–1999 (eval.data.C4_HELDOUT)


@dataclass(frozen=True)
class CalibOptions:
    """Config fields shared by every method that needs calibration data (mixed into their configs)."""
    calib_data: str = "auto"  # "auto" | "c4" | "generate" (= "self") | path to .txt/.jsonl
    n_calib: int = 128  # sequences
    calib_len: int = 256  # tokens per sequence (ref-10m was trained at 256; use 2048 for real LLMs)
    seed: int = 0

    def __post_init__(self):
        if self.calib_data == "self":
            object.__setattr__(self, "calib_data", "generate")
        if self.n_calib < 1 or self.calib_len < 2:
            raise BitnestError(f"need n_calib >= 1 and calib_len >= 2, got {self.n_calib}, {self.calib_len}")
        if hasattr(super(), "__post_init__"):  # mixed before QuantConfig: chain to its validation
            super().__post_init__()


def _c4_train_docs(data_dir=None) -> list[str]:
    from ..eval.data import C4_SAMPLE, _read_jsonl_texts
    from ..paths import data_file

    path = data_file(C4_SAMPLE, data_dir)
    if not path.is_file():
        raise BitnestError(f"{path} not found; pass calib_data=generate or a text file")
    return _read_jsonl_texts(path, C4_TRAIN)


def _file_docs(path: Path) -> list[str]:
    from ..eval.data import _read_jsonl_texts
    return _read_jsonl_texts(path) if path.suffix.lower() == ".jsonl" else [path.read_text(encoding="utf-8")]


def _encode(tokenizer, text: str) -> torch.Tensor:
    from ..eval.data import tokenize_eval_text
    return tokenize_eval_text(tokenizer, text)


def text_windows(tokenizer, docs: list[str], n: int, seq: int, seed: int = 0) -> torch.LongTensor:
    """n windows of seq tokens from the documents in a seeded random order, tokenized in one stream."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    need, used, ids = n * seq, 0, torch.empty(0, dtype=torch.long)
    while ids.numel() < need and used < len(order):
        take = 32 * (1 + used // 32)  # grow the chunk: few tokenizer calls, little surplus text
        chunk = "\n\n".join(docs[i] for i in order[used:used + take])
        ids = torch.cat([ids, _encode(tokenizer, chunk)])  # (N,)
        used += take
    if ids.numel() < need:
        raise BitnestError(f"calibration text has {ids.numel()} tokens, fewer than {n}×{seq}; lower n_calib/calib_len")
    return ids[:need].view(n, seq)  # (n, seq)


def generate_tokens(model, n: int, seq: int, seed: int = 0, batch_size: int = 16) -> torch.LongTensor:
    """n sequences of seq tokens sampled from the model itself (train.data.self_generate, LLM-QAT style)."""
    from ..train.data import self_generate
    return self_generate(model, n, seq, batch_size=batch_size, seed=seed, progress=False)  # (n, seq)


def tokenizer_of(model):
    from ..models.hf import _load_tokenizer
    src = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not src or not Path(src).is_dir():
        return None
    try:
        return _load_tokenizer(str(src))
    except Exception:  # no tokenizer files next to the weights
        return None


def calibration_tokens(model, opts: CalibOptions, tokenizer=None, data_dir=None) -> torch.LongTensor:
    """The (n_calib, calib_len) calibration windows described by `opts`."""
    src = opts.calib_data
    tok = tokenizer or (None if src == "generate" else tokenizer_of(model))
    if src == "auto":
        src = "c4" if tok is not None else "generate"
    if src == "generate":
        return generate_tokens(model, opts.n_calib, opts.calib_len, opts.seed)
    if tok is None:
        raise BitnestError(f"calib_data={src} needs the model's tokenizer (none next to the weights); pass calib tokens or calib_data=generate")
    if src == "c4":
        docs = _c4_train_docs(data_dir)
    elif Path(src).is_file():
        docs = _file_docs(Path(src))
    else:
        raise BitnestError(f"calib_data {src!r} is not auto, c4, self (generate) or an existing .txt/.jsonl file")
    return text_windows(tok, docs, opts.n_calib, opts.calib_len, opts.seed)


def as_calib(calib, model, opts: CalibOptions) -> torch.LongTensor:
    """The tokens a method calibrates on: `calib` when given ((n, seq) LongTensor), else built from opts."""
    if calib is None:
        return calibration_tokens(model, opts)
    calib = torch.as_tensor(calib, dtype=torch.long)
    if calib.dim() != 2:
        raise BitnestError(f"calibration tokens must be (n, seq), got shape {tuple(calib.shape)}")
    return calib


__all__ = ["CalibOptions", "calibration_tokens", "as_calib", "text_windows", "generate_tokens", "C4_TRAIN"]
