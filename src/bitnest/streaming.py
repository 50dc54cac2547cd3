"""Streaming quantization: a safetensors checkpoint larger than RAM, one decoder block at a time.

The model is never built. Its structure comes from config.json on the meta device (no memory); tensors are
read lazily from the (sharded) safetensors files with `safe_open` — each through its own short-lived handle, so
the memory-mapped pages of a tensor leave the process as soon as the tensor is freed — and each target Linear is
quantized alone by the method's own registered function (the same code, names and config as the in-memory
`quantize`), so the result is bit-identical to `quantize(load_model(src).model, method, ...)` + `save_quantized`.

    units     the tensors outside the blocks (embeddings, final norm, lm_head: copied through in the storage
              dtype), then block 0, 1, ... (`model.layers.{i}.*`)
    shards    `blocks_per_shard` blocks each (one safetensors file), written to a temporary name, fsynced and
              renamed in `.OUT.partial/`; progress.json there lists the finished shards
    resume    the same command again skips the finished shards (a changed recipe or source is refused), so an
              interrupted run ends bit-identical to an uninterrupted one
    finish    shards renamed to model-0000i-of-0000n.safetensors, the index, config.json (quantization_config
              built by the same helpers as `save_quantized`) and the tokenizer written, then `.OUT.partial`
              renamed to OUT

Calibrated methods (GPTQ, Matryoshka GPTQ, clip, weighted k-means) run their own block loop (calib.driver.blockwise)
on the meta model while this module feeds it: the embeddings are read for the capture of block 0's inputs and
dropped, block i is read in float32 just before the method sees it, and when a shard's blocks are done they are
written, the block goes back to the meta device, and the calibration activations that feed the next block are
saved beside the shard (`acts-*.safetensors`), so a resumed run continues at the next block bit-identically.
`mixed` (sensitivity=block) reads the blocks twice: once to score every layer on its block's output (nothing is
written), once to quantize with the base method and the allocation.

Memory: one Linear's weight in float32 plus its quantization temporaries (calibrated: one block in float32, the
calibration activations and the solver's statistics — GPTQ's Hessian and weight copies for the widest layer group —
and, once, for the capture of block 0's inputs, the input embedding in float32, larger than a block for
large-vocabulary models), one shard of packed output, and a fixed overhead (torch, transformers, the meta model) — whatever the model's size; the bound tested is "≤ the
largest block in float32 + overhead".
"""
from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import BitnestError

DATA_FREE = ("rtn", "sliced", "lpfit", "nf", "log", "kmeans")  # one Linear at a time (kmeans: unweighted)
CALIBRATED = ("gptq", "matgptq", "clip", "kmeans")  # block by block on calibration text (kmeans: weighted=true)
STREAMABLE = tuple(dict.fromkeys(DATA_FREE + CALIBRATED + ("mixed",)))  # mixed: sensitivity=block, base rtn | gptq
PROGRESS = "progress.json"
_STREAM_VERSION = 1


# ---------------------------------------------------------------- the source: lazy tensor reads

