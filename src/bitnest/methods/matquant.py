"""Matryoshka Quantization (MatQuant; Nair et al., ICML 2025; methods.md §1): one c-bit (int8) model whose
r most significant bits are a good r-bit model for every r in R — trained jointly on

    min_θ Σ_{r∈R} λ_r · L( F(S(Q(θ, c), r)), y )                                    (Eq. 7)

    quantize(model, "matquant")                                        # QAT, R = {8, 4, 2}, λ = (0.1, 0.1, 1)
    quantize(model, "matquant", flavour="omniquant", codistill="[8,4,2,8→4;2]")
    bitnest quantize --method matquant --flavour qat --bits 8,4,2 --lambdas 0.1,0.1,1 --codistill "[8,4,2,8→2]"

Flavours
  qat        θ = the target layers' weights, L = next-token cross-entropy, straight-through rounding in Q and
             S; trained with the shared loop (train/loop.py: resumable checkpoints, progress with the loss of
             every precision, tokens/s, ETA). The rest of the model stays as it is (it is not quantized).
  omniquant  block by block (calib/driver.py), model weights frozen; θ = learnable weight clipping γ, β
             (sigmoid-parametrized, per output channel or group) and, on the FFN, the learnable scale s of an
             equivalent transformation folded back into the weights at the end (methods/omniquant.py);
             L = Σ_r λ_r ‖block_fp(X) − block_q,r(X)‖²; the quantized block's outputs feed the next block.

Co-distillation (`codistill`, the paper's notation): "[8,4,2,8→2]" trains int8, int4 and int2 on the ground
truth and adds int8's (detached) outputs as a second target for int2; "[8,4,2,8→4;2]" does so for int4 and
int2; "[8,4,8→2]" trains int2 on int8's outputs alone. "->" works as well as "→". QAT distils logits
(`kd`: "kl" or "ce", same gradients), OmniQuant block outputs (squared error). `distill_fp` > 0 adds a KD
term against the full-precision model's logits to every precision (QAT).

Variants, all in this one code path: Single Precision MatQuant (precisions=(2,), int8 parameterization);
Extra Precision MatQuant (extra_precision=True: no clamp, λ = 1 for every r, layers become
nn.nested.ExtraPrecisionLinear with the extra bucket stored sparsely); the paper's "Baseline" for one
precision r is precisions=(r,), parent_bits=r (an r-bit MinMax grid trained alone with the same recipe);
"Sliced int8" is precisions=(8,) served at any r.

Output: the nested checkpoint (c-bit codes once; `bits` = the width served by default, any r ≤ c at load
time: `load_model(dir, bits=r)`, per layer: `load_quantized(dir, overrides={glob: r})`). The training forward
at every r equals the packed layer's forward at that r bit for bit (tests/test_matquant.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..calib.data import CalibOptions, as_calib
from ..errors import BitnestError
from ..grids.affine import AffineSpec
from ..models.blocks import replace_module
from ..nn.nested import MatQuantLinear
from ..train.data import Batches
from ..train.distill import frozen_copy
from ..train.loop import SCHEDULES, TrainResult, train
from ..train.twins import swap, train_twins
from ..train.losses import KD_KINDS, kd_loss
from . import QuantConfig

FLAVOURS = ("qat", "omniquant")
PAPER_PRECISIONS = (8, 4, 2)

# ------------------------------------------------------------------------------------------------ parsing


def _csv(s, conv, what: str) -> tuple:
    """"a,b,c" or a sequence -> a tuple of conv(item); a one-line error naming `what` on a bad item."""
    items = [x.strip() for x in s.split(",")] if isinstance(s, str) else list(s)
    try:
        return tuple(conv(x) for x in items if x != "")
    except (TypeError, ValueError):
        raise BitnestError(f"{what}; got {s!r}") from None


def parse_bits(s) -> tuple[int, ...]:
    """"8,4,2" (or a sequence) -> (8, 4, 2): distinct integers in 1..8."""
    bits = _csv(s, int, "precisions must be comma-separated integers in 1..8, e.g. 8,4,2")
    if not bits or any(not 1 <= b <= 8 for b in bits) or len(set(bits)) != len(bits):
        raise BitnestError(f"precisions must be distinct integers in 1..8, e.g. 8,4,2; got {s!r}")
    return bits


def parse_lambdas(s) -> tuple[float, ...]:
    """"0.1,0.1,1" (or a sequence) -> (0.1, 0.1, 1.0): non-negative, at least one positive."""
    lam = _csv(s, float, "lambdas must be comma-separated numbers, e.g. 0.1,0.1,1")
    if not lam or any(not (x >= 0) or x == float("inf") for x in lam) or not any(x > 0 for x in lam):
        raise BitnestError(f"lambdas must be finite, non-negative and not all zero; got {s!r}")
    return lam


@dataclass(frozen=True)
class CoDistill:
    """A co-distillation spec: `gt` precisions trained on the ground truth, `edges` (source, target) pairs
    where the source slice's detached outputs are a target for the target slice."""
    gt: tuple[int, ...]
    edges: tuple[tuple[int, int], ...]

    @property
    def precisions(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.gt) | {b for e in self.edges for b in e}, reverse=True))


