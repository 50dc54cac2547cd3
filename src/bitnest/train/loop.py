"""The one training loop (OneBit distillation, MatQuant QAT, ...): Adam, linear warm-up then cosine
decay, gradient clipping, a progress bar with the loss and its named parts, tokens/s and ETA, and
resumable checkpoints.

    result = train(student, batches, loss_fn, steps=1000, lr=4e-4, warmup=50, ckpt_dir="runs/x")

- `batches`: a function step -> batch (e.g. `data.Batches`) or a sequence indexed by step mod its length.
  A batch is a (B, T) tensor of token ids, or a dict/tuple holding one (tokens are counted from it).
- `loss_fn(student, batch)`: a scalar tensor, or a dict with "loss" plus any named parts to display and
  log (e.g. {"loss", "kd", "hidden"} or one entry per precision).
- `params`: what to optimize (default: every student parameter with requires_grad).
- Checkpoints (`ckpt_dir/train_state.pt`, written to a temporary file and renamed, so an interruption
  never leaves a torn file): the trained parameters, Adam's state, the scheduler, the step, the loss
  history and every RNG state. With `resume=True` a run restarted from the same initial model continues
  where the checkpoint left off and ends bit-identical to an uninterrupted run (the data is a function of
  the step). Ctrl-C saves the last completed step before stopping.
- The recipe is part of the checkpoint: steps, LR schedule, Adam's settings, clipping, and what
  `recipe_of` reads off the batches and the loss (batch size, shuffling seed, a digest of the training
  data, the loss's plain settings such as MatQuant's λ per precision or OneBit's α), plus any `recipe`
  dict the caller passes. Resuming with any of them changed is a one-line error naming each change.
- CPU or CUDA: batches go to the device of the student's parameters.
- Data-parallel under torchrun (an initialized process group of W > 1 ranks, bitnest.distributed): every rank
  builds the same global batch of B rows for the step (what one process would use), takes rows r, r+W, ... of it,
  and backpropagates its loss weighted by rows_r / B; the gradients are summed over the ranks (all-reduce) before
  clipping and Adam, so the sum is the gradient of the global mean loss and every rank keeps the parameters one
  process would (within floating-point rounding: the sum is taken in another order). The trained parameters are
  broadcast from rank 0 at the start. Shown and logged losses are global means (the weighted per-rank losses
  summed); `tokens` counts the global batch; `log_fn` gets that same record on every rank. Rank 0 alone writes
  the checkpoint; every rank reads it on resume. Its state (full parameters, Adam's state, rank 0's RNG) does not
  depend on W and W is not part of the recipe: a run checkpointed on W ranks resumes on any number of ranks.
  Without FSDP each rank holds the full student (and the caller's teacher, which sees only that rank's rows). `loss_fn` must
  be a mean over the rows of its batch (every loss here is). `data_parallel=False`: every rank runs the whole
  batch (the same computation everywhere; rank 0 still writes alone).
- `fsdp=True` under torchrun (W > 1, data-parallel): FSDP2 (`fully_shard`, train/fsdp.py) instead of a full student per
  rank. Every decoder block is its own group and the rest the root's; each rank holds 1/W of every parameter, of its
  gradient and of Adam's state, gathers a block's weights just for its forward and backward, and reduce-scatters
  the gradients (FSDP averages over the ranks, so the rank's loss is weighted rows_r / B · W: the same global-mean
  gradient). A teacher the loss holds as `loss_fn.teacher` is sharded the same way (forward only). Checkpoints hold
  whole tensors (gathered; rank 0 writes), so they resume on any number of ranks, with or without FSDP. When
  training ends the student is given back unsharded: the original Parameter objects hold the trained values.
  Ctrl-C under FSDP keeps the last periodic checkpoint (saving needs every rank).
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..distributed import all_gather, all_reduce_sum, barrier, broadcast, rank_world
from ..errors import BitnestError

STATE_FILE = "train_state.pt"
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainResult:
    steps: int  # steps completed (== the `steps` asked for unless interrupted)
    tokens: int  # training tokens seen by the student, over all steps including resumed ones
    seconds: float  # wall time of all sessions of this run
    history: list[dict] = field(default_factory=list)  # one record per step: step, loss, parts, lr, grad_norm
    resumed_from: int = 0  # the step a checkpoint restored (0: a fresh start)

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


def lr_lambda(step: int, *, steps: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based): linear warm-up over `warmup` steps
    (1/warmup, 2/warmup, ..., 1), then cosine (or linear) decay to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup)
    t = min(1.0, (step - warmup) / span)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1 - t
    return min_ratio + (1 - min_ratio) * decay


def _tokens(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        return _tokens(batch.get("input_ids", next(iter(batch.values()))))
    if isinstance(batch, (tuple, list)) and batch:
        return _tokens(batch[0])
    return 0


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _rows(batch) -> int:
    """B: the leading size of the batch's token tensor (as `_tokens` finds it)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 0
    if isinstance(batch, dict):
        return _rows(batch.get("input_ids", next(iter(batch.values()))))
    if isinstance(batch, (tuple, list)) and batch:
        return _rows(batch[0])
    return 0