class _Source:
    """A full-precision HF safetensors directory, validated as `load_model` validates it (metadata only)."""

    def __init__(self, path: Path):
        from .models.hf import (_check_fp_dtypes, _dtype_from_config, _headers, check_config_types,
                                check_layer_count, check_safetensors, read_config)

        if not path.is_dir():
            raise BitnestError(f"model {path} not found: streaming quantization reads a Hugging Face model directory "
                               "with safetensors weights")
        self.path, self.cfg = path, read_config(path)
        if self.cfg.get("quantization_config") is not None:
            raise BitnestError(f"{path} is already quantized; quantize the full-precision model")
        self.files = check_safetensors(path)
        self.heads = _headers(self.files)  # name -> (dtype, shape, file)
        check_config_types(self.cfg, path)
        check_layer_count(self.cfg, self.heads, path)
        _check_fp_dtypes(self.heads)
        self.storage_dtype = _dtype_from_config(self.cfg)

    def fingerprint(self) -> list:
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]

    def nbytes(self, key: str) -> int:
        from .formats.checkpoint import _ST_DTYPES

        dt, shape, _ = self.heads[key]
        n = 1
        for d in shape:
            n *= d
        return n * (_ST_DTYPES[dt].itemsize if dt in _ST_DTYPES else 1)

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor `key` cast to `dtype` in this process's own memory, checked finite. The handle is closed at once:
        the mapped pages go with the source view. Casting bf16/fp16/fp32 straight to `dtype` equals the in-memory
        path's cast through float32 (every such value is exact in float32); wider sources go through float32."""
        from safetensors import safe_open

        f = self.heads[key][2]
        with safe_open(str(f), "pt") as h:
            t = h.get_tensor(key)
        if t.is_floating_point() and t.element_size() > 4:
            t = t.to(torch.float32)
        out = t.to(dtype, copy=True)
        del t
        if out.is_floating_point() and out.numel() and not torch.isfinite(torch.stack(torch.aminmax(out))).all():  # NaN propagates
            raise BitnestError(f"weight {key} contains NaN or Inf values; refusing to quantize a broken model")
        return out


