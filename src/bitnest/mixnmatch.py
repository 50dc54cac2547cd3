"""Mix'n'Match (MatQuant, methods.md §1): every layer of a nested (Matryoshka) model served at its own r.

    mix = strategy_mix(model, "pyramid", budget=3.0)          # the paper's layer-wise strategies
    mix, path = search_mix(model, calib_ids, budget=3.0)      # greedy, measured: best quality under a budget
    mix, path = evo_mix(model, calib_ids, budget=3.0, teacher=fp) # evolutionary (EvoPress), KL to the FP model
    apply_mix(model, mix)                                     # or load_quantized(dir, overrides=mix)

A mix maps module names to r. Layers are the decoder blocks' FFNs by default (the paper's setting): all
nested layers of one block share their r. The budget is bits per weight over those layers, every stored bit
counted as `eval.bits` counts it (codes at r bits, scales, zeros, extra-precision index lists), or whole-model
bytes (`max_bytes`).

Strategies (the paper's four), over L blocks with widths {hi, mid, lo} (default 8, 4, 2): a strategy is an
order of preference over blocks; the first n_hi blocks in that order get hi, the next n_mid get mid, the rest
lo, and (n_hi, n_mid, n_lo) is the split with the most bits that meets the budget (ties: more mid).
  pyramid           middle blocks first: lo at the first and last blocks, hi in the middle, mid between
  reverse_pyramid   outer blocks first: hi at both ends, lo in the middle
  increasing        r grows with depth (last blocks first)
  decreasing        r falls with depth (first blocks first)

Search (`search_mix`): start every group at the highest width; while over budget, lower by one width step the
group whose measured loss increase per saved bit is smallest (mean NLL on a few calibration sequences — C4
training rows, never the held-out ones). `lazy=True` re-measures only the group just lowered (L + 2 forwards
per step instead of L + 1): the other groups' costs are kept from when they were measured.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import BitnestError
from .eval.bits import bits_report
from .models.blocks import is_ffn

STRATEGIES = ("pyramid", "reverse_pyramid", "increasing", "decreasing")
SEARCH_LEVELS = (8, 6, 4, 3, 2)


def nested_modules(model: nn.Module, names: Sequence[str] | None = None, ffn_only: bool = True) -> dict[str, nn.Module]:
    """The servable nested layers (QuantLinear / ExtraPrecisionLinear storing c-bit codes), by name."""
    out = {}
    for n, m in model.named_modules():
        if not hasattr(m, "serve_bits") or not hasattr(m, "parent_bits"):
            continue
        if m.bits != m.parent_bits:  # a standalone slice: not re-servable
            continue
        if names is not None and n not in set(names):
            continue
        if names is None and ffn_only and not is_ffn(n):
            continue
        out[n] = m
    if not out:
        raise BitnestError("no nested (Matryoshka) layers to mix" + (" among the FFN layers" if names is None and ffn_only else "")
                           + "; Mix'n'Match needs a sliced or matquant checkpoint")
    return out


_BLOCK = re.compile(r"\.(\d+)\.")


def layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Names grouped by decoder block (the first numeric path component), in depth order."""
    groups: dict[int, list[str]] = {}
    for n in names:
        m = _BLOCK.search(f".{n}.")
        if m is None:
            raise BitnestError(f"cannot tell which block {n} belongs to (no layer index in its name)")
        groups.setdefault(int(m.group(1)), []).append(n)
    return [groups[k] for k in sorted(groups)]


def apply_mix(model: nn.Module, mix: dict[str, int]) -> None:
    """Serve each named nested layer at its r (in place)."""
    for n, r in mix.items():
        m = model.get_submodule(n)
        if not 1 <= r <= m.bits:
            raise BitnestError(f"cannot serve {n} at {r} bits: it stores {m.bits}-bit codes")
        m.serve_bits = r


def current_mix(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, int]:
    return {n: m.serve_bits for n, m in nested_modules(model, names).items()}