def _shard(batch, rank: int, world: int, rows: int):
    """Rows rank, rank + world, ... of every tensor in `batch` whose leading size is `rows`; anything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch[rank::world] if batch.dim() and batch.shape[0] == rows else batch
    if isinstance(batch, dict):
        return {k: _shard(v, rank, world, rows) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_shard(v, rank, world, rows) for v in batch)
    return batch


def _sync_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks (one all-reduce per dtype and device); a parameter no rank
    has a gradient for keeps None, as in one process (Adam skips it)."""
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.dtype, p.device), []).append(i)
    flats = {key: torch.cat([(params[i].grad if params[i].grad is not None else torch.zeros_like(params[i])).reshape(-1)
                             for i in idx]) for key, idx in groups.items()}
    all_reduce_sum(has)
    for key, idx in groups.items():
        flat = all_reduce_sum(flats[key])
        off = 0
        for i in idx:
            p = params[i]
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p).clone() if has[i] > 0 else None
            off += n


def _shard_student(student: torch.nn.Module, params, loss_fn):
    """FSDP2 over the student (and the loss's teacher, forward only); one-line errors where it cannot run."""
    from .fsdp import Sharded, available

    if not available():
        raise BitnestError(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not in torch {torch.__version__}; "
                           "train without fsdp")
    teacher = getattr(loss_fn, "teacher", None)
    sharded = Sharded(student, params)
    if isinstance(teacher, torch.nn.Module) and teacher is not student:
        sharded.also(teacher)
    return sharded


def _whole(t):
    """A DTensor's whole tensor (collective); anything else as it is."""
    from .fsdp import Sharded

    return Sharded.full(t) if isinstance(t, torch.Tensor) else t


def _whole_cpu(t, keep: bool = True):
    """A tensor whole (gathered when it is a DTensor shard: every rank calls this) on the CPU, one tensor at a time
    so a rank never holds all of them on its device; None where `keep` is false (the ranks that do not write).
    A CPU tensor is not copied: the state is saved right away."""
    w = _whole(t)
    return (w.cpu() if keep else None) if isinstance(w, torch.Tensor) else w


def _whole_optimizer(sd: dict, keep: bool = True) -> dict:
    """Adam's state_dict with every DTensor shard gathered, so the checkpoint does not depend on the ranks."""
    return {**sd, "state": {i: {k: _whole_cpu(v, keep) for k, v in st.items()} for i, st in sd["state"].items()}}


def _sharded_optimizer(sd: dict, params) -> dict:
    """A saved Adam state_dict (whole tensors) split as each parameter is (DTensor shards under FSDP)."""
    from .fsdp import Sharded

    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: Sharded.shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                    for k, v in st.items()}
    return {**sd, "state": state}


def _split_loss(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return out, {}
    if isinstance(out, dict) and "loss" in out:
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}
    raise BitnestError("loss_fn must return a scalar tensor or a dict with a 'loss' entry")


def _scalar(v) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def _rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": (kind, keys.tolist(), pos, has_gauss, cached)}


