"""The shared training machinery: one loop (`train`), distillation losses, training data, and the
prepare → distill → convert driver (`distill_qat`) that quantization-aware methods build on."""
from .data import Batches, self_generate, text_sequences
from .distill import Distill, distill_terms, frozen_copy, lm_forward
from .loop import TrainResult, lr_lambda, train
from .losses import hidden_mse, kd_kl, kd_loss, soft_ce
from .qat import DistillSettings, distill_qat, training_data

__all__ = ["Batches", "Distill", "DistillSettings", "TrainResult", "distill_qat", "distill_terms", "frozen_copy",
           "hidden_mse", "kd_kl", "kd_loss", "lm_forward", "lr_lambda", "self_generate", "soft_ce",
           "text_sequences", "train", "training_data"]
