"""Data-parallel runs under torchrun: the process group, who writes, and the collectives the calibration driver uses.

`torchrun --nproc_per_node N -m bitnest.cli quantize ...` starts N processes. Each loads the model and the same
calibration tokens; calibrated methods split the calibration batches among them (calib.driver) and combine
their input statistics so every process computes the same quantized model, bit-identical to one process; only
rank 0 writes the checkpoint. The training loop (train.loop.train: MatQuant QAT, OneBit / BitNet distillation)
splits each step's global batch over the processes and sums their gradients (all_reduce_sum), so every process
holds the parameters one process would (within floating-point rounding). Without an initialized process group (or with one process) nothing changes.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group; (0, 1) without one."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def is_main() -> bool:
    """The process that writes files and prints: rank 0, or the only process."""
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        _dist().barrier()


@contextmanager
def from_env():
    """Initialize the default process group when launched by torchrun with WORLD_SIZE > 1 (gloo for CPU tensors,
    NCCL for CUDA tensors when CUDA is available), and tear it down after; otherwise do nothing."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective on `t` runs: NCCL-only groups need CUDA tensors; gloo (or a cpu:gloo,cuda:nccl group)
    takes the tensor where it is."""
    if _dist().get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """`t` as rank `src` holds it (same shape and dtype on every rank)."""
    if rank_world()[1] == 1:
        return t
    x = t.contiguous().to(_comm_device(t))
    _dist().broadcast(x, src)
    return x.to(t.device)


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """[t of rank 0, t of rank 1, ...] (same shape and dtype on every rank); exact: the values are copied."""
    if rank_world()[1] == 1:
        return [t]
    x = t.contiguous().to(_comm_device(t))
    out = [torch.empty_like(x) for _ in range(rank_world()[1])]
    _dist().all_gather(out, x)
    return [o.to(t.device) for o in out]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over the ranks (same shape and dtype on every rank), in place when `t` is where
    the collective runs; returns it."""
    if rank_world()[1] == 1:
        return t
    x = t.contiguous().to(_comm_device(t))
    _dist().all_reduce(x, op=_dist().ReduceOp.SUM)
    if x.data_ptr() != t.data_ptr():
        t.copy_(x)
    return t


def from_rank0(t: torch.Tensor, what: str = "tensor") -> torch.Tensor:
    """Rank 0's `t` on every rank, after checking that every rank holds the same shape (a one-line error naming
    `what` otherwise): seeded data generated on each rank is the same, but this makes it so whatever the kernels."""
    if rank_world()[1] == 1:
        return t
    from .errors import BitnestError

    desc = torch.full((9,), -1, dtype=torch.long)  # dim, then up to 8 sizes: the same length on every rank
    desc[0] = t.dim()
    desc[1:1 + min(t.dim(), 8)] = torch.tensor(t.shape[:8], dtype=torch.long)
    shapes = all_gather(desc)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        raise BitnestError(f"the {what} differ in shape across processes: "
                           f"{[tuple(x for x in s.tolist()[1:] if x >= 0) for s in shapes]}")
    return broadcast(t)


__all__ = ["rank_world", "is_main", "barrier", "from_env", "broadcast", "all_gather", "all_reduce_sum", "from_rank0"]