def _group_bits(mods: dict[str, nn.Module], group: list[str], r: int) -> int:
    """Stored bits of the group's layers served at r (every bit, as eval.bits counts it)."""
    total = 0
    for n in group:
        m = mods[n]
        old = m.serve_bits
        m.serve_bits = min(r, m.bits)
        total += m.served_bits()
        m.serve_bits = old
    return total


def _weights(mods: dict[str, nn.Module]) -> int:
    return sum(m.num_weights() if hasattr(m, "num_weights") else m.in_features * m.out_features for m in mods.values())


def priority(strategy: str, n_layers: int) -> list[int]:
    """Block indices in the order in which a strategy gives them bits (most first)."""
    c = (n_layers - 1) / 2
    if strategy == "pyramid":
        return sorted(range(n_layers), key=lambda i: (abs(i - c), i))
    if strategy == "reverse_pyramid":
        return sorted(range(n_layers), key=lambda i: (-abs(i - c), i))
    if strategy == "increasing":
        return list(range(n_layers - 1, -1, -1))
    if strategy == "decreasing":
        return list(range(n_layers))
    raise BitnestError(f"unknown Mix'n'Match strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def strategy_bits(strategy: str, n_layers: int, counts: tuple[int, int, int], levels=(8, 4, 2)) -> list[int]:
    """Per-block widths of a strategy with counts (n_hi, n_mid, n_lo) of blocks at levels (hi, mid, lo)."""
    if sum(counts) != n_layers or min(counts) < 0:
        raise BitnestError(f"counts {counts} do not split {n_layers} layers")
    order = priority(strategy, n_layers)
    bits = [0] * n_layers
    for k, i in enumerate(order):
        bits[i] = levels[0] if k < counts[0] else levels[1] if k < counts[0] + counts[1] else levels[2]
    return bits


def _budget_check(budget, max_bytes):
    if (budget is None) == (max_bytes is None):
        raise BitnestError("give exactly one budget: bits per weight (budget) or whole-model bytes (max_bytes)")
    if budget is not None and not budget > 0:
        raise BitnestError(f"the budget must be a positive number of bits per weight, got {budget}")


class _Meter:
    """Bits per weight over the mixed layers, or whole-model bytes, for a candidate per-group width list."""

    def __init__(self, model, mods, groups, budget, max_bytes):
        self.mods, self.groups = mods, groups
        self.n = _weights(mods)
        self.budget, self.max_bytes = budget, max_bytes
        self._cache: dict[tuple[int, int], int] = {}
        if max_bytes is not None:
            rep = bits_report(model)
            self.fixed_bytes = rep.model_bytes - (sum(m.served_bits() for m in mods.values()) + 7) // 8

    def group_bits(self, gi: int, r: int) -> int:
        if (gi, r) not in self._cache:
            self._cache[(gi, r)] = _group_bits(self.mods, self.groups[gi], r)
        return self._cache[(gi, r)]

    def total_bits(self, widths: list[int]) -> int:
        return sum(self.group_bits(i, r) for i, r in enumerate(widths))

    def bpw(self, widths: list[int]) -> float:
        return self.total_bits(widths) / self.n

    def fits(self, widths: list[int]) -> bool:
        if self.budget is not None:
            return self.bpw(widths) <= self.budget + 1e-12
        return self.fixed_bytes + (self.total_bits(widths) + 7) // 8 <= self.max_bytes


def _mix_of(groups, widths) -> dict[str, int]:
    return {n: r for g, r in zip(groups, widths) for n in g}


def strategy_mix(model: nn.Module, strategy: str, budget: float | None = None, *, max_bytes: int | None = None,
                 names: Sequence[str] | None = None, levels: tuple[int, int, int] = (8, 4, 2)) -> dict[str, int]:
    """The strategy's mix with the most bits that meets the budget."""
    _budget_check(budget, max_bytes)
    priority(strategy, 1)  # validates the name
    mods = nested_modules(model, names)
    groups = layer_groups(list(mods))
    meter = _Meter(model, mods, groups, budget, max_bytes)
    L = len(groups)
    best = None
    for n_hi in range(L + 1):
        for n_mid in range(L + 1 - n_hi):
            widths = strategy_bits(strategy, L, (n_hi, n_mid, L - n_hi - n_mid), levels)
            if not meter.fits(widths):
                continue
            key = (meter.total_bits(widths), n_mid)
            if best is None or key > best[0]:
                best = (key, widths)
    if best is None:
        raise BitnestError(f"no {strategy} mix of widths {levels} fits the budget "
                           f"(all at {levels[-1]} bits: {meter.bpw([levels[-1]] * L):.3f} bits per weight)")
    return _mix_of(groups, best[1])


@torch.no_grad()
def mean_nll(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL of `model` over the (N, T) token ids."""
    from .eval.perplexity import perplexity
    return perplexity(model, ids.reshape(-1), ids.shape[1], batch_size=batch_size, progress=False).nll


def search_mix(model: nn.Module, ids: torch.Tensor, budget: float | None = None, *, max_bytes: int | None = None,
               names: Sequence[str] | None = None, levels: Sequence[int] = SEARCH_LEVELS, lazy: bool = True,
               batch_size: int = 8, progress: bool = True) -> tuple[dict[str, int], list[dict]]:
    """Greedy budget search (module doc). Returns (mix, path): path holds one record per step (bits per
    weight over the mixed layers, calibration NLL, the group lowered and its new width). The model is left
    serving the returned mix."""
    _budget_check(budget, max_bytes)
    mods = nested_modules(model, names)
    groups = layer_groups(list(mods))
    levels = sorted(set(int(b) for b in levels), reverse=True)
    if not levels or levels[-1] < 1:
        raise BitnestError(f"levels must be bit-widths in 1..8, got {levels}")
    meter = _Meter(model, mods, groups, budget, max_bytes)
    top = [[b for b in levels if b <= min(mods[n].bits for n in g)] for g in groups]  # widths each group can take
    if any(not t for t in top):
        raise BitnestError(f"levels {levels} exceed the stored bits of some layers")
    idx = [0] * len(groups)  # index into top[gi]
    widths = lambda: [top[g][i] for g, i in enumerate(idx)]
    if not meter.fits([t[-1] for t in top]):
        raise BitnestError(f"the budget cannot be met: every layer at its lowest width ({levels[-1]} bits) is "
                           f"{meter.bpw([t[-1] for t in top]):.3f} bits per weight")
    apply_mix(model, _mix_of(groups, widths()))
    base = mean_nll(model, ids, batch_size)
    path = [{"bits": meter.bpw(widths()), "nll": base, "group": None, "r": None}]
    scores: dict[int, float] = {}

    def measure(gi: int) -> float:
        """Loss increase per saved bit of lowering group gi one step (from the current state)."""
        cur, nxt = top[gi][idx[gi]], top[gi][idx[gi] + 1]
        apply_mix(model, {n: nxt for n in groups[gi]})
        loss = mean_nll(model, ids, batch_size)
        apply_mix(model, {n: cur for n in groups[gi]})
        saved = meter.group_bits(gi, cur) - meter.group_bits(gi, nxt)
        return (loss - base) / max(saved, 1)

    bar = tqdm(desc="mix'n'match search", unit="step", disable=not progress, dynamic_ncols=True)
    while not meter.fits(widths()):
        for gi in range(len(groups)):
            if idx[gi] + 1 < len(top[gi]) and (not lazy or gi not in scores):
                scores[gi] = measure(gi)
        gi = min(scores, key=scores.get)
        idx[gi] += 1
        del scores[gi]
        apply_mix(model, {n: top[gi][idx[gi]] for n in groups[gi]})
        base = mean_nll(model, ids, batch_size)
        path.append({"bits": meter.bpw(widths()), "nll": base, "group": gi, "r": top[gi][idx[gi]]})
        bar.set_postfix(bits=f"{path[-1]['bits']:.3f}", nll=f"{base:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    return _mix_of(groups, widths()), path


@torch.no_grad()
def _logprobs(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """log p(· | prefix) for every position of the (N, T) ids: (N, T, V), float32."""
    out = [torch.log_softmax(model(input_ids=ids[i:i + batch_size]).logits.float(), -1) for i in range(0, len(ids), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def kl_to(teacher_lp: torch.Tensor, model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean over positions of KL(teacher ‖ model), teacher given as log-probs (N, T, V) of the same ids."""
    total = 0.0
    for i in range(0, len(ids), batch_size):
        lq = torch.log_softmax(model(input_ids=ids[i:i + batch_size]).logits.float(), -1)  # (b, T, V)
        lp = teacher_lp[i:i + batch_size]
        total += (lp.exp() * (lp - lq)).sum(-1).sum().item()
    return total / (ids.shape[0] * ids.shape[1])


def evo_mix(model: nn.Module, ids: torch.Tensor, budget: float | None = None, *, max_bytes: int | None = None,
            teacher: nn.Module | None = None, names: Sequence[str] | None = None, levels: Sequence[int] = SEARCH_LEVELS,
            per_layer: bool = False, generations: int = 60, offspring: int = 12, survivors: int = 3,
            first_stage: int = 1, seed: int = 0, init: dict[str, int] | str | None = None, batch_size: int = 8,
            progress: bool = True) -> tuple[dict[str, int], list[dict]]:
    """Evolutionary budget search (EvoPress, Sieberling et al. 2024; MatGPTQ's Mix'n'Match): fitness = KL from
    the teacher (the FP model when given, else this model at its widest slice) on the calibration ids (N, T).

    Each generation mutates the parent into `offspring` children by level switches (one unit one width up, another
    one down, kept only if the budget still holds, 1–3 switches), ranks them on the first `first_stage` sequences,
    re-scores the best `survivors` on all of them, and keeps the best child if it beats the parent. Units are
    decoder blocks (all nested layers of a block share r) or single layers (`per_layer`). Starts from `init` (a
    mix, or "greedy": `search_mix`'s result, so the search can only improve on it) or else from the most bits that
    fit with one width everywhere plus random upgrades. Returns (mix, path: the parent's KL per generation); the
    model is left serving the mix."""
    _budget_check(budget, max_bytes)
    mods = nested_modules(model, names)
    groups = [[n] for n in mods] if per_layer else layer_groups(list(mods))
    levels = sorted(set(int(b) for b in levels), reverse=True)
    meter = _Meter(model, mods, groups, budget, max_bytes)
    top = [[b for b in levels if b <= min(mods[n].bits for n in g)] for g in groups]
    if any(not t for t in top):
        raise BitnestError(f"levels {levels} exceed the stored bits of some layers")
    if not meter.fits([t[-1] for t in top]):
        raise BitnestError(f"the budget cannot be met: every layer at its lowest width ({levels[-1]} bits) is "
                           f"{meter.bpw([t[-1] for t in top]):.3f} bits per weight")
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: int(torch.randint(0, n, (1,), generator=g))
    if init == "greedy":
        init, _ = search_mix(model, ids, budget, max_bytes=max_bytes, names=list(mods),
                             levels=levels, batch_size=batch_size, progress=False)
    if init is not None:
        idx = [top[i].index(init[grp[0]]) for i, grp in enumerate(groups)]
    else:
        idx = next([min(len(t) - 1, j) for t in top] for j in range(len(levels))
                   if meter.fits([t[min(len(t) - 1, j)] for t in top]))
        for gi in torch.randperm(len(groups), generator=g).tolist():  # spend the slack
            while idx[gi] > 0 and meter.fits([t[i - (k == gi)] for k, (t, i) in enumerate(zip(top, idx))]):
                idx[gi] -= 1
    widths = lambda ix: [t[i] for t, i in zip(top, ix)]
    if not meter.fits(widths(idx)):
        raise BitnestError("the initial mix does not fit the budget")
    if teacher is not None:
        teacher_lp = _logprobs(teacher, ids, batch_size)
    else:
        apply_mix(model, _mix_of(groups, [t[0] for t in top]))
        teacher_lp = _logprobs(model, ids, batch_size)

    def fitness(ix, n=None) -> float:
        apply_mix(model, _mix_of(groups, widths(ix)))
        k = len(ids) if n is None else n
        return kl_to(teacher_lp[:k], model, ids[:k], batch_size)

    def mutate(ix):
        child = list(ix)
        for _ in range(1 + rand(3)):
            for _try in range(20):
                up, down = rand(len(groups)), rand(len(groups))
                if up == down or child[up] == 0 or child[down] == len(top[down]) - 1:
                    continue
                cand = list(child)
                cand[up] -= 1
                cand[down] += 1
                if meter.fits(widths(cand)):
                    child = cand
                    break
        return child

    best = fitness(idx)
    path = [{"generation": 0, "kl": best, "bits": meter.bpw(widths(idx))}]
    bar = tqdm(range(generations), desc="evolutionary mix search", disable=not progress, dynamic_ncols=True)
    for gen in bar:
        kids = [mutate(idx) for _ in range(offspring)]
        kids = [k for k in {tuple(k): k for k in kids if k != idx}.values()]
        if not kids:
            continue
        ranked = sorted(kids, key=lambda k: fitness(k, first_stage))[:survivors]
        scored = [(fitness(k), k) for k in ranked]
        f, k = min(scored, key=lambda t: t[0])
        if f < best:
            best, idx = f, k
        path.append({"generation": gen + 1, "kl": best, "bits": meter.bpw(widths(idx))})
        bar.set_postfix(kl=f"{best:.4f}", bits=f"{path[-1]['bits']:.3f}", refresh=False)
    mix = _mix_of(groups, widths(idx))
    apply_mix(model, mix)
    return mix, path


def choose_mix(loaded, budget: float, *, strategy: str | None = None, levels: str | Sequence[int] = SEARCH_LEVELS,
               calib_samples: int = 8, calib_len: int = 256, data_dir=None, progress: bool = True) -> dict[str, int]:
    """`bitnest slice --budget B [--strategy S]`: the mix for a loaded nested checkpoint (applied in place).
    S = a layer-wise strategy, or "evo" (evolutionary search, KL to the widest slice); none: the greedy search. It measures quality on `calib_samples` C4 training sequences (or model-generated ones when the
    checkpoint has no tokenizer)."""
    from .calib.data import CalibOptions, calibration_tokens

    qc = loaded.quantization_config
    if not qc or not qc.get("nested"):
        raise BitnestError(f"{loaded.source} is not a Matryoshka checkpoint (method sliced or matquant); "
                           "Mix'n'Match serves the layers of one nested model at different widths")
    model = loaded.model
    if strategy and strategy != "evo":
        mix = strategy_mix(model, strategy, budget)
    else:
        if isinstance(levels, str):
            try:
                levels = [int(x) for x in levels.split(",") if x.strip()]
            except ValueError:
                raise BitnestError(f"--levels must be comma-separated bit-widths, got {levels!r}") from None
        positions = getattr(model.config, "max_position_embeddings", None) or calib_len
        opts = CalibOptions(calib_data="c4" if loaded.tokenizer is not None else "generate", n_calib=calib_samples,
                            calib_len=min(calib_len, positions))  # a small model's context bounds the windows
        ids = calibration_tokens(model, opts, tokenizer=loaded.tokenizer, data_dir=data_dir)  # (n, T)
        search = evo_mix if strategy == "evo" else search_mix
        mix, _ = search(model, ids, budget, levels=levels, progress=progress)
    apply_mix(model, mix)
    return mix


def mix_summary(mix: dict[str, int]) -> str:
    """"8 8 4 4 2 ..." per block, for printing."""
    return " ".join(str(g_r) for g_r in [mix[g[0]] for g in layer_groups(list(mix))])


__all__ = ["STRATEGIES", "apply_mix", "choose_mix", "current_mix", "evo_mix", "kl_to", "layer_groups", "mean_nll", "mix_summary", "nested_modules",
           "priority", "search_mix", "strategy_bits", "strategy_mix"]
