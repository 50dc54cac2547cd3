"""The block-by-block calibration driver, one for every architecture (IST-DASLab/gptq's loop, generalized).

1. Capture the first decoder block's inputs: a forward pre-hook on block 0 stores its hidden states and
   keyword arguments (attention mask, position ids, rotary `position_embeddings`, ...) and raises a
   sentinel, so nothing past the embeddings runs.
2. For each block: `process(name, block, runner)` hooks the block's Linear inputs through the runner
   (`runner.collect`), quantizes in place, and may re-run the block as often as it needs (true-sequential
   GPTQ runs it once per group of sub-layers).
3. The *quantized* block's outputs become the next block's inputs, so each block is calibrated on the
   activations it will actually see.
Memory: the model stays where it is; the driver holds one block's inputs (n · seq · hidden floats) and
whatever statistics `process` accumulates for the block in hand.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import BitnestError
from ..models.blocks import get_blocks, replace_module


# Set by a streaming run (bitnest.streaming): it supplies the blocks one at a time from the checkpoint on disk and
# writes each out when done, so a calibrated method runs on a model that is never built in memory.
block_stream: ContextVar = ContextVar("bitnest_block_stream", default=None)


class _Captured(Exception):
    """Sentinel raised by the pre-hook on block 0 once its inputs are stored."""


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def capture_block_inputs(model: nn.Module, block: nn.Module, calib: torch.Tensor, batch_size: int, device=None):
    """([hidden (b, T, C)] per batch, [kwargs] per batch) that `block` receives for the calibration tokens
    (on `device`, default the model's)."""
    inps, kws = [], []
    device = device or _device(model)

    def hook(mod, args, kwargs):
        inps.append(args[0] if args else kwargs.pop("hidden_states"))
        kws.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")})
        raise _Captured

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in calib.split(batch_size):
            try:
                model(input_ids=x.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        h.remove()
    if len(inps) != len(calib.split(batch_size)):
        raise BitnestError(f"the first decoder block of {type(model).__name__} never ran during calibration")
    return inps, kws


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockRunner:
    """Runs one block over the calibration batches; hooks hand each Linear's input to a callback."""

    def __init__(self, block: nn.Module, inps: list[torch.Tensor], kws: list[dict]):
        self.block, self.inps, self.kws = block, inps, kws

    def forward(self) -> list[torch.Tensor]:
        return [_hidden(self.block(x, **kw)) for x, kw in zip(self.inps, self.kws)]  # [(b, T, C)]

    def collect(self, callbacks: dict[nn.Module, Callable[[torch.Tensor], None]]) -> None:
        """Run the block over all batches; callbacks[m](x) gets every input x (…, in) of module m. Each batch
        stops as soon as every hooked module has seen its input (later sub-layers are not computed)."""
        seen: set[nn.Module] = set()

        def pre(mod, args, f):
            f(args[0].detach())
            seen.add(mod)
            if len(seen) == len(callbacks):
                raise _Captured

        hooks = [m.register_forward_pre_hook(lambda mod, args, f=f: pre(mod, args, f)) for m, f in callbacks.items()]
        try:
            for x, kw in zip(self.inps, self.kws):
                seen.clear()
                try:
                    self.block(x, **kw)
                except _Captured:
                    pass
        finally:
            for h in hooks:
                h.remove()

    def groups(self, names: list[str]) -> list[list[str]]:
        """The sub-layers `names` (relative to the block) in execution order, those fed the same input tensor
        grouped together: Llama gives [[q, k, v], [o], [gate, up], [down]] — the true-sequential order."""
        seen: list[tuple[torch.Tensor, list[str]]] = []  # the tensors are held so ids cannot be reused
        hooks = []
        for n in names:
            def f(mod, args, out, n=n):
                for x, g in seen:
                    if x is args[0]:
                        g.append(n)
                        return
                seen.append((args[0], [n]))
            hooks.append(self.block.get_submodule(n).register_forward_hook(f))
        try:
            self.block(self.inps[0][:1], **_first(self.kws[0]))
        finally:
            for h in hooks:
                h.remove()
        groups = [g for _, g in seen]
        ran = {n for g in groups for n in g}
        return groups + ([[n for n in names if n not in ran]] if len(ran) < len(names) else [])


def _first(kw: dict) -> dict:
    """Keyword arguments cut to the first sequence of the batch (masks / embeddings with a batch dim)."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 1 and v.shape[0] > 1:
            return v[:1]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        return v
    return {k: cut(v) for k, v in kw.items()}


@torch.no_grad()
def blockwise(model: nn.Module, calib: torch.Tensor, process: Callable[[str, nn.Module, BlockRunner], None],
              *, batch_size: int = 8, progress: bool = True, desc: str = "calibrate") -> list[torch.Tensor]:
    """Calibrate block by block: process(block_name, block, runner) quantizes the block in place; its outputs
    (computed after `process`, with the quantized weights) feed the next block. Returns the last block's
    outputs [(b, T, C)] per batch."""
    prefix, blocks = get_blocks(model)
    stream = block_stream.get()
    if stream is not None:
        return stream.blockwise(model, prefix, blocks, calib, process, batch_size, progress, desc)
    inps, kws = capture_block_inputs(model, blocks[0], calib, batch_size)
    for i, block in enumerate(tqdm(blocks, desc=desc, disable=not progress, leave=False)):
        runner = BlockRunner(block, inps, kws)
        process(f"{prefix}.{i}", block, runner)
        inps = runner.forward()  # the quantized block's outputs: the next block's inputs
    return inps


class Hessian:
    """H = 2/n · Σ x xᵀ over the n input rows seen so far (GPTQ's running average), float32 (in, in)."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, device=device)  # (in, in)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        X = x.reshape(-1, x.shape[-1]).float()  # (N, in)
        N = X.shape[0]
        self.H *= self.n / (self.n + N)
        self.n += N
        X = X * (2 / self.n) ** 0.5
        self.H += X.T @ X  # (in, in)


def sequential_quantize(block, runner: BlockRunner, names: list[str], make, stat=Hessian, sequential: bool = True) -> None:
    """For each group of sub-layers fed the same input (q/k/v, o, gate/up, down), accumulate statistics of that
    input (stat(in_features, device).add(x); default the Hessian), then replace the group's layers by
    make(names, linears, stats) -> modules. True-sequential: each group's inputs are seen with the earlier
    groups already quantized; otherwise all groups are collected in one pass."""
    groups = runner.groups(names)
    for todo in ([[g] for g in groups] if sequential else [groups]):
        lins = [[block.get_submodule(n) for n in g] for g in todo]
        stats = [stat(ls[0].in_features, ls[0].weight.device) for ls in lins]
        runner.collect({ls[0]: st.add for ls, st in zip(lins, stats)})
        for g, ls, st in zip(todo, lins, stats):
            for n, m in zip(g, make(g, ls, st)):
                replace_module(block, n, m)


def calibrated(model, config, names: list[str], calib, make, stat=Hessian, progress: bool = True,
               desc: str = "calib") -> None:
    """Block by block, replace every named Linear inside the blocks by make(full_names, linears, stats) ->
    modules, `stats` accumulated over the group's common input (true-sequential unless config says not).
    `calib`: token ids (n, L), or None / options resolved by calib.data.as_calib from `config`."""
    from .data import as_calib
    blocks_prefix, _ = get_blocks(model)
    outside = sorted(n for n in names if not n.startswith(blocks_prefix + "."))
    if outside:  # Linears outside the decoder blocks (e.g. lm_head named by a glob): no block inputs
        raise BitnestError(f"{outside[0]} is outside the decoder blocks; calibrated methods quantize block layers only")
    calib = as_calib(calib, model, config)

    def process(prefix, block, runner):
        local = [n[len(prefix) + 1:] for n in names if n.startswith(prefix + ".")]
        sequential_quantize(block, runner, local, lambda ns, lins, st: make([f"{prefix}.{n}" for n in ns], lins, st),
                            stat, sequential=getattr(config, "true_sequential", True))

    blockwise(model, calib, process, batch_size=getattr(config, "batch_size", 8), progress=progress, desc=desc)