def _set_rng_state(s: dict) -> None:
    import numpy as np

    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _to_tuples(x):
    """torch.load(weights_only) gives lists where Python's random state needs tuples."""
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _plain(v, depth: int = 0):
    """`v` as JSON-able data when it is plain settings (numbers, strings, and tuples / dicts / dataclasses of
    them); None for anything else (modules, tensors, callables), which the recipe leaves out."""
    import dataclasses

    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if depth > 4:
        return None
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        d = {f.name: _plain(getattr(v, f.name), depth + 1) for f in dataclasses.fields(v)}
        return None if any(x is None and getattr(v, k) is not None for k, x in d.items()) else d
    if isinstance(v, (tuple, list, set, frozenset)):
        items = [_plain(x, depth + 1) for x in v]
        if any(x is None and y is not None for x, y in zip(items, v)):
            return None
        return sorted(items, key=repr) if isinstance(v, (set, frozenset)) else items
    if isinstance(v, dict) and all(isinstance(k, (str, int)) for k in v):
        d = {str(k): _plain(x, depth + 1) for k, x in v.items()}
        return None if any(d[str(k)] is None and x is not None for k, x in v.items()) else d
    return None


def _batches_of(batches):
    """The `data.Batches` behind `batches`: itself, or one a step -> batch closure reads (OmniQuant's)."""
    from .data import Batches

    if isinstance(batches, Batches):
        return batches
    for cell in getattr(batches, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(v, Batches):
            return v
    return None


def recipe_of(batches, loss_fn, recipe: dict | None = None) -> dict:
    """What, besides the optimizer settings, makes a training run this run: batch size, shuffling seed and a
    digest of the data (from a `data.Batches`), the loss object's plain settings (λ per precision, α, kd...),
    and the caller's own `recipe`. Metadata and one hash of the token ids: cheap next to one training step."""
    import hashlib

    out = {}
    b = _batches_of(batches)
    if b is not None:
        data = b.data.detach().contiguous().cpu()
        digest = hashlib.blake2b(data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b"",
                                 digest_size=8).hexdigest()
        out.update({"batch": b.batch_size, "seed": b.seed, "shuffle": b.shuffle,
                    "data": f"{list(data.shape)} {str(data.dtype).replace('torch.', '')} #{digest}"})
    for k, v in sorted(vars(loss_fn).items() if hasattr(loss_fn, "__dict__") else ()):
        if not k.startswith("_") and (pv := _plain(v)) is not None:
            out[f"{type(loss_fn).__name__}.{k}"] = pv
    for k, v in (recipe or {}).items():
        out[str(k)] = _plain(v) if _plain(v) is not None else repr(v)
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested recipe entries as dotted keys (`MatQuantLoss.plan.lam`), so a change names the field that moved."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    s = v if isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _named(student: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> list[str]:
    names = {id(p): n for n, p in student.named_parameters(remove_duplicate=False)}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise BitnestError(f"{len(missing)} of the parameters to train do not belong to the student model")
    return [names[id(p)] for p in params]


def train(student: torch.nn.Module, batches: Callable[[int], object] | Sequence, loss_fn: Callable, *,
          steps: int, lr: float, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8,
          weight_decay: float = 0.0, warmup: int = 0, schedule: str = "cosine", min_lr_ratio: float = 0.0,
          clip: float | None = 1.0, params: Sequence[torch.nn.Parameter] | None = None,
          ckpt_dir: str | os.PathLike | None = None, ckpt_every: int = 100, resume: bool = True,
          progress: bool = True, desc: str = "train", log_fn: Callable[[dict], None] | None = None,
          recipe: dict | None = None, data_parallel: bool = True, fsdp: bool = False) -> TrainResult:
    """Train `params` of `student` for `steps` optimizer steps on loss_fn(student, batches(step)).

    Returns a TrainResult (history of every step, tokens, seconds). The student is left in the mode it
    was in (train/eval); gradients are enabled inside even when the caller runs under torch.no_grad(). Under
    torchrun (W > 1 ranks) the global batch of each step is split over the ranks, with `fsdp` the student sharded
    (see the module docstring)."""
    if steps < 0 or lr <= 0:
        raise BitnestError(f"need steps ≥ 0 and lr > 0, got steps={steps}, lr={lr}")
    if schedule not in SCHEDULES:
        raise BitnestError(f"unknown LR schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not 0 <= warmup <= max(steps, 0):
        raise BitnestError(f"warm-up ({warmup}) must be between 0 and the number of steps ({steps})")
    if ckpt_every < 1:
        raise BitnestError(f"ckpt_every must be at least 1, got {ckpt_every}")
    params = [p for p in student.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise BitnestError("nothing to train: no parameter requires grad")
    names = _named(student, params)
    batch_at = batches if callable(batches) else (lambda s: batches[s % len(batches)])
    device = params[0].device
    rank, world = rank_world()
    dp = data_parallel and world > 1
    main = rank == 0
    if fsdp and world > 1 and not dp:
        raise BitnestError("FSDP needs the data-parallel split (data_parallel=True)")
    sharded = None
    if world > 1:
        with torch.no_grad():  # every rank starts from rank 0's parameters, as DDP does (a resume overwrites them)
            for p in params:
                p.copy_(broadcast(p.detach()))
    if fsdp and world > 1:
        sharded = _shard_student(student, params, loss_fn)
    stepped = sharded.params if sharded is not None else params  # what Adam updates: the shards under FSDP

    try:
        opt = torch.optim.Adam(stepped, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, steps=steps, warmup=warmup, schedule=schedule, min_ratio=min_lr_ratio))
        meta = {"steps": steps, "lr": lr, "betas": list(betas), "warmup": warmup, "schedule": schedule,
                "eps": eps, "weight_decay": weight_decay, "min_lr_ratio": min_lr_ratio, "clip": clip,
                "names": names, "shapes": [list(p.shape) for p in stepped]}

        ckpt = Path(ckpt_dir) / STATE_FILE if ckpt_dir is not None else None
        if ckpt is not None:
            from ..formats.checkpoint import clean_stale
            meta["recipe"] = recipe_of(batches, loss_fn, recipe)
            if main:
                clean_stale(ckpt)  # a temporary file a killed run left
            barrier()  # no rank looks for the checkpoint while rank 0 tidies its directory
        step, tokens, seconds, history, resumed_from = 0, 0, 0.0, [], 0
        if ckpt is not None and resume and ckpt.is_file():
            step, tokens, seconds, history = _restore(ckpt, meta, stepped, opt, sched, device)
            resumed_from = step
        if world > 1:
            steps_seen = all_gather(torch.tensor([step], dtype=torch.long))
            if any(int(s) != step for s in steps_seen):
                raise BitnestError(f"the processes resumed from different steps ({[int(s) for s in steps_seen]}): the "
                                   f"checkpoint directory {ckpt_dir} must be the same file on every rank")

        def state() -> dict:  # whole tensors: under FSDP gathered (every rank calls this), so W does not matter
            return {"step": step, "tokens": tokens, "seconds": seconds + (time.perf_counter() - t0), "history": history,
                    "params": {n: _whole_cpu(p.detach(), main) for n, p in zip(names, stepped)},
                    "optimizer": _whole_optimizer(opt.state_dict(), main), "scheduler": sched.state_dict(),
                    "rng": _rng_state(), "meta": meta}

        was_training = student.training
        student.train()
        t0 = time.perf_counter()
        session_tokens = 0
        updating = False
        bar = tqdm(total=steps, initial=step, desc=desc, unit="step", disable=not progress or not main,
                   dynamic_ncols=True)
        try:
            with torch.enable_grad():
                while step < steps:
                    batch = batch_at(step)
                    n_tok = _tokens(batch)  # the global batch's tokens, whatever W
                    weight = 1.0
                    if dp:
                        rows = _rows(batch)
                        if rows < world:
                            raise BitnestError(f"a batch of {rows} sequences cannot be split over {world} processes; "
                                               "use a larger batch or fewer processes")
                        batch = _shard(batch, rank, world, rows)
                        weight = _rows(batch) / rows
                    batch = _to(batch, device)
                    loss, parts = _split_loss(loss_fn(student, batch))
                    shown, shown_parts = loss, parts
                    if dp:  # the global mean of the loss and of each part: Σ_r rows_r / B · mean_r
                        vals = torch.stack([torch.as_tensor(v).detach().float().reshape(()).cpu()
                                            for v in (loss, *parts.values())]) * weight
                        vals = all_reduce_sum(vals)
                        shown, shown_parts = vals[0], dict(zip(parts, vals[1:]))
                    if not torch.isfinite(shown):
                        raise BitnestError(f"the training loss is {shown.item()} at step {step + 1}; lower the learning "
                                           "rate or check the data")
                    opt.zero_grad(set_to_none=True)
                    # FSDP's reduce-scatter averages over the ranks; the all-reduce of _sync_grads sums
                    (loss * (weight * world if sharded is not None else weight) if dp else loss).backward()
                    updating = True
                    if dp and sharded is None:
                        _sync_grads(params)
                    gnorm = _whole(torch.nn.utils.clip_grad_norm_(stepped, clip) if clip else torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in stepped if p.grad is not None])))
                    cur_lr = opt.param_groups[0]["lr"]
                    opt.step()
                    sched.step()
                    step += 1
                    tokens += n_tok
                    session_tokens += n_tok
                    rec = {"step": step, "loss": shown.item(), **{k: _scalar(v) for k, v in shown_parts.items()},
                           "lr": cur_lr, "grad_norm": float(gnorm), "tokens": tokens}
                    history.append(rec)
                    updating = False  # parameters, optimizer, counters and history agree again: safe to save
                    if ckpt is not None and (step % ckpt_every == 0 or step == steps):
                        if main or sharded is not None:  # under FSDP every rank gathers; rank 0 alone writes
                            s_now = state()
                            if main:
                                _save_state(ckpt, s_now)
                    if log_fn is not None:
                        log_fn(rec)
                    el = time.perf_counter() - t0
                    bar.set_postfix({"loss": f"{rec['loss']:.4g}", **{k: f"{rec[k]:.4g}" for k in parts},
                                     "lr": f"{cur_lr:.2e}", "tok/s": f"{session_tokens / max(el, 1e-9):,.0f}"}, refresh=False)
                    bar.update(1)
        except KeyboardInterrupt:
            if ckpt is not None and main and sharded is None and not updating and step > resumed_from:
                _save_state(ckpt, state())
                bar.write(f"interrupted: saved step {step} to {ckpt}; run again to resume")
            raise
        finally:
            bar.close()
            student.train(was_training)
            opt.zero_grad(set_to_none=True)
    except BitnestError:  # raised alike on every rank (recipe, non-finite global loss, batch split): give it back
        if sharded is not None:
            sharded.restore()
        raise
    if sharded is not None:  # on success (or an error every rank raised): a collective after one rank failed would hang
        opt.state.clear()  # Adam's shards are not needed any more: room for the gathered student
        sharded.restore()
    return TrainResult(step, tokens, seconds + time.perf_counter() - t0, history, resumed_from)


