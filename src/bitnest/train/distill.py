"""Knowledge distillation from a frozen teacher: the loss function the shared loop calls every step.

    L = KD(student logits, teacher logits) + α · Σ_layers MSE(normalized hidden states)   (OneBit, α = 1)

`Distill(teacher, ...)` is a `loss_fn(student, batch) -> {"loss", "kd"[, "hidden"]}`; methods that train
several precisions at once (MatQuant) call `distill_terms` once per precision and sum.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .losses import hidden_mse, kd_loss


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every parameter frozen: the full-precision teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def lm_forward(model: nn.Module, ids: torch.Tensor, hidden: bool) -> tuple[torch.Tensor, tuple | None]:
    """(logits (B, T, V), hidden states after each block or None) of a Hugging Face causal LM."""
    out = model(input_ids=ids, output_hidden_states=hidden, use_cache=False)
    hs = tuple(out.hidden_states[1:]) if hidden else None  # [0] is the embedding output: never quantized
    return out.logits, hs


def distill_terms(student_out, teacher_out, alpha: float = 1.0, kd: str = "kl") -> dict[str, torch.Tensor]:
    """{"loss", "kd"[, "hidden"]} from (logits, hidden) pairs as `lm_forward` returns them."""
    s_logits, s_hidden = student_out
    t_logits, t_hidden = teacher_out
    terms = {"kd": kd_loss(s_logits, t_logits, kd)}
    loss = terms["kd"]
    if s_hidden is not None and t_hidden is not None and alpha:
        terms["hidden"] = hidden_mse(s_hidden, t_hidden)
        loss = loss + alpha * terms["hidden"]
    return {"loss": loss, **terms}


class Distill:
    """loss_fn(student, ids) for `train`: KD against `teacher` plus α × the hidden-state term."""

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, hidden: bool = True, kd: str = "kl"):
        self.teacher, self.alpha, self.hidden, self.kd = teacher, alpha, hidden and alpha > 0, kd
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), kd)  # validates `kd` now, not at step 1

    @torch.no_grad()
    def targets(self, ids: torch.Tensor):
        t_dev = next(self.teacher.parameters()).device
        logits, hs = lm_forward(self.teacher, ids.to(t_dev), self.hidden)
        return logits.to(ids.device), None if hs is None else tuple(h.to(ids.device) for h in hs)

    def __call__(self, student: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_out = self.targets(ids)
        return distill_terms(lm_forward(student, ids, self.hidden), teacher_out, self.alpha, self.kd)
