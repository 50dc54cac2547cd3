"""Evaluation text: WikiText-2 raw test, the held-out C4 sample, or a user file; and one-shot tokenization.

The conventions follow GPTQ (and with it most LLM-quantization papers), so perplexities compare:
the whole evaluation text is one string, tokenized once, with the tokenizer's default special tokens.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import BitnestError
from ..paths import data_file

WIKITEXT2_TEST = "data/wikitext2_raw/wiki.test.raw"
C4_SAMPLE = "data/c4_validation_sample/c4_validation_2k.jsonl"
# Rows 0-1799 of the C4 sample trained shared/models/ref-10m; rows 1800-1999 are held out.
C4_HELDOUT = range(1800, 2000)

DATASETS = ("wikitext2", "c4")
_WHAT_TO_PASS = "pass wikitext2, c4, or a path to a .txt/.jsonl file"


def _wikitext2_gptq_text(raw: str) -> str:
    """The GPTQ WikiText-2 string, `"\\n\\n".join(rows)` of the Hugging Face `wikitext-2-raw-v1` test rows.

    `wiki.test.raw` has the pytorch/examples line layout: 4,358 lines, each ending in "\\n"; the blank
    lines are a single space " ". The HF dataset builds one row per line, keeping the line's trailing
    "\\n", and turns whitespace-only lines into "" (4,358 rows). So rows = [line + "\\n" if line.strip()
    else ""], and the GPTQ text is those rows joined by "\\n\\n" (1,294,336 characters). The raw file read
    as is is *not* that string (1,288,556 characters, 1.7% fewer Llama-2 tokens). Check: with the
    Llama-2 tokenizer the result is 341,469 tokens with BOS, the published count.
    """
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with "\n": no row after it
    rows = [line + "\n" if line.strip() else "" for line in lines]
    return "\n\n".join(rows)


def read_utf8(path: Path, what: str = "text file", newline: str | None = "") -> str:
    """The file as UTF-8 text (`newline` as open() takes it: "" leaves line endings untouched, None makes them
    "\\n"), or a one-line error naming the file and its first byte that is not UTF-8."""
    try:
        with path.open(encoding="utf-8", newline=newline) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise BitnestError(f"{path} is not UTF-8 text (it holds the byte 0x{e.object[e.start]:02x}, which UTF-8 cannot "
                           f"start or continue with there); save the {what} as UTF-8") from None
    except OSError as e:
        raise BitnestError(f"cannot read {path}: {e.strerror or e}") from None


def _read_jsonl_texts(path: Path, rows: range | None = None) -> list[str]:
    texts: list[str] = []
    lines = [line for line in read_utf8(path, "JSON-lines file", newline=None).split("\n") if line.strip()]
    if rows is not None:
        if len(lines) < rows.stop:
            raise BitnestError(f"{path} has {len(lines)} rows, expected at least {rows.stop}; re-copy the data directory")
        lines = lines[rows.start:rows.stop]
    for i, line in enumerate(lines):
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BitnestError(f"{path}: row {i} is not a JSON object with a \"text\" field; pass a JSON-lines file of {{\"text\": ...}}") from None
    return texts


def load_eval_text(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The evaluation text for `name`: "wikitext2", "c4", or a path to a text file.

    - wikitext2: WikiText-2 raw test, GPTQ-joined (see `_wikitext2_gptq_text`).
    - c4: the 200 held-out documents (rows 1800-1999) of the 2k C4 validation sample, their "text"
      fields joined by "\\n\\n" (the same separator as the WikiText-2 convention; GPTQ's own C4 number
      samples random windows instead, which is not reproducible across tokenizers).
    - a path: `.jsonl` -> the "text" fields joined by "\\n\\n"; any other file is read as is (UTF-8,
      line endings untouched).

    `data_dir` is the shared directory holding `data/` (resolved by `bitnest.paths.data_dir`).
    """
    key = str(name).lower()
    if key in DATASETS:
        rel = WIKITEXT2_TEST if key == "wikitext2" else C4_SAMPLE
        path = data_file(rel, data_dir)
        if not path.is_file():
            raise BitnestError(f"{path} not found; pass --data-dir DIR (the shared directory holding {rel})")
        if key == "wikitext2":
            return _wikitext2_gptq_text(read_utf8(path, newline=None))
        return "\n\n".join(_read_jsonl_texts(path, C4_HELDOUT))

    path = Path(name)
    if not path.is_file():
        raise BitnestError(f"unknown evaluation dataset or missing file {name!r}; {_WHAT_TO_PASS}")
    if path.suffix.lower() == ".jsonl":
        return "\n\n".join(_read_jsonl_texts(path))
    return read_utf8(path, "evaluation text")


def tokenize_eval_text(tokenizer, text: str) -> torch.LongTensor:
    """Token ids (1-D int64) of the whole `text`, tokenized once.

    BOS, like GPTQ: a Hugging Face tokenizer is called with its default special tokens
    (`add_special_tokens=True`), so Llama-style tokenizers put one BOS at the very start of the text
    and nowhere else (this is how the published 341,469-token Llama-2 WikiText-2 count arises); the
    windows cut later do not get their own BOS. A llama2.c-style tokenizer (only
    `encode(text, bos, eos) -> list[int]`) is called with `bos=True, eos=False`, the same thing.
    """
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedTokenizerBase = ()  # type: ignore[assignment]

    ids = None
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        # verbose=False silences "Token indices sequence length is longer than the specified maximum".
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=True, verbose=False)["input_ids"]
    elif hasattr(tokenizer, "encode"):
        ids = torch.tensor(tokenizer.encode(text, bos=True, eos=False), dtype=torch.long)
    elif callable(tokenizer):
        out = tokenizer(text)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else getattr(out, "input_ids", None)
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long)
    if ids is None:
        raise BitnestError(f"cannot tokenize with {type(tokenizer).__name__}; pass a Hugging Face tokenizer or one with encode(text, bos, eos)")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    return ids
