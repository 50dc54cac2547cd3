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

Data-parallel (`calibrated` under torchrun, world size W > 1, bitnest.distributed): rank r takes the calibration
batches b ≡ r (mod W) and captures / forwards only those; the blocks' Hessians are combined so that every rank
holds the H one process computes over all batches in order, bit for bit (ShardedRunner), and every rank then runs
the same deterministic per-layer solve (GPTQ), so all ranks end with identical quantized blocks.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_gather, from_rank0, rank_world
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
    (on `device`, default the model's). `calib`: token ids (n, L) cut into batches of `batch_size`, or the
    list of batches itself."""
    batches = list(calib.split(batch_size)) if isinstance(calib, torch.Tensor) else list(calib)
    inps, kws = [], []
    device = device or _device(model)

    def hook(mod, args, kwargs):
        inps.append(args[0] if args else kwargs.pop("hidden_states"))
        kws.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")})
        raise _Captured

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in batches:
            try:
                model(input_ids=x.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        h.remove()
    if len(inps) != len(batches):
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


class ShardedRunner(BlockRunner):
    """One rank's BlockRunner in a data-parallel calibration: `inps`/`kws` are its batches, global batches
    rank, rank + W, rank + 2W, … of `n_batches`. `forward` runs them; `collect` feeds Hessians only
    (Hessian.add callbacks) and leaves every rank with the Hessian one process computes over all batches in order.

    Round r runs global batches rW … rW + W − 1, one per rank. Each rank counts its batch's input rows N_b, the
    counts are gathered, so each rank knows the running row count n_b after its batch and forms the term
    T_b = (X_b·√(2/n_b))ᵀ(X_b·√(2/n_b)) exactly as Hessian.add would; the terms are gathered (copied, not summed)
    and every rank replays H ← H·n/(n+N_b) + T_b in global batch order: the same floating-point operations
    in the same order as one process, so the same bits (given the same matmul kernels and thread count)."""

    def __init__(self, block: nn.Module, inps: list[torch.Tensor], kws: list[dict], n_batches: int):
        super().__init__(block, inps, kws)
        self.rank, self.world = rank_world()
        self.rounds = -(-n_batches // self.world)

    def collect(self, callbacks: dict[nn.Module, Callable[[torch.Tensor], None]]) -> None:
        hess = []
        for f in callbacks.values():
            st = getattr(f, "__self__", None)
            if not isinstance(st, Hessian) or getattr(f, "__func__", None) is not Hessian.add:
                raise BitnestError(f"{type(st or f).__name__} statistics are not data-parallel; run this method on "
                                   "one process (without torchrun)")
            hess.append(st)
        mods = list(callbacks)
        got: dict[nn.Module, torch.Tensor] = {}
        twice: set[nn.Module] = set()

        def pre(mod, args):
            if mod in got:  # fed twice in one batch: flagged in the counts, so every rank raises together
                twice.add(mod)
                return
            got[mod] = args[0].detach()
            if len(got) == len(mods):
                raise _Captured

        hooks = [m.register_forward_pre_hook(pre) for m in mods]
        try:
            for r in range(self.rounds):
                got.clear()
                twice.clear()
                if r < len(self.inps):
                    try:
                        self.block(self.inps[r], **self.kws[r])
                    except _Captured:
                        pass
                self._merge(mods, hess, got, twice)
        finally:
            for h in hooks:
                h.remove()

    def _merge(self, mods, hess, got, twice) -> None:
        rows = [-1 if m in twice else got[m].reshape(-1, got[m].shape[-1]).shape[0] if m in got else 0 for m in mods]
        counts = torch.stack(all_gather(torch.tensor(rows, dtype=torch.long))).tolist()  # [rank][module]
        if any(c < 0 for cs in counts for c in cs):
            raise BitnestError("a hooked layer ran more than once in one calibration batch; data-parallel "
                               "calibration needs one input per layer and batch; run it on one process")
        for i, (m, st) in enumerate(zip(mods, hess)):
            Ns = [cs[i] for cs in counts]  # rows of this round's batches, in global batch order
            if not any(Ns):
                continue
            if m in got:
                X = got[m].reshape(-1, got[m].shape[-1]).float()  # (N, in)
                T = Hessian.term(X, st.n + sum(Ns[:self.rank + 1]))
            else:  # this rank has no batch this round (the last round of an uneven split)
                T = torch.zeros_like(st.H)
            for N, Tb in zip(Ns, all_gather(T)):
                if N:
                    st.merge(N, Tb)


@torch.no_grad()
def blockwise(model: nn.Module, calib: torch.Tensor, process: Callable[[str, nn.Module, BlockRunner], None],
              *, batch_size: int = 8, progress: bool = True, desc: str = "calibrate",
              data_parallel: bool = False) -> list[torch.Tensor]:
    """Calibrate block by block: process(block_name, block, runner) quantizes the block in place; its outputs
    (computed after `process`, with the quantized weights) feed the next block. Returns the last block's
    outputs [(b, T, C)] per batch (this rank's batches when data-parallel).
    `data_parallel`: under an initialized process group of W > 1 ranks, each rank runs every W-th batch and
    `process` gets a ShardedRunner (Hessian statistics only); the caller's tokens must be the same on all ranks."""
    prefix, blocks = get_blocks(model)
    rank, world = rank_world() if data_parallel else (0, 1)
    stream = block_stream.get()
    if stream is not None:
        if world > 1:
            raise BitnestError("a streaming run (--stream) calibrates in one process; run it without torchrun")
        return stream.blockwise(model, prefix, blocks, calib, process, batch_size, progress, desc)
    batches = list(calib.split(batch_size))
    if len(batches) < world:
        raise BitnestError(f"{len(batches)} calibration batches cannot be split over {world} processes; use fewer "
                           "processes, a smaller batch_size or more calibration sequences")
    inps, kws = capture_block_inputs(model, blocks[0], batches[rank::world], batch_size)
    for i, block in enumerate(tqdm(blocks, desc=desc, disable=not progress or rank != 0, leave=False)):
        runner = BlockRunner(block, inps, kws) if world == 1 else ShardedRunner(block, inps, kws, len(batches))
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
        self.merge(X.shape[0], self.term(X, self.n + X.shape[0]))

    @staticmethod
    def term(X: torch.Tensor, n: int) -> torch.Tensor:
        """(X·√(2/n))ᵀ(X·√(2/n)), (in, in): the batch X (N, in)'s addend when n rows (these included) are seen."""
        X = X * (2 / n) ** 0.5
        return X.T @ X

    def merge(self, N: int, T: torch.Tensor) -> None:
        """Fold in a batch of N rows whose term (`term`, with n = self.n + N) is T."""
        self.H *= self.n / (self.n + N)
        self.n += N
        self.H += T


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


def require_block_layers(model, names: list[str], what: str) -> None:
    """Refuse Linears outside the decoder blocks (e.g. lm_head named by a glob): the block loop never feeds them."""
    prefix, _ = get_blocks(model)
    outside = sorted(n for n in names if not n.startswith(prefix + "."))
    if outside:
        raise BitnestError(f"{outside[0]} is outside the decoder blocks; {what} block layers only")


def calibrated(model, config, names: list[str], calib, make, stat=Hessian, progress: bool = True,
               desc: str = "calib") -> None:
    """Block by block, replace every named Linear inside the blocks by make(full_names, linears, stats) ->
    modules, `stats` accumulated over the group's common input (true-sequential unless config says not).
    `calib`: token ids (n, L), or None / options resolved by calib.data.as_calib from `config`."""
    from .data import as_calib
    require_block_layers(model, names, "calibrated methods quantize")
    world = rank_world()[1]
    if world > 1 and stat is not Hessian:
        raise BitnestError(f"{desc}: its calibration statistics are not data-parallel; run it on one process "
                           "(without torchrun)")
    calib = as_calib(calib, model, config)
    if block_stream.get() is None:  # rank 0's tokens everywhere (seeded, but a generated set depends on the kernels)
        calib = from_rank0(calib, "calibration tokens")

    def process(prefix, block, runner):
        local = [n[len(prefix) + 1:] for n in names if n.startswith(prefix + ".")]
        sequential_quantize(block, runner, local, lambda ns, lins, st: make([f"{prefix}.{n}" for n in ns], lins, st),
                            stat, sequential=getattr(config, "true_sequential", True))

    blockwise(model, calib, process, batch_size=getattr(config, "batch_size", 8), progress=progress, desc=desc,
              data_parallel=True)
