"""Text generation on packed models: Hugging Face `generate` (KV cache) on the fast kernels, streamed, timed.

    res = generate(model, tokenizer, "Once upon a time", max_new_tokens=64, stream=print_piece)
    res.text, res.new_tokens, res.decode_tok_s, res.prefill_seconds

Speed is reported the way serving measures it: prefill (the prompt, up to the first new token) and decode
(tokens/s over the new tokens after the first) separately, plus the whole call.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import BitnestError


@dataclass
class GenResult:
    text: str                 # the new text (the prompt excluded)
    prompt_tokens: int
    new_tokens: int
    ids: list[int]            # prompt + new token ids
    seconds: float            # the whole call
    prefill_seconds: float    # until the first new token
    decode_tok_s: float       # (new_tokens − 1) / (seconds − prefill_seconds)

    @property
    def tok_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else float("nan")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt with the tokenizer's BOS (HF tokenizers and llama2.c's alike)."""
    if tokenizer is None:
        raise BitnestError("this model has no tokenizer: generation needs one (a tokenizer.json or tokenizer.bin beside the weights)")
    if hasattr(tokenizer, "pieces"):  # llama2.c
        return tokenizer.encode(text, bos=True)
    ids = tokenizer(text)["input_ids"]
    if not ids:
        bos = getattr(tokenizer, "bos_token_id", None)
        ids = [bos] if bos is not None else []
    if not ids:
        raise BitnestError("the prompt is empty and the tokenizer has no BOS token to start from")
    return list(ids)


class _Stream:
    """A transformers streamer: decodes the growing sequence and hands each new piece of text to `emit`."""

    def __init__(self, tokenizer, n_prompt: int, emit: Callable[[str], None] | None):
        self.tok, self.emit, self.n_prompt = tokenizer, emit, n_prompt
        self.ids: list[int] = []
        self.printed = 0
        self.first_token_at: float | None = None
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids += ids
        if self.emit is not None:
            text = self.tok.decode(self.ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
                self.emit(text[self.printed:])
                self.printed = len(text)

    def end(self) -> None:
        if self.emit is not None:
            text = self.tok.decode(self.ids, skip_special_tokens=True)
            self.emit(text[self.printed:])
            self.printed = len(text)


@torch.inference_mode()
def generate(model, tokenizer, prompt: str | list[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
             stream: Callable[[str], None] | None = None) -> GenResult:
    """Greedy (temperature 0) or sampled continuation of `prompt`, batch 1, with the KV cache."""
    if max_new_tokens < 1:
        raise BitnestError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise BitnestError(f"temperature must be ≥ 0 and top_p in (0, 1], got {temperature} and {top_p}")
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise BitnestError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                           f"{limit} positions")
    if seed is not None:
        torch.manual_seed(seed)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    streamer = _Stream(tokenizer, len(ids), stream)
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, min_new_tokens=0 if stop_at_eos else max_new_tokens,
              streamer=streamer, attention_mask=torch.ones_like(x), pad_token_id=eos if eos is not None else 0,
              eos_token_id=eos)
    if temperature > 0:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    t0 = time.perf_counter()
    out = model.generate(x, **kw)[0].tolist()
    seconds = time.perf_counter() - t0
    new = out[len(ids):]
    prefill = (streamer.first_token_at or t0 + seconds) - t0
    decode = (len(new) - 1) / (seconds - prefill) if len(new) > 1 and seconds > prefill else float("nan")
    return GenResult(tokenizer.decode(new, skip_special_tokens=True), len(ids), len(new), out, seconds, prefill, decode)
