"""Zero-shot tasks from local files, scored with lm-evaluation-harness conventions.

Every task is multiple choice (LAMBADA: one continuation). A request is a (context, continuation) pair; its score
is the sum of the continuation tokens' log-likelihoods given the context, tokenized as lm-eval's `_encode_pair`
does: trailing spaces of the context move to the continuation, the pair is tokenized whole and the context alone,
and the continuation tokens are the whole encoding after the context's (so a merge across the boundary is
scored where lm-eval scores it). Special tokens: the tokenizer's default (BOS for Llama tokenizers), as
lm-eval's HFLM adds them when it is given no `add_bos_token`.

Metrics, as lm-eval reports them:
  acc       argmax of the summed log-likelihoods is the gold choice
  acc_norm  argmax of log-likelihood ÷ the choice's length in characters (tasks that report it)
  LAMBADA   acc = the target word is the greedy continuation; ppl = exp(−mean log-likelihood of the target)
Standard errors are bootstrap estimates over items (seeded; `stderr_iters` resamples).

Prompts are lm-eval's (v0.4 task YAMLs): ARC "Question: {q}\\nAnswer:" + " {choice}"; PIQA the same over goal and
solutions; BoolQ "{passage}\\nQuestion: {question}?\\nAnswer:" + " no"/" yes"; OpenBookQA "{question_stem}" +
" {choice}"; COPA "{premise without its period} because|therefore" + " {choice}"; WinoGrande partial scoring
(context = sentence up to the blank with the option filled in, continuation = " " + the rest); LAMBADA (OpenAI)
text without its last word + " {last word}". HellaSwag comes as llama.cpp's text file (context lines as
llama.cpp writes them, which differ from lm-eval's preprocessing in the capitalisation of `ctx_b`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BitnestError
from ..paths import data_file

FOUNDRY = "data/llm_foundry_local_data"


@dataclass
class Item:
    """One question: a context per choice (one shared context, or one per choice for partial scoring)."""
    contexts: list[str]
    continuations: list[str]
    gold: int
    choices: list[str] = field(default_factory=list)  # the choice strings acc_norm divides by (no delimiter)


@dataclass(frozen=True)
class Task:
    name: str
    path: str  # relative to the data directory
    metrics: tuple[str, ...]
    parse: Callable[[Path], list[Item]]
    trained_on: tuple[str, ...] = ()  # reference models whose training text includes this task's text


def _jsonl(path: Path) -> list[dict]:
    try:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BitnestError(f"{path} is not a readable JSON-lines file ({str(e).splitlines()[0]})") from None


def _mc(ctx: str, choices: Sequence[str], gold: int) -> Item:
    return Item([ctx] * len(choices), [" " + c for c in choices], int(gold), list(choices))


def _question_answer(query: str) -> str:
    """llm-foundry's ARC queries are "Question: …" without lm-eval's "\\nAnswer:"."""
    q = query.rstrip()
    return q if q.endswith("Answer:") else q + "\nAnswer:"


def _arc(path: Path) -> list[Item]:
    return [_mc(_question_answer(d["query"]), d["choices"], d["gold"]) for d in _jsonl(path)]


def _piqa(path: Path) -> list[Item]:
    """The official validation file and its labels (lm-eval's dataset is this split)."""
    docs = _jsonl(path)
    labels_file = path.with_name("valid-labels.lst")
    try:
        labels = [int(x) for x in labels_file.read_text(encoding="utf-8").split()]
    except (OSError, ValueError) as e:
        raise BitnestError(f"{labels_file} is missing or not a list of 0/1 labels ({e})") from None
    if len(labels) != len(docs):
        raise BitnestError(f"{labels_file} has {len(labels)} labels for {len(docs)} PIQA items")
    return [_mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], y) for d, y in zip(docs, labels)]


def _boolq(path: Path) -> list[Item]:
    """llm-foundry writes "Passage: {p}\\nQuestion: {q}?"; lm-eval's prompt is "{p}\\nQuestion: {q}?\\nAnswer:"."""
    out = []
    for d in _jsonl(path):
        q = d["query"]
        q = q[len("Passage: "):] if q.startswith("Passage: ") else q
        out.append(_mc(q.rstrip() + "\nAnswer:", d["choices"], d["gold"]))
    return out


def _openbookqa(path: Path) -> list[Item]:
    return [_mc(d["query"], d["choices"], d["gold"]) for d in _jsonl(path)]


def _copa(path: Path) -> list[Item]:
    """lm-eval's current COPA scores the choices as written (capitalised); llm-foundry lower-cased their first
    letter, which is undone here (every COPA choice is a sentence)."""
    return [_mc(d["query"], [c[:1].upper() + c[1:] for c in d["choices"]], d["gold"]) for d in _jsonl(path)]