def _fixed_mmap_threshold(nbytes: int = 128 << 10) -> None:
    """glibc raises its mmap threshold to the size of the largest block freed so far (up to 32 MiB); after the first
    weight is freed, tensors of a weight's size come from the heap, and freed heap memory mostly stays in the
    process. Streaming an 8-block model grew anonymous memory by 128–159 MiB that way, 48 MiB with the threshold
    fixed: every large tensor then goes back to the OS when freed, so the peak is one block, not the history of
    fragmentation. Process-wide (what a streaming run wants); a no-op where libc has no mallopt."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError, TypeError):
        pass


def _meta_model(src: Path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(src))
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.tie_weights()  # on the meta device tying is not done by from_config; tied tensors are stored once
        return model.eval()  # as from_pretrained gives it (calibrated methods run its blocks)
    except Exception as e:  # noqa: BLE001 — transformers raises anything on a bad config
        raise BitnestError(f"could not build the model described by {src}/config.json: {str(e).splitlines()[0]}") from None


def _unique_keys(model: nn.Module) -> list[str]:
    """state_dict keys without tied duplicates (the first name of a shared tensor kept, as save_quantized does)."""
    seen, out = set(), []
    for k, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append(k)
    return out


def _check_keys(src: _Source, model: nn.Module, keys: list[str]) -> None:
    """The file holds every tensor the config needs, with its shape, and no weight the config has no place for."""
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in keys if k not in src.heads]
    if missing:
        raise BitnestError(f"{src.path} lacks {len(missing)} weight(s) its config.json needs, e.g. {missing[0]}; "
                           "the checkpoint is incomplete or belongs to another architecture")
    extra = sorted(k for k in src.heads if k not in expected and k.rpartition(".")[2] in ("weight", "bias"))
    if extra:
        raise BitnestError(f"{src.path} holds {len(extra)} weight(s) its config.json has no place for, e.g. {extra[0]}; "
                           "config.json does not describe these weights")
    for k in keys:
        dt, shape, f = src.heads[k]
        if list(expected[k].shape) != shape:
            raise BitnestError(f"could not load model {src.path}: {f}: tensor {k} has shape {shape}, but config.json "
                               f"makes it {list(expected[k].shape)}")


# ---------------------------------------------------------------- the plan: units and shards

def _plan(model: nn.Module, keys: list[str], src: _Source, blocks_per_shard: int) -> list[list[str]]:
    """Shards as lists of tensor keys: the tensors outside the blocks first (chunked so that no chunk is larger
    than the largest block), then `blocks_per_shard` blocks per shard."""
    from .models.blocks import get_blocks

    prefix, blocks = get_blocks(model)
    per_block: list[list[str]] = [[] for _ in blocks]
    rest = []
    for k in keys:
        head, _, tail = k.partition(prefix + ".") if k.startswith(prefix + ".") else ("", "", "")
        i = tail.split(".", 1)[0]
        if tail and i.isdigit() and int(i) < len(blocks):
            per_block[int(i)].append(k)
        else:
            rest.append(k)
    cap = max([sum(src.nbytes(k) for k in b) for b in per_block] + [1])
    shards, cur, size = [], [], 0
    for k in rest:
        if cur and size + src.nbytes(k) > cap:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += src.nbytes(k)
    if cur:
        shards.append(cur)
    for i in range(0, len(per_block), blocks_per_shard):
        shards.append([k for b in per_block[i:i + blocks_per_shard] for k in b])
    return shards


# ---------------------------------------------------------------- one shard

def _quantize_linear(model: nn.Module, name: str, src: _Source, method: str, config) -> nn.Module:
    """Materialize Linear `name` (float32, from the file) in the meta model, quantize it with the method's own
    function, and return the packed module (the meta Linear is put back)."""
    from .methods import get_method
    from .models.blocks import replace_module

    meta = model.get_submodule(name)
    lin = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
    lin.weight = nn.Parameter(src.read(f"{name}.weight", torch.float32), requires_grad=False)
    if meta.bias is not None:
        lin.bias = nn.Parameter(src.read(f"{name}.bias", torch.float32), requires_grad=False)
    replace_module(model, name, lin)
    try:
        with torch.no_grad():
            get_method(method).fn(model, config, [name], progress=False)
        return model.get_submodule(name)
    finally:
        replace_module(model, name, meta)


def _shard_state(model: nn.Module, keys: list[str], targets: set[str], src: _Source, method: str, config,
                 storage: torch.dtype, quantized: Callable[[str], nn.Module] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The output tensors of one shard and the layer configs of its packed modules. `quantized(name)`: the packed
    module of target `name` (default: quantize it now, data-free); other tensors are copied from the file."""
    state, modules, done = {}, {}, set()
    for k in keys:
        owner = k.rpartition(".")[0]
        if owner in targets:
            if owner in done:
                continue
            done.add(owner)
            q = quantized(owner) if quantized else _quantize_linear(model, owner, src, method, config)
            keep = set(getattr(q, "keep_dtype", ("scale", "zero")))
            for b, t in q.state_dict().items():
                if t.is_floating_point() and b not in keep:
                    t = t.to(storage)
                state[f"{owner}.{b}"] = t.detach().contiguous()
            modules[owner] = q.layer_config()
            del q
        else:
            state[k] = src.read(k, storage).contiguous()
    return state, modules


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


# ---------------------------------------------------------------- the driver

