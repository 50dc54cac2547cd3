"""Prepare → distill → convert: quantization-aware training of selected Linears against the frozen FP model.

    result = distill_qat(model, names, prepare=lambda name, lin: OneBitLinear.from_linear(lin),
                         settings=DistillSettings(steps=500, lr=4e-4))

1. the teacher is a frozen full-precision copy of `model`;
2. `prepare(name, linear)` swaps each named Linear for a training module (fake-quant / latent weights);
   only those modules' parameters train, everything else is frozen;
3. the data: teacher-generated sequences (settings.data == "self"), a text file, or token ids passed in;
4. `train` minimizes KD + α · hidden-state MSE (train/distill.py);
5. `convert(module)` (default `module.to_packed()`) swaps each training module for its packed form, whose
   forward equals the trained one.

`DistillSettings` holds the training fields; a method's frozen config inherits them next to QuantConfig,
so `bitnest quantize --method onebit` and the Python API share one set of names.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..distributed import from_rank0
from ..errors import BitnestError
from ..models.blocks import replace_module
from .data import Batches, self_generate, text_sequences
from .distill import Distill, frozen_copy
from .twins import train_twins
from .loop import SCHEDULES, TrainResult, train
from .losses import KD_KINDS


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 300
    lr: float = 1e-3
    warmup: int | None = None  # None: 5% of the steps
    schedule: str = "cosine"
    beta1: float = 0.9
    beta2: float = 0.98  # the paper's Adam betas
    clip: float = 1.0
    batch: int = 8
    seq_len: int = 256
    data: str = "self"  # "self" (teacher-generated) or a path to a .txt/.jsonl file
    samples: int = 0  # sequences to generate or read; 0 = steps × batch (each seen once)
    gen_batch: int = 64
    hidden_loss: bool = True
    alpha: float = 1.0  # weight of the hidden-state term
    kd: str = "kl"  # "kl" or "ce" (soft cross-entropy: same gradients, offset by the teacher's entropy)
    # also train the model's RMSNorm/LayerNorm weights (they stay 16-bit; the OneBit reference freezes them)
    train_norms: bool = False
    # also train the input embeddings and the LM head (they stay 16-bit; tied ones are one matrix), as the
    # OneBit reference's full fine-tune does. With the post-LayerNorm every projection writes a unit-RMS
    # vector into the residual stream; the embeddings are what can rescale against that.
    train_embeddings: bool = False
    seed: int = 0
    ckpt_dir: str | None = None
    ckpt_every: int = 100
    fsdp: bool = False  # under torchrun: shard the student (and teacher) with FSDP2 instead of a full copy per rank

    def __post_init__(self):
        bad = []
        if self.steps < 1:
            bad.append(f"steps must be ≥ 1 (got {self.steps})")
        if self.lr <= 0:
            bad.append(f"lr must be > 0 (got {self.lr})")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            bad.append(f"warmup must be between 0 and steps (got {self.warmup})")
        if self.schedule not in SCHEDULES:
            bad.append(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if self.batch < 1 or self.seq_len < 2 or self.samples < 0:
            bad.append(f"need batch ≥ 1, seq_len ≥ 2, samples ≥ 0 (got {self.batch}, {self.seq_len}, {self.samples})")
        if self.kd not in KD_KINDS:
            bad.append(f"kd must be one of {', '.join(KD_KINDS)} (got {self.kd!r})")
        if self.alpha < 0:
            bad.append(f"alpha must be ≥ 0 (got {self.alpha})")
        if bad:
            raise BitnestError("; ".join(bad))

    @property
    def warmup_steps(self) -> int:
        return self.steps // 20 if self.warmup is None else self.warmup

    @property
    def n_samples(self) -> int:
        return self.samples or self.steps * self.batch

    @classmethod
    def of(cls, config) -> "DistillSettings":
        """The training fields of any config object that has them (a method config inheriting this)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


def training_data(teacher: nn.Module, settings: DistillSettings, tokenizer=None, ids: torch.Tensor | None = None,
                  progress: bool = True) -> torch.Tensor:
    """(N, seq_len) token ids to distill on."""
    if ids is not None:
        ids = torch.as_tensor(ids, dtype=torch.long)
        return ids if ids.dim() == 2 else ids[: ids.numel() // settings.seq_len * settings.seq_len].view(-1, settings.seq_len)
    if settings.data == "self":
        return self_generate(teacher, settings.n_samples, settings.seq_len, batch_size=settings.gen_batch,
                             seed=settings.seed, progress=progress)
    if tokenizer is None:  # the tokenizer saved next to the weights, as calibration data does
        from ..calib.data import tokenizer_of
        tokenizer = tokenizer_of(teacher)
    if tokenizer is None:
        raise BitnestError(f"training on {settings.data} needs the model's tokenizer; pass tokenizer=..., or use data='self'")
    return text_sequences(tokenizer, settings.data, settings.seq_len, limit=settings.n_samples)


def norm_weights(model: nn.Module) -> list[nn.Parameter]:
    """The affine weights of every normalization layer (RMSNorm / LayerNorm, by class name), made trainable."""
    out = []
    for mod in model.modules():
        if type(mod).__name__.endswith(("RMSNorm", "LayerNorm")) and isinstance(getattr(mod, "weight", None), nn.Parameter):
            mod.weight.requires_grad_(True)
            out.append(mod.weight)
    return out


def embedding_weights(model: nn.Module) -> list[nn.Parameter]:
    """The input embedding and LM head weights (one parameter when tied), made trainable."""
    out = []
    for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and all(w is not p for p in out):
            w.requires_grad_(True)
            out.append(w)
    return out


def distill_qat(model: nn.Module, names: list[str], prepare: Callable[[str, nn.Linear], nn.Module],
                settings: DistillSettings, *, convert: Callable[[nn.Module], nn.Module] | None = None,
                tokenizer=None, ids: torch.Tensor | None = None, progress: bool = True,
                desc: str = "distill") -> TrainResult:
    """Quantization-aware distillation of `names` in place; returns the training record."""
    if not names:
        raise BitnestError("no layers selected to train")
    hold = {"teacher": frozen_copy(model)}  # dropped as soon as training ends, before the conversion
    data = from_rank0(training_data(hold["teacher"], settings, tokenizer, ids, progress), "training tokens")

    def params(twins):
        ps = [p for m in twins.values() for p in m.parameters()]
        return ps + (norm_weights(model) if settings.train_norms else []) + \
            (embedding_weights(model) if settings.train_embeddings else [])

    def run(ps, twins):
        try:
            return train(model, Batches(data, min(settings.batch, data.shape[0]), seed=settings.seed),
                         Distill(hold["teacher"], settings.alpha, settings.hidden_loss, settings.kd),
                         steps=settings.steps, lr=settings.lr, betas=(settings.beta1, settings.beta2),
                         warmup=settings.warmup_steps, schedule=settings.schedule, clip=settings.clip,
                         params=ps, ckpt_dir=settings.ckpt_dir, ckpt_every=settings.ckpt_every, fsdp=settings.fsdp,
                         progress=progress, desc=desc)
        finally:
            hold.clear()

    def packed(twins):
        for name, m in twins.items():
            replace_module(model, name, convert(m) if convert is not None else m.to_packed())
    try:
        result = train_twins(model, names, prepare, params, run, packed, progress=progress)
    finally:
        hold.clear()
    model.eval()
    return result