def _winogrande(path: Path) -> list[Item]:
    out = []
    for d in _jsonl(path):
        cont = " " + d["continuation"].strip()
        out.append(Item(list(d["context_options"]), [cont] * len(d["context_options"]), int(d["gold"]), []))
    return out


def _lambada(path: Path) -> list[Item]:
    out = []
    for d in _jsonl(path):
        ctx, _, word = d["text"].rpartition(" ")
        out.append(Item([ctx], [" " + word], 0, [word]))
    return out


def _hellaswag(path: Path) -> list[Item]:
    """llama.cpp's format: 6 lines per item (context, gold 0-3, four endings)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise BitnestError(f"{path} is not in llama.cpp's HellaSwag format (6 lines per item)")
    return [_mc(lines[i], lines[i + 2:i + 6], int(lines[i + 1])) for i in range(0, len(lines), 6)]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("piqa", "data/piqa/valid.jsonl", ("acc", "acc_norm"), _piqa),
    Task("arc_easy", f"{FOUNDRY}/world_knowledge/arc_easy.fixed.jsonl", ("acc", "acc_norm"), _arc),
    Task("arc_challenge", f"{FOUNDRY}/world_knowledge/arc_challenge.fixed.jsonl", ("acc", "acc_norm"), _arc),
    Task("boolq", f"{FOUNDRY}/reading_comprehension/boolq.jsonl", ("acc",), _boolq, trained_on=("ref-10m",)),
    Task("winogrande", f"{FOUNDRY}/language_understanding/winogrande.jsonl", ("acc",), _winogrande),
    Task("lambada", "data/lambada/lambada_test.jsonl", ("acc", "ppl"), _lambada),
    Task("openbookqa", f"{FOUNDRY}/commonsense_reasoning/openbook_qa.jsonl", ("acc", "acc_norm"), _openbookqa),
    Task("copa", f"{FOUNDRY}/commonsense_reasoning/copa.jsonl", ("acc",), _copa),
    Task("hellaswag", "data/hellaswag/hellaswag_val_full.txt", ("acc", "acc_norm"), _hellaswag, trained_on=("ref-10m",)),
)}
DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "lambada", "openbookqa", "copa")


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["all"]:
        return list(TASKS)
    if names == ["default"]:
        return list(DEFAULT_TASKS)
    bad = [n for n in names if n not in TASKS]
    if bad or not names:
        raise BitnestError(f"unknown task {bad[0] if bad else '(none)'!r}; choose from {', '.join(TASKS)} (or default, all)")
    return names


def load_task(name: str, data_dir=None, limit: int | None = None) -> list[Item]:
    task = TASKS[name]
    path = data_file(task.path, data_dir)
    if not path.is_file():
        raise BitnestError(f"{path} not found; pass --data-dir DIR (the folder holding {task.path})")
    items = task.parse(path)
    return items[:limit] if limit else items


# ------------------------------------------------------------------------------------------- scoring


def _encoder(tokenizer) -> Callable[[str], list[int]]:
    """text -> token ids with the tokenizer's default special tokens (HF tokenizers and llama2.c's)."""
    if hasattr(tokenizer, "pieces"):  # bitnest's llama2.c tokenizer
        return lambda s: tokenizer.encode(s, bos=True)
    return lambda s: list(tokenizer(s)["input_ids"])


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: spaces that end the context belong to the continuation; the continuation's
    tokens are the whole pair's tokens after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], *, max_length: int, batch_size: int = 16,
                   progress: bool = True, desc: str = "score") -> list[tuple[float, bool]]:
    """(sum of continuation log-likelihoods, continuation is the greedy one) for each (context, continuation)."""
    from tqdm.auto import tqdm

    encode = _encoder(tokenizer)
    reqs = []
    for ctx, cont in pairs:
        c, k = encode_pair(encode, ctx, cont)
        if not k:
            raise BitnestError(f"continuation {cont!r} has no tokens of its own after its context")
        seq = (c + k)[-(max_length + 1):]  # left-truncated as lm-eval does; the last token is only a target
        reqs.append((seq, min(len(k), len(seq) - 1)))  # a continuation longer than the window: its last tokens
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]))  # longest first: little padding
    out: list[tuple[float, bool] | None] = [None] * len(reqs)
    device = next(model.parameters()).device
    for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[b:b + batch_size]
        inputs = [reqs[i][0][:-1] for i in idx]
        T = max(len(s) for s in inputs)
        ids = torch.zeros(len(idx), T, dtype=torch.long)  # (B, T) right-padded
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for j, s in enumerate(inputs):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        for j, i in enumerate(idx):
            seq, n = reqs[i]
            L = len(seq) - 1
            lp = torch.log_softmax(logits[j, L - n:L], dim=-1)  # (n, V): predictions of the continuation
            tgt = torch.tensor(seq[-n:], device=lp.device)
            out[i] = (float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
    return out  # type: ignore[return-value]


def _bootstrap(values: Sequence[float] | torch.Tensor, stat: Callable[[torch.Tensor], torch.Tensor],
               iters: int, seed: int = 1234) -> float:
    """Standard deviation of `stat` over item resamples (with replacement)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if len(v) < 2:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    stats = [float(stat(v[torch.randint(len(v), (len(v),), generator=g)])) for _ in range(iters)]
    return float(torch.tensor(stats, dtype=torch.float64).std())