def quantize_streaming(src: str | os.PathLike, out: str | os.PathLike, method: str = "rtn", config=None, *,
                       overwrite: bool = False, progress: bool = True, blocks_per_shard: int = 1,
                       on_shard: Callable[[int, int], None] | None = None, calib=None, **kwargs) -> Path:
    """Quantize the HF safetensors checkpoint `src` into the bitnest checkpoint `out` without building the model.

    `method`: one of STREAMABLE; `config` or keyword options as for `quantize` (bits, group_size, symmetric,
    targets, overrides, ...). Rerunning the same call after an interruption resumes at the next unfinished shard.
    `on_shard(i, n)` is called after shard i of n is durably written (progress reporting; tests interrupt here).
    Calibrated methods read `calib` ((n, seq) token ids) or build it from the config's calib_data (text only).

    >>> quantize_streaming("Llama-2-13b-hf", "llama-13b-int4", "rtn", bits=4, group_size=128)
    """
    from tqdm.auto import tqdm

    from .api import make_config, quantization_config
    from .formats.checkpoint import FORMAT_VERSION, check_output
    from .models.blocks import select_linears

    if method not in STREAMABLE:
        raise BitnestError(f"method {method!r} cannot stream yet; streaming quantization supports "
                           f"{', '.join(STREAMABLE)} (drop --stream to quantize {method} in memory)")
    if not isinstance(blocks_per_shard, int) or blocks_per_shard < 1:
        raise BitnestError(f"blocks_per_shard must be a positive integer, got {blocks_per_shard!r}")
    config = config or make_config(method, **kwargs)
    if method == "mixed" and config.sensitivity != "block":
        raise BitnestError("streaming mixed scores each layer on its own block's output: pass -o sensitivity=block "
                           "(the default KL score runs the whole model)")
    _fixed_mmap_threshold()
    src_path, out = Path(src), Path(out)
    out = check_output(out, overwrite)
    source = _Source(src_path)
    model = _meta_model(src_path)
    keys = _unique_keys(model)
    _check_keys(source, model, keys)
    names = select_linears(model, config.targets)
    targets = set(names)
    shards = _plan(model, keys, source, blocks_per_shard)
    storage = source.storage_dtype
    n_rest = len(shards) - len(_block_shards(model, blocks_per_shard))  # shards before the first block's
    run_method = config.base if method == "mixed" else method  # what quantizes the layers
    calibrated = run_method in CALIBRATED and (run_method != "kmeans" or getattr(config, "weighted", False))
    if calibrated or method == "mixed":
        calib = _stream_calib(model, method, config, calib, src_path)

    recipe = _plain({"stream_version": _STREAM_VERSION, "source": str(src_path.absolute()),
                     "files": source.fingerprint(), "method": method, "config": config.to_dict(),
                     "storage_dtype": str(storage), "shards": len(shards), "blocks_per_shard": blocks_per_shard})
    if calibrated or method == "mixed":  # another calibration set would make the finished blocks and the next disagree
        recipe["calib_sha1"] = hashlib.sha1(calib.numpy().tobytes()).hexdigest()
    part = out.parent / f".{out.name}.partial"
    part.mkdir(parents=True, exist_ok=True)
    lock = open(part / "lock", "a")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BitnestError(f"another bitnest run is writing {out} ({part} is locked)") from None
        run_config = config
        if method == "mixed":  # the allocation: an interrupted run's, or a first read of the blocks scores every layer
            run_config = _stream_allocation(source, model, names, calib, config, progress, part, recipe)
            recipe["base_config"] = _plain(run_config.to_dict())  # the allocation the finished shards were written with
        state = _resume_state(part, recipe, overwrite)
        todo = [i for i in range(len(shards)) if str(i) not in state["done"]]
        bar = tqdm(total=len(shards), initial=len(shards) - len(todo), desc=f"stream {method}", disable=not progress)
        for i in todo:
            if calibrated and i >= n_rest:
                break  # the block shards: written by the method's own block loop, below
            tensors, modules = _shard_state(model, shards[i], targets, source, run_method, run_config, storage)
            _commit(part, state, i, tensors, modules)
            del tensors
            bar.update(1)
            if on_shard is not None:
                on_shard(i, len(shards))
        if calibrated and any(str(i) not in state["done"] for i in range(n_rest, len(shards))):
            from .calib.driver import block_stream
            from .methods import get_method

            feed = _BlockStream(source, part, state, shards, n_rest, blocks_per_shard, targets, run_method, run_config,
                                storage, bar, on_shard)
            token = block_stream.set(feed)
            try:
                with torch.no_grad():
                    get_method(run_method).fn(model, run_config, names, progress=False, calib=calib)
            finally:
                block_stream.reset(token)
        bar.close()
        for f in part.glob("acts-*.safetensors"):  # calibration activations: needed only to resume the block loop
            f.unlink()

        order = [n for n, _ in model.named_modules()]
        mods = {n: lc for s in state["done"].values() for n, lc in s["modules"].items()}
        qc = {"quant_method": "bitnest", "format_version": FORMAT_VERSION,
              **quantization_config(method, config, str(src)),
              "storage_dtype": str(storage).replace("torch.", ""),
              "modules": {n: mods[n] for n in sorted(mods, key=order.index)}}
        _finish(part, state, len(shards), model, qc, src_path)
        lock.close()
        lock = None
        _publish(part, out, overwrite)
    finally:
        if lock is not None:
            lock.close()
    return out


