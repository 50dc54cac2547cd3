"""Perplexity and teacher agreement (KL, top-1) on non-overlapping windows, GPTQ style.

The token stream (one tokenization of the whole text, see `bitnest.eval.data`) is cut into
`N // ctx` windows of `ctx` tokens; the incomplete tail is dropped. Each window is an independent
forward pass and predicts its `ctx - 1` next tokens; the mean NLL is taken over every predicted token
of every window and PPL = exp(mean NLL).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import BitnestError

MAX_DEFAULT_CTX = 2048


@dataclass(frozen=True)
class PplResult:
    nll: float  # mean NLL per predicted token (nats)
    ppl: float  # exp(nll)
    tokens: int  # predicted tokens: windows * (ctx - 1)
    windows: int
    ctx: int
    limited: bool  # True when `limit` cut the evaluation short
    window_nll: tuple[float, ...] = ()  # mean NLL of each window, in order (paired comparisons between rows)


@dataclass(frozen=True)
class AgreementResult:
    kl: float  # mean KL(teacher || model) per predicted position (nats)
    top1: float  # fraction of positions where the argmax tokens agree
    tokens: int


def max_positions(model) -> tuple[int, str] | None:
    """(the model's position limit, the config field that says so), or None when its config names none."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_len"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n, attr
    return None


def default_ctx(model) -> int:
    """Window length: the model's position limit, capped at 2048 (callers override, e.g. 256 for ref-10m)."""
    lim = max_positions(model)
    return min(MAX_DEFAULT_CTX, lim[0]) if lim else MAX_DEFAULT_CTX


def check_ctx(model, ctx) -> int:
    """A window length the model can score: an integer ≥ 2 and within its positions (beyond them the numbers
    mean nothing: positions it was never trained at, or an index error)."""
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 2:
        raise BitnestError(f"ctx (window length) must be an integer of at least 2 tokens, got {ctx!r}")
    lim = max_positions(model)
    if lim and ctx > lim[0]:
        raise BitnestError(f"ctx {ctx} is beyond the model's {lim[0]} positions ({lim[1]} in its config); "
                           f"pass --ctx {lim[0]} or less")
    return ctx


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _windows(ids: torch.Tensor, ctx: int, batch_size: int, limit: int | None,
             progress: bool, desc: str) -> tuple[int, bool, Iterator[torch.Tensor]]:
    """(number of windows, limited, iterator over (b, ctx) int64 batches on the CPU)."""
    if ids.dim() != 1:
        raise BitnestError(f"token ids must be 1-D, got shape {tuple(ids.shape)}; pass tokenize_eval_text(...)")
    if ctx < 2:
        raise BitnestError(f"ctx must be at least 2, got {ctx}")
    if batch_size < 1:
        raise BitnestError(f"batch_size must be at least 1, got {batch_size}")
    total = ids.numel() // ctx
    if total == 0:
        raise BitnestError(f"the text has {ids.numel()} tokens, fewer than one window of ctx={ctx}; pass a smaller --ctx or a longer text")
    n = total
    limited = False
    if limit is not None:
        if limit < 1:
            raise BitnestError(f"limit must be at least 1 window, got {limit}")
        if limit < total:
            n, limited = limit, True
    win = ids[: n * ctx].to(torch.long).view(n, ctx)

    def gen() -> Iterator[torch.Tensor]:
        with tqdm(total=n, desc=desc, unit="win", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, n, batch_size):
                batch = win[start:start + batch_size]
                yield batch
                bar.update(batch.shape[0])

    return n, limited, gen()


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    """(b, T, V) logits of a causal LM; Hugging Face models or plain modules returning logits."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = ()  # type: ignore[assignment]
    if isinstance(model, PreTrainedModel):
        out = model(input_ids=x, use_cache=False)
    else:
        out = model(x)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# no_grad, not inference_mode: peers' tensor subclasses (optimum-quanto) cannot run on inference tensors.
@torch.no_grad()
def score(model, ids: torch.Tensor, ctx: int, batch_size: int = 8, limit: int | None = None,
          progress: bool = True, desc: str = "ppl", teacher=None) -> tuple[PplResult, AgreementResult | None]:
    """One pass over the windows: NLL of `model` and, with a teacher, KL(teacher || model) and top-1 agreement
    on the same predicted positions (the last position of each window predicts nothing)."""
    check_ctx(model, ctx)
    n, limited, batches = _windows(ids, ctx, batch_size, limit, progress, desc)
    device = _device(model)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no per-window sync
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    agree = torch.zeros((), dtype=torch.long, device=device)
    per_window = []  # (b,) float64 tensors, one per batch: summed NLL of each window
    for batch in batches:
        x = batch.to(device)
        logits = _logits(model, x)  # (b, T, V)
        t_logits = None if teacher is None else _logits(teacher, batch.to(_device(teacher)))
        targets = x[:, 1:]
        # One window at a time keeps the float32 copy (and cross_entropy's log-softmax) at (T, V).
        w_nll = torch.zeros(x.shape[0], dtype=torch.float64, device=device)  # (b,)
        for i in range(x.shape[0]):
            logp = F.log_softmax(logits[i, :-1].float(), dim=-1)  # (T-1, V)
            w_nll[i] = -logp.gather(-1, targets[i, :, None]).sum().double()
            if t_logits is not None:
                t_logp = F.log_softmax(t_logits[i, :-1].to(device=device, dtype=torch.float32), dim=-1)
                kl_sum += F.kl_div(logp, t_logp, log_target=True, reduction="sum").double()
                agree += (logp.argmax(-1) == t_logp.argmax(-1)).sum()
        nll_sum += w_nll.sum()
        per_window.append(w_nll)
        del logits, t_logits
    tokens = n * (ctx - 1)
    nll = nll_sum.item() / tokens
    window_nll = tuple((torch.cat(per_window) / (ctx - 1)).tolist()) if per_window else ()
    ppl = PplResult(nll=nll, ppl=math.exp(nll), tokens=tokens, windows=n, ctx=ctx, limited=limited,
                    window_nll=window_nll)
    agr = None if teacher is None else AgreementResult(kl=kl_sum.item() / tokens, top1=agree.item() / tokens, tokens=tokens)
    return ppl, agr


def perplexity(model, ids: torch.Tensor, ctx: int, batch_size: int = 8, limit: int | None = None,
               progress: bool = True, desc: str = "ppl") -> PplResult:
    """Mean next-token NLL and PPL of `model` over non-overlapping `ctx`-token windows of `ids`."""
    return score(model, ids, ctx, batch_size, limit, progress, desc)[0]


def agreement(model, teacher, ids: torch.Tensor, ctx: int, batch_size: int = 8, limit: int | None = None,
              progress: bool = True, desc: str = "agreement") -> AgreementResult:
    """Mean KL(teacher || model) of the next-token distributions and top-1 agreement, on the same
    windows and predicted positions as `perplexity`."""
    return score(model, ids, ctx, batch_size, limit, progress, desc, teacher=teacher)[1]


def paired_interval(a: PplResult | list[float], b: PplResult | list[float], *, resamples: int = 2000,
                    level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean NLL difference a − b over the same windows and its paired bootstrap interval (lo, hi).

    Windows are resampled with replacement and the same resample is applied to both rows, so what two rows
    share (hard windows) cancels: the interval says whether a − b is more than window-to-window luck.
    An interval that contains 0 means the rows are not distinguishable on these windows."""
    wa = torch.tensor(a.window_nll if isinstance(a, PplResult) else a, dtype=torch.float64)  # (n,)
    wb = torch.tensor(b.window_nll if isinstance(b, PplResult) else b, dtype=torch.float64)  # (n,)
    if wa.shape != wb.shape or wa.numel() == 0:
        raise BitnestError(f"paired interval needs the same windows for both rows, got {wa.numel()} and {wb.numel()}")
    d = wa - wb  # (n,)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (resamples, d.numel()), generator=g)  # (R, n)
    means = d[idx].mean(1)  # (R,)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return float(d.mean()), lo, hi
