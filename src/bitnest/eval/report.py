"""One evaluation of one model on one text: perplexity, agreement with the FP teacher, bits and bytes."""
from __future__ import annotations

import torch

from .bits import bits_report
from .data import load_eval_text, tokenize_eval_text
from .perplexity import default_ctx, score

_TOKENS: dict = {}


def eval_tokens(tokenizer, data: str, data_dir=None) -> torch.Tensor:
    """Tokenized evaluation text, cached per (tokenizer, dataset) so tables tokenize once."""
    key = (id(tokenizer), str(data), str(data_dir))
    if key not in _TOKENS:
        # the entry holds the tokenizer itself, so its id cannot be reused by another tokenizer while cached
        _TOKENS[key] = (tokenizer, tokenize_eval_text(tokenizer, load_eval_text(data, data_dir)))
    return _TOKENS[key][1]


def evaluate(model, tokenizer, data: str = "wikitext2", *, data_dir=None, ctx: int | None = None,
             limit: int | None = None, batch_size: int = 8, teacher=None, storage_dtype=torch.float16,
             progress: bool = True, only: list[str] | None = None, keep_windows: bool = False) -> dict:
    """Metrics as a flat dict: ppl, nll, tokens, windows, ctx, limited, bits_per_weight, model_bytes[, kl, top1]
    [, window_nll: each window's mean NLL, for paired intervals between rows (`perplexity.paired_interval`)]."""
    ids = eval_tokens(tokenizer, data, data_dir)
    ctx = default_ctx(model) if ctx is None else ctx  # 0 is an error (check_ctx), not the default
    r, a = score(model, ids, ctx, batch_size=batch_size, limit=limit, progress=progress, desc=f"eval {data}", teacher=teacher)
    b = bits_report(model, storage_dtype, only=only)
    out = {"data": str(data), "ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "windows": r.windows, "ctx": r.ctx,
           "limited": r.limited, "bits_per_weight": b.bits_per_weight, "quantized_weights": b.quantized_weights,
           "model_bytes": b.model_bytes}
    if a is not None:
        out.update(kl=a.kl, top1=a.top1)
    if keep_windows:
        out["window_nll"] = list(r.window_nll)
    return out
