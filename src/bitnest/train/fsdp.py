"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the training loop, undone when training ends.

    sharded = Sharded(student, params)       # every decoder block its own group, the rest in the root's
    ... train sharded.params (DTensor shards: each rank holds 1/W of every parameter, its gradient and Adam's state)
    full = sharded.full(t)                   # a DTensor's whole tensor (a collective: every rank calls it)
    sharded.restore()                        # the student as it was, plain Parameters holding the trained values

Why undo: the methods convert the trained twins into packed layers in place (train/twins.py) and read the trained
values as ordinary tensors; fully_shard swaps each sharded module's class, hooks its forward and replaces its
Parameters by DTensor shards. `restore` gathers each trained value into the *original* Parameter object (kept, with
its storage freed while sharded, so memory is what FSDP promises) and takes the class and hooks off again, so the
callers' references (the parameter list, `train_twins`' requires_grad record, a loss's list of twin modules) stay
valid. What FSDP2 changes on a module is private to torch; `restore` checks each piece it relies on and fails with
a one-line error naming the torch version if a release moves it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import BitnestError


def available() -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: F401
    except ImportError:
        return False
    return True


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(Parameter) -> every (module, attribute) that registers it (a tied weight has two)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mod, attr))
    return out


def _groups(model: nn.Module) -> list[nn.Module]:
    """What gets its own FSDP group, bottom-up: each decoder block (when the student has them), then the root."""
    from ..models.blocks import get_blocks

    try:
        _, blocks = get_blocks(model)
    except BitnestError:  # one block trained alone (OmniQuant), or a model without a block list: one group
        blocks = []
    return [*blocks, model]


class Sharded:
    """`model` under FSDP2 on a 1-D mesh of every rank, its `params` (the ones to train) replaced by their shards."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]):
        from torch.distributed.device_mesh import init_device_mesh

        from ..distributed import rank_world

        self.model = model
        self.orig = list(params)
        device = next(model.parameters()).device
        self._mesh = init_device_mesh(device.type, (rank_world()[1],))
        self._all: dict[int, tuple[nn.Parameter, list]] = {}  # every sharded Parameter with its registrations
        self._groups: list[nn.Module] = []
        self._shard(model)
        self.params = [self._registered(p) for p in self.orig]  # the shards, where each original was registered
        self._free()

    def also(self, other: nn.Module) -> None:
        """Shard another model too (a frozen teacher: forward only), given back by `restore` as well."""
        self._shard(other)
        self._free()

    def _shard(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        owners = _owners(model)
        self._all.update({id(p): (p, owners[id(p)]) for p in model.parameters()})
        groups = _groups(model)
        for g in groups:
            fully_shard(g, mesh=self._mesh, reshard_after_forward=True)  # shards are what the optimizer steps
        self._groups += groups

    def _free(self) -> None:
        """The originals keep no storage while sharded (their values live in the shards)."""
        with torch.no_grad():
            for p, _ in self._all.values():
                if p.numel():
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def _registered(self, p: nn.Parameter) -> nn.Parameter:
        mod, attr = self._all[id(p)][1][0]
        return mod._parameters[attr]

    @staticmethod
    def full(t: torch.Tensor) -> torch.Tensor:
        """The whole tensor of a DTensor shard (a collective); any other tensor as it is."""
        from torch.distributed.tensor import DTensor

        return t.full_tensor() if isinstance(t, DTensor) else t

    @staticmethod
    def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`full` split as the DTensor `like` is (every rank passes the same `full`); `full` itself otherwise."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(like, DTensor):
            return full
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)

    def restore(self) -> None:
        """Put the trained values into the original Parameters and take FSDP off every module (collective)."""
        import importlib

        from torch.distributed.fsdp import FSDPModule

        with torch.no_grad():
            values = [(p, regs, self.full(self._registered(p).detach()).clone()) for p, regs in self._all.values()]
        cs = importlib.import_module("torch.distributed._composable_state")
        contract = importlib.import_module("torch.distributed._composable.contract")  # the module, not its function
        for g in reversed(self._groups):
            if not isinstance(g, FSDPModule):
                continue
            state = g._get_fsdp_state()
            for h in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
                handle = getattr(state, h, None)
                if handle is None:
                    raise BitnestError(f"cannot undo FSDP on torch {torch.__version__}: its state has no {h}; "
                                       "train without fsdp")
                handle.remove()
            bases = [b for b in type(g).__bases__ if b is not FSDPModule]
            if len(bases) != 1:
                raise BitnestError(f"cannot undo FSDP on torch {torch.__version__}: unexpected class layout "
                                   f"{type(g).__name__}; train without fsdp")
            g.__class__ = bases[0]
            # fully_shard's records of the module: a later run (OmniQuant's next block, another call) may shard again
            for key in (getattr(contract, "STATE_KEY", None), getattr(contract, "REGISTRY_KEY", None)):
                if key is not None:
                    g.__dict__.pop(key, None)
            getattr(cs, "_module_state_mapping", {}).pop(g, None)
        for p, regs, v in values:
            p.data = v
            for mod, attr in regs:
                mod._parameters[attr] = p
        for g in self._groups:  # the flags fully_shard sets for torch.compile
            for mod in g.modules():
                mod.__dict__.pop("_is_fsdp_managed_module", None)
                mod.__dict__.pop("_fsdp_use_orig_params", None)


__all__ = ["Sharded", "available"]
