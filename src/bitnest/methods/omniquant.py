"""The OmniQuant flavour of MatQuant (methods.md §1): block-by-block reconstruction with the model weights frozen.

For each decoder block (calib/driver.py `blockwise`: capture → process → propagate the quantized outputs):
1. Y = block_fp(X) on the block's calibration inputs X (the outputs of the already-quantized blocks before it);
2. every target Linear becomes a MatQuantLinear with frozen weights and learnable clipping γ, β ∈ (0, 1) per
   output channel (per group with groups), γ = σ(ℓ), ℓ initialized at 4 (γ ≈ 0.98) as OmniQuant does:
   α = (γ·max(w) − β·min(w)) / (2^c − 1), z = −β·min(w)/α;
3. on the FFN, a learnable equivalent transformation (LET) scale: Llama's MLP is
   down(act(gate(x)) ⊙ up(x)) after an RMSNorm, so
     s₁ (hidden): gate and up quantize W ⊙ s₁ (columns) and the norm's weight is divided by s₁,
     s₂ (intermediate): up quantizes W ⊘ s₂ (rows) and down quantizes W ⊙ s₂ (columns) —
   both exact before quantization, both folded into the stored weights at the end. The folded norm weight
   is rounded to bfloat16 inside the training forward (straight-through), so it is stored exactly in any
   storage dtype and the deployed forward equals the trained one;
4. the shared loop (train/loop.py) minimizes Σ_r λ_r · mean‖Y − block_q,r(X)‖² (+ co-distillation terms
   mean‖block_q,s(X) − block_q,r(X)‖² with s's output detached) over the learnable parameters only;
5. the layers are packed and the block, served at the precision with the largest λ, produces the next block's
   inputs. Memory: one block, its inputs X and targets Y.

The shift δ of OmniQuant's LET is not learned: its effect, ((X − δ) ⊘ s)·Q(W ⊙ s) + δW, is a bias
δ(W − Q_r(W ⊙ s) ⊘ s) that depends on the served precision r, so one stored bias cannot be exact for every
slice of a nested model; and an RMSNorm (no bias) cannot absorb −δ. OmniQuant itself disables the shift for
LLaMA-family models. Blocks without a Llama-style MLP/RMSNorm get clipping only.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ..calib.data import as_calib
from ..calib.driver import _first, _hidden, blockwise
from ..models.blocks import replace_module
from ..nn.nested import MatQuantLinear
from ..train.data import Batches
from ..train.loop import TrainResult, train
from ..train.twins import train_twins
from .matquant import MatQuantConfig, Plan, set_precision


def _is_rmsnorm(m: nn.Module) -> bool:
    """w ⊙ x̂ RMSNorms (Llama, Mistral, Qwen2); Gemma's (1 + w) ⊙ x̂ is excluded."""
    name = type(m).__name__
    return name.endswith("RMSNorm") and "Gemma" not in name and isinstance(getattr(m, "weight", None), torch.Tensor)


class ScaledNorm(nn.Module):
    """An RMSNorm computing with weight w ⊘ e^u, rounded to bfloat16 with a straight-through estimator."""

    def __init__(self, norm: nn.Module, log_scale: nn.Parameter):
        super().__init__()
        self.norm, self.log_scale = norm, log_scale

    def folded_weight(self) -> torch.Tensor:
        w = self.norm.weight.float() * (-self.log_scale).exp()  # (C,)
        return w + (w.to(torch.bfloat16).float() - w).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.norm, {"weight": self.folded_weight()}, (x,))


def attach_let(block: nn.Module, mods: dict[str, MatQuantLinear]) -> tuple[list[nn.Parameter], list[tuple[str, ScaledNorm]]]:
    """Learnable LET scales on a Llama-style MLP whose layers are all being quantized; returns (params, norms)."""
    gate, up, down = (mods.get(f"mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj"))
    params, norms = [], []
    norm = getattr(block, "post_attention_layernorm", None)
    if gate is not None and up is not None and norm is not None and _is_rmsnorm(norm):
        u1 = nn.Parameter(torch.zeros(gate.in_features, device=gate.weight.device))  # (C,)
        gate.in_log_scale = u1
        up.in_log_scale = u1
        sn = ScaledNorm(norm, u1)
        block.post_attention_layernorm = sn
        params.append(u1)
        norms.append(("post_attention_layernorm", sn))
    if up is not None and down is not None:
        u2 = nn.Parameter(torch.zeros(down.in_features, device=down.weight.device))  # (I,)
        up.out_log_scale = u2
        down.in_log_scale = u2
        params.append(u2)
    return params, norms