_ARROW = re.compile(r"\s*(?:→|->)\s*")


def parse_codistill(spec: str) -> CoDistill:
    """The paper's notation: "[8,4,2,8→2]", "[8,4,2,8→4;2]", "[8,4,8→2]" ("->" accepted; brackets optional)."""
    s = spec.strip()
    bad = lambda why: BitnestError(f"bad co-distillation spec {spec!r}: {why}; write it like [8,4,2,8→2] or [8,4,2,8→4;2]")
    if s.startswith("["):
        if not s.endswith("]"):
            raise bad("unbalanced brackets")
        s = s[1:-1]
    if not s.strip():
        raise bad("it is empty")
    gt, edges = [], []

    def num(x: str) -> int:
        x = x.strip()
        if not re.fullmatch(r"\d+", x) or not 1 <= int(x) <= 8:
            raise bad(f"{x!r} is not a bit-width in 1..8")
        return int(x)

    for item in s.split(","):
        parts = _ARROW.split(item)
        if len(parts) == 1:
            b = num(parts[0])
            if b in gt:
                raise bad(f"{b} is listed twice")
            gt.append(b)
        elif len(parts) == 2:
            src = num(parts[0])
            tgts = [num(t) for t in parts[1].split(";")]
            for t in tgts:
                if t >= src:
                    raise bad(f"{src}→{t}: a slice distils from a wider one")
                if (src, t) in edges:
                    raise bad(f"{src}→{t} is listed twice")
                edges.append((src, t))
        else:
            raise bad(f"{item.strip()!r} has more than one arrow")
    if not gt:
        raise bad("no precision is trained on the ground truth")
    for src, _ in edges:
        if src not in gt:
            raise bad(f"the source {src} of a distillation edge must itself be trained (list it)")
    return CoDistill(tuple(gt), tuple(edges))


@dataclass(frozen=True)
class Plan:
    """What one training step computes: precisions in descending order (sources before their targets),
    λ per precision, the ground-truth set and the co-distillation edges."""
    order: tuple[int, ...]
    lam: tuple[tuple[int, float], ...]
    gt: frozenset
    edges: tuple[tuple[int, int], ...] = ()

    def weight(self, r: int) -> float:
        return dict(self.lam)[r]

    def sources_of(self, r: int) -> list[int]:
        return [s for s, t in self.edges if t == r]

    def is_source(self, r: int) -> bool:
        return any(s == r for s, _ in self.edges)

    def needed(self, r: int) -> bool:
        """A precision is run when it has a loss weight, or when another precision distils from it."""
        return self.weight(r) > 0 or self.is_source(r)

    @property
    def main(self) -> int:
        """The precision with the largest λ (ties: the lowest): the one the OmniQuant flavour propagates."""
        return min(self.order, key=lambda r: (-self.weight(r), r))


# ------------------------------------------------------------------------------------------------ config


