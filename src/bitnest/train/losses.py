"""Distillation losses on the outputs of a causal LM (teacher frozen, student being quantized).

All are means over token positions, so their size does not depend on batch or sequence length.

  kd_kl        KL(teacher ‖ student) of the next-token distributions — 0 when the student equals the teacher
  soft_ce      −Σ p_teacher · log p_student — the paper's "soft cross-entropy"; equals kd_kl plus the
               teacher's entropy (a constant), so the two give identical gradients
  hidden_mse   OneBit's hidden-state term: Σ over layers of the mean over tokens of ‖t̂ − ŝ‖², with t̂, ŝ
               the L2-normalized teacher and student hidden states (the reference code's definition)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import BitnestError

KD_KINDS = ("kl", "ce")


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(p_t ‖ p_s); logits (..., V)."""
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)  # (N, V)
    return F.kl_div(s, t, log_target=True, reduction="sum") / s.shape[0]


def soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of −Σ_v p_t(v) log p_s(v); logits (..., V)."""
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)  # (N, V)
    p_t = F.softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)  # (N, V)
    return -(p_t * s).sum() / s.shape[0]


def kd_loss(student_logits, teacher_logits, kind: str = "kl", temperature: float = 1.0) -> torch.Tensor:
    if kind == "kl":
        return kd_kl(student_logits, teacher_logits, temperature)
    if kind == "ce":
        return soft_ce(student_logits, teacher_logits, temperature)
    raise BitnestError(f"unknown distillation loss {kind!r}; choose one of {', '.join(KD_KINDS)}")


def hidden_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_l mean_tokens ‖normalize(t_l) − normalize(s_l)‖²; each hidden state (..., C)."""
    if len(student_hidden) != len(teacher_hidden):
        raise BitnestError(f"student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_hidden, teacher_hidden):
        C = s.shape[-1]
        s_hat = F.normalize(s.float().reshape(-1, C), p=2, dim=-1)  # (N, C)
        t_hat = F.normalize(t.float().reshape(-1, C), p=2, dim=-1)  # (N, C)
        total = total + (s_hat - t_hat).pow(2).sum(-1).mean()
    return total