@torch.no_grad()
def finalize_block(block: nn.Module, mods: dict[str, MatQuantLinear], norms: list[tuple[str, ScaledNorm]], r: int) -> None:
    """Fold the LET scales (into the norms: exactly the bf16 values trained with; into the quantized weights:
    MatQuantLinear.to_packed packs Q(effective weight)) and pack every layer, served at r."""
    for attr, sn in norms:
        sn.norm.weight.data.copy_(sn.folded_weight().to(sn.norm.weight.dtype))
        setattr(block, attr, sn.norm)
    for n, m in mods.items():
        replace_module(block, n, m.to_packed(r))


class BlockLoss:
    """loss_fn(block, batch) for the shared loop: Σ_r λ_r (mean‖Y − block_q,r(X)‖² + co-distillation terms)."""

    def __init__(self, mods: list[MatQuantLinear], plan: Plan, kw: dict):
        self.mods, self.plan, self.kw = mods, plan, kw

    def __call__(self, block: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        x, y = batch["x"], batch["y"]  # (b, T, C) each
        outs, total, parts = {}, None, {}
        for r in self.plan.order:
            if not self.plan.needed(r):
                continue
            set_precision(self.mods, r)
            out = _hidden(block(x, **self.kw))  # (b, T, C)
            terms = []
            if r in self.plan.gt:
                parts[f"int{r}"] = (out - y).pow(2).mean()
                terms.append(parts[f"int{r}"])
            for s in self.plan.sources_of(r):
                parts[f"{s}→{r}"] = (out - outs[s]).pow(2).mean()
                terms.append(parts[f"{s}→{r}"])
            if self.plan.is_source(r):
                outs[r] = out.detach()
            lam = self.plan.weight(r)
            if lam > 0 and terms:
                total = lam * sum(terms) if total is None else total + lam * sum(terms)
        return {"loss": total, **parts}


def run_omniquant(model: nn.Module, config: MatQuantConfig, names: list[str], *, calib=None,
                  progress: bool = True) -> TrainResult:
    """MatQuant with OmniQuant, in place. Returns a TrainResult whose `tokens` are the calibration tokens each
    block trained on (steps × batch × seq), `steps` the steps per block, `history` every block's records."""
    ids = as_calib(calib, model, config)  # (N, T)
    plan, spec = config.plan(), config.spec
    history, seconds = [], 0.0
    done: set[str] = set()

    def process(prefix: str, block: nn.Module, runner) -> None:
        nonlocal seconds
        local = [n[len(prefix) + 1:] for n in names if n.startswith(prefix + ".")]
        if not local:
            return
        t0 = time.perf_counter()
        X = torch.cat(runner.inps)  # (N, T, C): the quantized model's inputs to this block
        Y = torch.cat(runner.forward())  # (N, T, C): the full-precision block's outputs on them
        kw = _first(runner.kws[0])  # masks / rotary embeddings, batch dim 1: broadcast over any batch
        norms = []

        def twin(n, lin):
            return MatQuantLinear(lin, spec, clamp=not config.extra_precision, train_weight=False, learn_clip=config.lwc)

        def params(mods):
            let_params, lets = attach_let(block, mods) if config.let else ([], [])
            norms.extend(lets)
            return [m.clip_logits for m in mods.values() if m.clip_logits is not None] + let_params

        def run(params, mods):
            if not (params and config.steps):
                return
            rows = Batches(torch.arange(X.shape[0])[:, None], min(config.batch, X.shape[0]), seed=config.seed)

            def batches(step):
                idx = rows(step)[:, 0]
                return {"input_ids": ids[idx], "x": X[idx], "y": Y[idx]}  # input_ids: the tokens, for counting

            res = train(block, batches, BlockLoss(list(mods.values()), plan, kw), steps=config.steps, lr=config.lr,
                        betas=(config.beta1, config.beta2), warmup=config.warmup, schedule=config.schedule,
                        clip=config.grad_clip or None, params=params,
                        ckpt_dir=Path(config.ckpt_dir) / prefix if config.ckpt_dir else None,
                        ckpt_every=config.ckpt_every, progress=progress, desc=f"omniquant {prefix}",
                        data_parallel=False)  # every rank holds all of X, Y: each trains the whole block alike
            history.extend({"block": prefix, **h} for h in res.history)

        # finalized at the most-weighted precision, whose outputs feed the next block
        train_twins(block, local, twin, params, run, lambda mods: finalize_block(block, mods, norms, plan.main))
        done.update(f"{prefix}.{n}" for n in local)
        seconds += time.perf_counter() - t0

    blockwise(model, ids, process, batch_size=config.batch_size, progress=progress, desc="matquant omniquant")
    missing = [n for n in names if n not in done]
    if missing:
        from ..errors import BitnestError
        raise BitnestError(f"{missing[0]} is outside the decoder blocks; the omniquant flavour quantizes block layers only")
    for n in names:
        model.get_submodule(n).serve_bits = config.bits_for(n)
    model.eval()
    return TrainResult(steps=config.steps, tokens=config.steps * config.batch * ids.shape[1], seconds=seconds,
                       history=history)