def _default_lambdas(precisions: tuple[int, ...], extra_precision: bool) -> tuple[float, ...]:
    """The paper's defaults: λ = 1 for the lowest precision and 0.1 for the others ((0.1, 0.1, 1.0) for
    {8, 4, 2}); Extra Precision MatQuant uses λ = 1 everywhere."""
    low = min(precisions)
    return tuple(1.0 if extra_precision or r == low else 0.1 for r in precisions)


# Per-flavour defaults for the fields left at their "unset" value (0, -1, ""). The paper's LRs (QAT 1e-5 over
# 100M tokens; OmniQuant 1e-3 over ~1,200 steps per block) assume budgets far beyond a CPU run; these were
# chosen on ref-10m for a few hundred steps: an int2 step there is ≈ 0.065 (a quarter of a row's range), and
# at 1e-4 the weights move too little in 100 steps to change int2 codes, while 1e-3 lets the int8 slice drift.
FLAVOUR_DEFAULTS = {
    "qat": {"steps": 300, "lr": 3e-4, "schedule": "cosine", "batch": 8},
    "omniquant": {"steps": 100, "lr": 1e-2, "schedule": "constant", "batch": 4},
}


@dataclass(frozen=True)
class MatQuantConfig(CalibOptions, QuantConfig):
    bits: int | None = None  # width served by default (any r ≤ parent_bits at load time); None: max(precisions)
    targets: str | tuple[str, ...] = "ffn"  # the paper's default: FFN only
    flavour: str = "qat"  # qat | omniquant
    precisions: tuple = ()  # R; () = (8, 4, 2), or the precisions named by `codistill`
    lambdas: tuple = ()  # λ_r in the order of `precisions`; () = 1 for the lowest r, 0.1 for the others
    parent_bits: int = 8  # c: the stored grid
    codistill: str = ""  # e.g. "[8,4,2,8→2]"; "" = every precision on the ground truth only
    kd: str = "kl"  # co-distillation / FP distillation loss on logits (QAT): kl | ce
    distill_fp: float = 0.0  # QAT: weight of a KD term against the full-precision model, every precision
    extra_precision: bool = False  # no clamp; extra top bucket stored sparsely
    # training (the unset values 0 / -1 / "" take the flavour's default, FLAVOUR_DEFAULTS)
    steps: int = 0  # qat: optimizer steps; omniquant: steps per block
    lr: float = 0.0
    warmup: int = -1  # -1: 5% of the steps (qat), 0 (omniquant)
    schedule: str = ""  # cosine | linear | constant
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    batch: int = 0  # sequences per step
    n_calib: int = 0  # sequences of training / calibration data; 0: steps × batch (qat, one epoch), 128 (omniquant)
    lwc: bool = True  # omniquant: learnable weight clipping γ, β
    let: bool = True  # omniquant: learnable equivalent-transformation scales on the FFN, folded at the end
    batch_size: int = 8  # omniquant: sequences per forward when capturing and propagating block inputs
    ckpt_dir: str | None = None  # resumable training state (qat: one file; omniquant: one per block)
    ckpt_every: int = 50
    fsdp: bool = False  # qat under torchrun: shard the student (and FP teacher) with FSDP2 instead of a copy per rank

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.flavour not in FLAVOURS:
            raise BitnestError(f"matquant flavour must be one of {', '.join(FLAVOURS)}, got {self.flavour!r}")
        cd = parse_codistill(self.codistill) if self.codistill else None
        precisions = parse_bits(self.precisions) if self.precisions else (cd.precisions if cd else PAPER_PRECISIONS)
        if cd is not None and set(precisions) != set(cd.precisions):
            raise BitnestError(f"precisions {','.join(map(str, precisions))} differ from those of the co-distillation "
                               f"spec {self.codistill} ({','.join(map(str, cd.precisions))}); give one or make them agree")
        lambdas = parse_lambdas(self.lambdas) if self.lambdas else _default_lambdas(precisions, self.extra_precision)
        if len(lambdas) != len(precisions):
            raise BitnestError(f"{len(lambdas)} lambdas for {len(precisions)} precisions "
                               f"({','.join(map(str, precisions))}): give one λ per precision")
        pairs = sorted(zip(precisions, lambdas), key=lambda p: -p[0])  # descending r
        set_("precisions", tuple(p for p, _ in pairs))
        set_("lambdas", tuple(x for _, x in pairs))
        if isinstance(self.parent_bits, str):
            set_("parent_bits", int(self.parent_bits))
        if not 1 <= self.parent_bits <= 8:
            raise BitnestError(f"parent_bits must be in 1..8, got {self.parent_bits}")
        if max(self.precisions) > self.parent_bits:
            raise BitnestError(f"precision {max(self.precisions)} exceeds the stored grid's {self.parent_bits} bits (parent_bits)")
        bits = self.bits
        if isinstance(bits, str):
            bits = None if bits.lower() == "none" else int(bits)
        set_("bits", max(self.precisions) if bits is None else bits)
        if not 1 <= self.bits <= self.parent_bits:
            raise BitnestError(f"served bits must be in 1..{self.parent_bits} (parent_bits), got {self.bits}")
        for pat, b in self.overrides:
            if not 1 <= b <= self.parent_bits:
                raise BitnestError(f"override {pat}={b}: served bits must be in 1..{self.parent_bits}")
        if self.kd not in KD_KINDS:
            raise BitnestError(f"kd must be one of {', '.join(KD_KINDS)}, got {self.kd!r}")
        if self.distill_fp < 0:
            raise BitnestError(f"distill_fp must be ≥ 0, got {self.distill_fp}")
        d = FLAVOUR_DEFAULTS[self.flavour]
        for k in ("steps", "lr", "schedule", "batch"):
            if not getattr(self, k):
                set_(k, d[k])
        if self.warmup == -1:
            set_("warmup", self.steps // 20 if self.flavour == "qat" else 0)
        if not self.n_calib:
            set_("n_calib", self.steps * self.batch if self.flavour == "qat" else 128)
        bad = []
        if self.steps < 0 or self.lr <= 0 or self.batch < 1 or self.batch_size < 1 or self.ckpt_every < 1:
            bad.append(f"need steps ≥ 0, lr > 0, batch ≥ 1, batch_size ≥ 1, ckpt_every ≥ 1 (got {self.steps}, "
                       f"{self.lr}, {self.batch}, {self.batch_size}, {self.ckpt_every})")
        if self.steps >= 0 and not 0 <= self.warmup <= self.steps:  # bad steps: that is the one error to report
            bad.append(f"warmup must be between 0 and steps (got {self.warmup})")
        if self.schedule not in SCHEDULES:
            bad.append(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if self.fsdp and self.flavour != "qat":  # OmniQuant trains one block at a time, the whole of it on every rank
            bad.append("fsdp applies to the qat flavour (omniquant trains one block at a time on every rank)")
        if bad:
            raise BitnestError("; ".join(bad))
        super().__post_init__()  # CalibOptions (n_calib, calib_len) → QuantConfig (bits, group size, overrides)

    def plan(self) -> Plan:
        cd = parse_codistill(self.codistill) if self.codistill else None
        return Plan(order=self.precisions, lam=tuple(zip(self.precisions, self.lambdas)),
                    gt=frozenset(cd.gt if cd else self.precisions), edges=cd.edges if cd else ())

    @property
    def spec(self) -> AffineSpec:
        return self.affine_spec(self.parent_bits)


# ------------------------------------------------------------------------------------------------ QAT


def set_precision(mods, r: int) -> None:
    for m in mods:
        m.r = r


class MatQuantLoss:
    """loss_fn(student, ids) for the shared loop: Σ_r λ_r · (CE_r [if r ∈ gt] + Σ_{s→r} KD(logits_r, logits_s)
    [+ distill_fp · KD(logits_r, logits_fp)]), one forward per precision, widest first so a source's logits
    (detached: a target, never a path for gradients) exist before its targets run.

    Returns {"loss", "int8", "int4", "int2", "8→2", ...}: the loop shows and logs each part."""

    def __init__(self, mods: list[MatQuantLinear], plan: Plan, *, kd: str = "kl", teacher: nn.Module | None = None,
                 distill_fp: float = 0.0):
        self.mods, self.plan, self.kd, self.teacher, self.distill_fp = mods, plan, kd, teacher, distill_fp

    def logits(self, student: nn.Module, ids: torch.Tensor, r: int) -> torch.Tensor:
        set_precision(self.mods, r)
        return student(input_ids=ids, use_cache=False).logits  # (B, T, V)

    def __call__(self, student: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        plan = self.plan
        t_logits = None
        if self.teacher is not None and self.distill_fp > 0:
            with torch.no_grad():
                t_logits = self.teacher(input_ids=ids, use_cache=False).logits  # (B, T, V)
        targets: dict[int, torch.Tensor] = {}
        total, parts = None, {}
        for r in plan.order:
            if not plan.needed(r):
                continue
            logits = self.logits(student, ids, r)  # (B, T, V)
            terms = []
            if r in plan.gt:
                V = logits.shape[-1]
                ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
                parts[f"int{r}"] = ce
                terms.append(ce)
            for s in plan.sources_of(r):
                d = kd_loss(logits, targets[s], self.kd)
                parts[f"{s}→{r}"] = d
                terms.append(d)
            if t_logits is not None:
                d = kd_loss(logits, t_logits, self.kd)
                parts[f"fp→{r}"] = d
                terms.append(self.distill_fp * d)
            if plan.is_source(r):
                targets[r] = logits.detach()
            lam = plan.weight(r)
            if lam > 0 and terms:
                term = lam * sum(terms)
                total = term if total is None else total + term
        return {"loss": total, **parts}


def prepare(model: nn.Module, names: list[str], config: MatQuantConfig, *, train_weight: bool = True) -> dict[str, MatQuantLinear]:
    """Swap each named Linear for its MatQuantLinear training twin (in place); returns them by name."""
    return swap(model, names, _twin_maker(config, train_weight))


def _twin_maker(config: MatQuantConfig, train_weight: bool):
    spec = config.spec

    def twin(name: str, lin: nn.Linear) -> MatQuantLinear:
        spec.check_shape(lin.out_features, lin.in_features, name)
        return MatQuantLinear(lin, spec, clamp=not config.extra_precision, train_weight=train_weight)
    return twin


def convert(model: nn.Module, mods: dict[str, MatQuantLinear], config: MatQuantConfig) -> None:
    """Swap each training twin for its packed layer (served at config.bits_for(name))."""
    with torch.no_grad():
        for name, m in mods.items():
            replace_module(model, name, m.to_packed(config.bits_for(name)))


def run_qat(model: nn.Module, config: MatQuantConfig, names: list[str], *, calib=None, progress: bool = True) -> TrainResult:
    """MatQuant QAT in place (train/twins.py's prepare → train → convert); returns the training record."""
    from ..distributed import from_rank0
    ids = from_rank0(as_calib(calib, model, config), "training tokens")  # (N, T); under torchrun: rank 0's
    plan = config.plan()
    hold = {"teacher": frozen_copy(model) if config.distill_fp > 0 else None}  # dropped when training ends

    def run(params, mods):
        try:
            loss_fn = MatQuantLoss(list(mods.values()), plan, kd=config.kd, teacher=hold["teacher"],
                                   distill_fp=config.distill_fp)
            return train(model, Batches(ids, min(config.batch, ids.shape[0]), seed=config.seed), loss_fn,
                         steps=config.steps, lr=config.lr, betas=(config.beta1, config.beta2), warmup=config.warmup,
                         schedule=config.schedule, clip=config.grad_clip or None, params=params,
                         ckpt_dir=config.ckpt_dir, ckpt_every=config.ckpt_every, progress=progress, fsdp=config.fsdp,
                         desc=f"matquant qat R={{{','.join(map(str, plan.order))}}}")
        finally:
            hold.clear()
    try:
        result = train_twins(model, names, make=_twin_maker(config, True),
                             params=lambda mods: [p for m in mods.values() for p in (m.weight, m.bias) if p is not None],
                             run=run, convert=lambda mods: convert(model, mods, config))
    finally:
        hold.clear()
    model.eval()
    return result


__all__ = ["CoDistill", "MatQuantConfig", "MatQuantLoss", "Plan", "convert", "parse_bits", "parse_codistill",
           "parse_lambdas", "prepare", "run_qat", "set_precision"]