def _commit(part: Path, state: dict, i: int, tensors: dict[str, torch.Tensor], modules: dict, **extra) -> None:
    """Shard i durably written, then recorded in progress.json (the commit point: a run killed before it redoes i)."""
    f = part / f"shard-{i:05d}.safetensors"
    _save(tensors, f)
    state["done"][str(i)] = {"file": f.name, "keys": list(tensors),
                             "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "modules": modules,
                             **extra}
    _write_json(part / PROGRESS, state)


def _stream_allocation(source: _Source, model: nn.Module, names: list[str], calib: torch.Tensor, config, progress: bool,
                       part: Path, recipe: dict):
    """mixed: the base method's config with the allocation — the one an interrupted run of the same recipe recorded
    (so a resume neither redoes the scoring nor depends on it coming out the same), else the block sensitivities from
    one read of the blocks (nothing written), allocated to the budget."""
    from .calib.driver import block_stream
    from .methods import get_method
    from .methods.mixed import base_config, sensitivity_overrides

    try:
        old = json.loads((part / PROGRESS).read_text())["recipe"]
        if {k: v for k, v in old.items() if k != "base_config"} == recipe and "base_config" in old:
            return get_method(config.base).config_cls.from_dict(old["base_config"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, BitnestError):
        pass  # no usable interrupted run: score afresh
    token = block_stream.set(_BlockStream(source, method="mixed", dry=True))
    try:
        bits, overrides = sensitivity_overrides(model, names, calib, config, progress)
    finally:
        block_stream.reset(token)
    return base_config(config, bits, overrides)


def _plain(obj):
    """obj as JSON reads it back (tuples → lists): recipes are compared with the copy in progress.json."""
    return json.loads(json.dumps(obj))


def _block_shards(model: nn.Module, blocks_per_shard: int) -> list[range]:
    from .models.blocks import get_blocks

    n = len(get_blocks(model)[1])
    return [range(i, min(n, i + blocks_per_shard)) for i in range(0, n, blocks_per_shard)]


def _stream_calib(model: nn.Module, method: str, config, calib, src: Path) -> torch.Tensor:
    """The calibration tokens, built before any block is read. Self-generated calibration needs the whole model
    running, which a streaming run never has."""
    from .calib.data import as_calib, tokenizer_of

    if calib is None and (config.calib_data == "generate" or
                          (config.calib_data == "auto" and tokenizer_of(model) is None)):
        raise BitnestError(f"streaming {method} calibrates on text, and {src} has no tokenizer next to its weights "
                           "to read it with; pass calibration token ids (calib=) from Python"
                           if config.calib_data == "auto" else
                           f"streaming {method} cannot calibrate on self-generated text (it never runs the whole "
                           "model); pass --calib-data c4 or a .txt/.jsonl file")
    return as_calib(calib, model, config)


class _BlockStream:
    """calib.driver.blockwise for a model that is never built: the embeddings are read for the capture of block 0's
    inputs, block i is read (float32, as load_model gives it) just before the method's `process` sees it, and each
    finished shard is written with the activations that feed the next block, then its blocks go back to meta."""

    def __init__(self, src: _Source, part: Path | None = None, state: dict | None = None, shards=None, n_rest: int = 0,
                 per_shard: int = 1, targets: set[str] = frozenset(), method: str = "", config=None,
                 storage: torch.dtype | None = None, bar=None, on_shard=None, dry: bool = False):
        """`dry`: read the blocks, run `process` and propagate, write nothing (the sensitivity pass of mixed)."""
        self.src, self.method, self.dry = src, method, dry
        if dry:
            self.start, self.acts = 0, None
            return
        self.part, self.state, self.shards, self.n_rest = part, state, shards, n_rest
        self.per_shard, self.targets, self.config, self.storage = per_shard, targets, config, storage
        self.bar, self.on_shard = bar, on_shard
        done = [j for j in range(n_rest, len(shards)) if str(j) in state["done"]]
        if done != list(range(n_rest, n_rest + len(done))):
            raise BitnestError(f"{part}: the finished block shards are not contiguous; delete it and run again")
        self.start = len(done) * per_shard  # the first block to calibrate
        self.acts = state["done"][str(done[-1])].get("acts") if done else None

    def blockwise(self, model, prefix, blocks, calib, process, batch_size, progress, desc):
        from .calib.driver import BlockRunner, capture_block_inputs
        from .models.blocks import replace_module

        with self._outside_blocks(model, prefix):
            inps, kws = capture_block_inputs(model, blocks[0], calib, batch_size, torch.device("cpu"))  # [(b, T, C)]
        if self.start:
            inps = self._load_acts(len(inps))
        tensors, modules = {}, {}
        for i in range(self.start, len(blocks)):
            name, meta = f"{prefix}.{i}", blocks[i]
            block = self._read_block(name, meta)
            replace_module(model, name, block)
            try:
                runner = BlockRunner(block, inps, kws)
                process(name, block, runner)
                inps = runner.forward()  # the quantized block's outputs: the next block's inputs
                if self.dry:
                    continue
                j = self.n_rest + i // self.per_shard
                keys = [k for k in self.shards[j] if k.startswith(name + ".")]
                t, m = _shard_state(model, keys, self.targets, self.src, self.method, self.config, self.storage,
                                    quantized=model.get_submodule)
            finally:
                replace_module(model, name, meta)
            del block, runner
            tensors.update(t)
            modules.update(m)
            if (i + 1) % self.per_shard == 0 or i + 1 == len(blocks):
                self._write(j, tensors, modules, inps, i)
                tensors, modules = {}, {}
        return inps

    def _write(self, j: int, tensors: dict, modules: dict, inps: list[torch.Tensor], i: int) -> None:
        acts = f"acts-{i:05d}.safetensors"
        _save({str(b): x.contiguous() for b, x in enumerate(inps)}, self.part / acts)
        _commit(self.part, self.state, j, tensors, modules, acts=acts)
        for f in self.part.glob("acts-*.safetensors"):  # older activations: no longer a resume point
            if f.name != acts:
                f.unlink()
        self.bar.update(1)
        if self.on_shard is not None:
            self.on_shard(j, len(self.shards))

    def _load_acts(self, n: int) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        f = self.part / (self.acts or "")
        if not self.acts or not f.is_file():
            raise BitnestError(f"{self.part}: the activations to resume from are missing; delete it and run again")
        acts = load_file(str(f))
        if sorted(acts, key=int) != [str(b) for b in range(n)]:
            raise BitnestError(f"{f} does not match this calibration set; delete {self.part} and run again")
        return [acts[str(b)] for b in range(n)]

    def _read_block(self, name: str, meta: nn.Module) -> nn.Module:
        from accelerate.utils import set_module_tensor_to_device

        block = copy.deepcopy(meta)  # meta: nothing is copied but the structure
        for pn, p in list(block.named_parameters()):
            set_module_tensor_to_device(block, pn, "cpu", value=self.src.read(f"{name}.{pn}", torch.float32))
        for bn, b in list(block.named_buffers()):  # persistent buffers stored with the weights: as load_model reads them
            if f"{name}.{bn}" in self.src.heads:
                dt = torch.float32 if b.is_floating_point() else b.dtype
                set_module_tensor_to_device(block, bn, "cpu", value=self.src.read(f"{name}.{bn}", dt))
        left = [n for n, t in block.named_buffers() if t.is_meta]
        if left:
            raise BitnestError(f"{name}.{left[0]} is not in the checkpoint; this architecture cannot stream "
                               f"{self.method} (drop --stream)")
        return block

    @contextmanager
    def _outside_blocks(self, model: nn.Module, prefix: str):
        """Parameters outside the blocks read (float32) as their module first runs, and put back to meta after:
        the capture of block 0's inputs runs the embeddings only."""
        loaded = []

        def read(mod, args, name):
            for pn, p in list(mod.named_parameters(recurse=False)):
                if p.is_meta:
                    key = f"{name}.{pn}" if name else pn
                    loaded.append((mod, pn, p))
                    mod._parameters[pn] = nn.Parameter(self.src.read(key, torch.float32), requires_grad=False)

        hooks = [m.register_forward_pre_hook(functools.partial(read, name=n)) for n, m in model.named_modules()
                 if not (n == prefix or n.startswith(prefix + ".")) and any(p.is_meta for p in m.parameters(recurse=False))]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for mod, pn, p in loaded:
                mod._parameters[pn] = p


def _resume_state(part: Path, recipe: dict, overwrite: bool) -> dict:
    """progress.json of an interrupted run of the same recipe, or a fresh one. A different recipe is refused
    (or, with overwrite, its partial output discarded): mixing two recipes' shards would be silently wrong."""
    p = part / PROGRESS
    if p.is_file():
        try:
            state = json.loads(p.read_text())
            old = state["recipe"]
            state["done"]
        except (ValueError, KeyError, TypeError):
            state, old = None, None
        if state is not None and old == recipe:
            return state
        if state is not None and not overwrite:
            changed = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
            raise BitnestError(f"{part} holds an interrupted run of another recipe ({', '.join(changed)} changed); "
                               "rerun the same command to resume it, or pass --overwrite to start again")
    for f in part.iterdir():  # a fresh start: nothing from an older run survives
        if f.name != "lock":
            f.unlink() if f.is_file() or f.is_symlink() else shutil.rmtree(f)
    state = {"recipe": recipe, "done": {}}
    _write_json(p, state)
    return state


def _save(tensors: dict[str, torch.Tensor], f: Path) -> None:
    from safetensors.torch import save_file

    tmp = f.with_name(f.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    _fsync(tmp)
    os.replace(tmp, f)
    _fsync(f.parent)


def _finish(part: Path, state: dict, n: int, model: nn.Module, qc: dict, src: Path) -> None:
    """Shards to their HF names, the index, config.json and the tokenizer, in `part` (idempotent: a run killed
    here finishes on the next)."""
    from .models.hf import _load_tokenizer

    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    wmap, total = {}, 0
    for i in range(n):
        s = state["done"][str(i)]
        tmp, final = part / s["file"], part / names[i]
        if tmp.exists():
            os.replace(tmp, final)
        elif not final.is_file():
            raise BitnestError(f"{part}: shard {s['file']} is missing; delete {part} and run again")
        wmap.update({k: names[i] for k in s["keys"]})
        total += s["bytes"]
    if n > 1:
        _write_json(part / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": wmap})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qc
    cfg["dtype"] = qc["storage_dtype"]
    (part / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    tok = _load_tokenizer(str(src))
    if tok is not None:
        tok.save_pretrained(str(part))
    _fsync(part)


def _publish(part: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished `part` to `out` (replacing a checkpoint there only with overwrite)."""
    from .formats.checkpoint import check_output, swap_in

    check_output(out, overwrite)
    for f in (PROGRESS, "lock"):  # the last moment: a run killed before here resumes, after here finds `out`
        (part / f).unlink(missing_ok=True)
    swap_in(part, out)