def _restore(ckpt: Path, meta: dict, params, opt, sched, device) -> tuple[int, int, float, list]:
    try:
        s = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BitnestError(f"cannot read the training checkpoint {ckpt} ({str(e).splitlines()[0][:200]}); "
                           "delete it to start over") from None
    old = s["meta"]
    if old["names"] != meta["names"] or old["shapes"] != meta["shapes"]:
        raise BitnestError(f"the training checkpoint {ckpt} belongs to a different model or method (its trained "
                           "parameters differ); use another checkpoint directory or delete it")
    # keys an older checkpoint lacks are not compared (it recorded less); a recipe entry one side lacks is a change
    changed = [(k, old[k], meta[k]) for k in ("steps", "lr", "betas", "warmup", "schedule", "eps", "weight_decay",
                                              "min_lr_ratio", "clip") if k in old and old[k] != meta[k]]
    if "recipe" in old:
        was, now = _flat(old["recipe"]), _flat(meta.get("recipe", {}))
        changed += [(k, was.get(k, "(none)"), now.get(k, "(none)")) for k in sorted(set(was) | set(now), key=str)
                    if was.get(k, "(none)") != now.get(k, "(none)")]
    if changed:
        raise BitnestError(f"the training checkpoint {ckpt} was made with a different recipe: "
                           + "; ".join(f"{k} {_short(a)} → {_short(b)}" for k, a, b in changed)
                           + ". Resuming would not reproduce that run: use the same settings, another checkpoint "
                           "directory, or delete it")
    from .fsdp import Sharded

    with torch.no_grad():
        for n, p in zip(meta["names"], params):
            p.copy_(Sharded.shard_like(s["params"][n].to(device), p))
    opt.load_state_dict(_sharded_optimizer(s["optimizer"], params))
    sched.load_state_dict(s["scheduler"])
    rng = dict(s["rng"])
    rng["python"] = _to_tuples(rng["python"])
    _set_rng_state(rng)
    return s["step"], s["tokens"], s["seconds"], list(s["history"])
