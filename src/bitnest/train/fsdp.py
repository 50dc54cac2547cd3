"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the training loop, undone when training ends.

    sharded = Sharded(student, params)       # every decoder block its own group, the rest in the root's
    ... train sharded.params (DTensor shards: each rank holds 1/W of every parameter, its gradient and Adam's state)
    full = sharded.full(t)                   # a DTensor's whole tensor (a collective: every rank calls it)
    sharded.restore()                        # the student as it was, plain Parameters holding the trained values

Why undo: the methods convert the trained twins into packed layers in place (train/twins.py) and read the trained
values as ordinary tensors; fully_shard swaps each sharded module's class, hooks its forward and its state_dict
save/load, and replaces its Parameters by DTensor shards. `restore` gathers each trained value into the *original*
Parameter object (kept, with its storage freed while sharded) and takes the class and every hook off again, so the
callers' references (the parameter list, `train_twins`' requires_grad record, a loss's list of twin modules) stay
valid. What FSDP2 changes on a module is private to torch: `restore` first checks every piece it relies on (before
changing anything) and fails with a one-line error naming the torch version if a release moved one.

Memory while sharded, per rank: 1/W of every parameter, gradient and Adam state, plus the whole weights of the group
running (one block; the root group — embeddings, final norm, LM head — stays whole from the forward to the end of
the backward). Before sharding and when giving the model back each rank holds the whole student (and teacher).
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
        self._kept: set[int] = set()  # ids of the Parameters whose values `restore` gathers (not a dropped teacher's)
        self._shard(model, keep=True)
        self.params = [self._registered(p) for p in self.orig]  # the shards, where each original was registered
        self._free()

    def also(self, other: nn.Module, keep: bool = True) -> None:
        """Shard another model too (a frozen teacher: forward only). `restore` takes FSDP off it as well, and gives
        its values back only with `keep` (a teacher dropped after training need not be gathered whole again)."""
        self._shard(other, keep)
        self._free()

    def _shard(self, model: nn.Module, keep: bool) -> None:
        from torch.distributed.fsdp import fully_shard

        owners = _owners(model)
        groups = _groups(model)
        _check_dtypes(groups)
        self._all.update({id(p): (p, owners[id(p)]) for p in model.parameters()})
        if keep:
            self._kept.update(id(p) for p in model.parameters())
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
        """`full` split as the DTensor `like` is; `full` itself otherwise. Every rank passes the same `full` (read
        from the same file) and keeps its own piece: nothing is sent (src_data_rank=None)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(like, DTensor):
            return full
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)

    def _undo_plan(self) -> list[tuple[nn.Module, type, object]]:
        """(module, its class before fully_shard, its FSDP state) per group, after checking that everything
        `restore` takes off is where this torch keeps it; a one-line error (nothing changed yet) otherwise."""
        import importlib

        from torch.distributed.fsdp import FSDPModule

        where = f"cannot give the model back from FSDP on torch {torch.__version__}"
        contract = importlib.import_module("torch.distributed._composable.contract")
        cs = importlib.import_module("torch.distributed._composable_state")
        if not all(hasattr(contract, k) for k in ("STATE_KEY", "REGISTRY_KEY")) or not hasattr(cs, "_module_state_mapping"):
            raise BitnestError(f"{where}: its composable-API registry moved; train without fsdp")
        plan = []
        for g in self._groups:
            if not isinstance(g, FSDPModule):
                raise BitnestError(f"{where}: {type(g).__name__} is not an FSDP module; train without fsdp")
            state = g._get_fsdp_state()
            bases = [b for b in type(g).__bases__ if b is not FSDPModule]
            groups = getattr(state, "_fsdp_param_groups", None)
            if len(bases) != 1 or groups is None or any(getattr(state, h, None) is None for h in _FORWARD_HOOKS):
                raise BitnestError(f"{where}: its FSDP state or class layout ({type(g).__name__}) differs; train "
                                   "without fsdp")
            for pg in groups:
                if not all(hasattr(pg, k) for k in _GROUP_HOOKS) or \
                        not all(hasattr(fp, "_post_load_hook_handle") for fp in pg.fsdp_params):
                    raise BitnestError(f"{where}: its FSDP parameter groups differ; train without fsdp")
            plan.append((g, bases[0], state))
        return plan

    def restore(self) -> None:
        """Put the trained values into the original Parameters and take FSDP off every module (collective: one
        gather per parameter, in the same order on every rank)."""
        import importlib

        plan = self._undo_plan()
        with torch.no_grad():  # one parameter at a time: the whole model, not twice it, at the peak
            for p, regs in self._all.values():
                v = self.full(self._registered(p).detach()).clone() if id(p) in self._kept else p.data
                p.data = v
                for mod, attr in regs:
                    mod._parameters[attr] = p
        contract = importlib.import_module("torch.distributed._composable.contract")
        cs = importlib.import_module("torch.distributed._composable_state")
        for g, cls, state in reversed(plan):
            for h in _FORWARD_HOOKS:
                getattr(state, h).remove()
            for pg in state._fsdp_param_groups:  # state_dict save / load hooks on every module holding a parameter
                for k in _GROUP_HOOKS:
                    for handle in getattr(pg, k).values():
                        handle.remove()
                    getattr(pg, k).clear()
                for fp in pg.fsdp_params:
                    fp._post_load_hook_handle.remove()
            g.__class__ = cls
            # fully_shard's entries only (another composable API's stay): a later run may shard the module again
            states = g.__dict__.get(contract.STATE_KEY, {})  # keyed by the function fully_shard wraps
            for k in [k for k in states if getattr(k, "__name__", "") == "fully_shard"]:
                del states[k]
            g.__dict__.get(contract.REGISTRY_KEY, {}).pop("fully_shard", None)
            cs._module_state_mapping.pop(g, None)
        for g in self._groups:  # the flags fully_shard sets for torch.compile
            for mod in g.modules():
                mod.__dict__.pop("_is_fsdp_managed_module", None)
                mod.__dict__.pop("_fsdp_use_orig_params", None)


_FORWARD_HOOKS = ("_pre_forward_hook_handle", "_post_forward_hook_handle")
_GROUP_HOOKS = ("_module_to_pre_save_state_dict_hook_handle", "_module_to_pre_load_state_dict_hook_handle")


def _check_dtypes(groups: list[nn.Module]) -> None:
    """FSDP2 needs the trained parameters of one group to share a dtype; say so before sharding (it would assert at
    the first forward)."""
    seen: set[int] = set()
    for g in groups:
        ps = [p for p in g.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        dtypes = {p.dtype for p in ps if p.requires_grad}
        if len(dtypes) > 1:
            raise BitnestError(f"fsdp needs the trained parameters of each block to share a dtype; {type(g).__name__} "
                               f"trains {', '.join(sorted(str(d).replace('torch.', '') for d in dtypes))} ones "
                               "(e.g. train_norms on a half-precision model); train without fsdp or load the model in fp32")


__all__ = ["Sharded", "available"]