def score_items(items: Sequence[Item], results: Sequence[tuple[float, bool]], metrics: Sequence[str],
                stderr_iters: int = 1000) -> dict:
    """Per-task metrics (and their bootstrap standard errors) from each request's (log-likelihood, greedy)."""
    acc, acc_norm, lls, greedy = [], [], [], []
    k = 0
    for it in items:
        res = results[k:k + len(it.continuations)]
        k += len(it.continuations)
        ll = [r[0] for r in res]
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == it.gold))
        if "acc_norm" in metrics:
            norm = [x / max(len(c), 1) for x, c in zip(ll, it.choices)]
            acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == it.gold))
        lls.append(ll[it.gold])
        greedy.append(float(res[it.gold][1]))
    mean = lambda v: v.mean()  # noqa: E731
    out = {"n": len(items)}
    if "ppl" in metrics:  # LAMBADA: accuracy is the greedy match of the single target
        out["acc"], out["acc_stderr"] = sum(greedy) / len(greedy), _bootstrap(greedy, mean, stderr_iters)
        ppl = lambda v: torch.exp(-v.mean())  # noqa: E731
        out["ppl"], out["ppl_stderr"] = float(ppl(torch.tensor(lls, dtype=torch.float64))), _bootstrap(lls, ppl, stderr_iters)
    else:
        out["acc"], out["acc_stderr"] = sum(acc) / len(acc), _bootstrap(acc, mean, stderr_iters)
    if acc_norm:
        out["acc_norm"], out["acc_norm_stderr"] = sum(acc_norm) / len(acc_norm), _bootstrap(acc_norm, mean, stderr_iters)
    return out


def max_length_of(model, ctx: int | None = None) -> int:
    """--ctx for tasks: the longest context + continuation scored (default: the model's positions)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    if ctx is None:
        return n
    from .perplexity import check_ctx
    return check_ctx(model, ctx)


def evaluate_tasks(model, tokenizer, tasks: str | Sequence[str] = DEFAULT_TASKS, *, data_dir=None,
                   limit: int | None = None, ctx: int | None = None, batch_size: int = 16,
                   stderr_iters: int = 1000, progress: bool = True) -> dict[str, dict]:
    """{task: {n, acc, acc_stderr[, acc_norm, acc_norm_stderr][, ppl, ppl_stderr], trained_on}}."""
    max_length = max_length_of(model, ctx)
    out = {}
    for name in parse_tasks(tasks):
        items = load_task(name, data_dir, limit)
        pairs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
        res = loglikelihoods(model, tokenizer, pairs, max_length=max_length, batch_size=batch_size,
                             progress=progress, desc=name)
        r = score_items(items, res, TASKS[name].metrics, stderr_iters)
        r.update(ctx=max_length, trained_on=list(TASKS[name].trained_on))
        out[name] = r
    return out


def format_table(results: dict[str, dict]) -> str:
    """A markdown table: one row per task, metric ± standard error."""
    rows = ["| task | n | acc | acc_norm | ppl |", "|---|---|---|---|---|"]
    for name, r in results.items():
        cell = lambda k: f"{r[k]:.4f} ± {r[k + '_stderr']:.4f}" if k in r else "—"  # noqa: E731
        ppl = f"{r['ppl']:.2f} ± {r['ppl_stderr']:.2f}" if "ppl" in r else "—"
        mark = " †" if r.get("trained_on") else ""
        rows.append(f"| {name}{mark} | {r['n']} | {cell('acc')} | {cell('acc_norm')} | {ppl} |")
    return "\n".join(rows)


__all__ = ["TASKS", "DEFAULT_TASKS", "Item", "evaluate_tasks", "loglikelihoods", "encode_pair", "score_items",
           "format_table", "parse_tasks", "load_task"]
