"""bitnest checkpoints: a Hugging Face-style directory.

  config.json                    the model's config + `quantization_config` (below)
  model.safetensors              or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  tokenizer files                as the tokenizer saves them

quantization_config = {
  "quant_method": "bitnest", "format_version": 1,
  "method": "rtn" | "sliced" | ..., "config": {bits, group_size, symmetric, targets, overrides, ...},
  "nested": bool,                # Matryoshka: codes stored once at parent width, servable at any r
  "storage_dtype": "bfloat16",   # dtype of the unquantized tensors
  "source_model": "...",         # what was quantized (teacher for KL / top-1 agreement)
  "modules": {name: {bits, parent_bits, serve_bits, group_size, symmetric, in_features, out_features, bias}},
}
A quantized Linear `name` stores `name.qweight` (uint8, packed by formats.packing), `name.scale` and, when
asymmetric, `name.zero` (float16, one per group). Other packed layers carry a "kind" in their module entry
(MODULE_KINDS; "onebit": `qweight` 1-bit signs, `g`/`h` float16 value vectors) and are rebuilt as stored.
Writes go to a temporary sibling directory renamed into place, so a crash never leaves a half-written
checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import BitnestError

FORMAT_VERSION = 1


# Packed module types other than QuantLinear, by the "kind" key of their layer config (QuantLinear has none).
MODULE_KINDS = {"onebit": ("bitnest.nn.onebit", "PackedSignLinear"),
                "codebook": ("bitnest.nn.codebook", "CodebookLinear"),
                "actquant": ("bitnest.nn.actquant", "ActQuantLinear"),
                "intlinear": ("bitnest.nn.intlinear", "IntLinear"),
                "matquant_ep": ("bitnest.nn.nested", "ExtraPrecisionLinear")}


def _packed_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """QuantLinear and every other packed module (a `kind` in MODULE_KINDS), by name."""
    from ..nn.qlinear import QuantLinear

    return {n: m for n, m in model.named_modules()
            if isinstance(m, QuantLinear) or getattr(m, "kind", None) in MODULE_KINDS}


def _keep_dtype(model: torch.nn.Module) -> set[str]:
    """Tensors stored in their own dtype (scales, zeros, value vectors), not the model's storage dtype."""
    return {f"{n}.{b}" for n, m in _packed_modules(model).items() for b in getattr(m, "keep_dtype", ("scale", "zero"))}


def _module_class(lc: dict):
    from ..nn.qlinear import QuantLinear

    kind = lc.get("kind")
    if kind is None:
        return QuantLinear
    if kind not in MODULE_KINDS:
        raise BitnestError(f"this checkpoint has {kind!r} layers, which this bitnest cannot load; upgrade bitnest")
    import importlib

    mod, cls = MODULE_KINDS[kind]
    return getattr(importlib.import_module(mod), cls)


def _unique_state(model: torch.nn.Module, storage_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """state_dict without tied duplicates (HF re-ties them on load), floats cast to the storage dtype."""
    packed = _keep_dtype(model)
    seen, out = set(), {}
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:  # empty tensors share a null pointer without being tied
            continue
        seen.add(key)
        if t.is_floating_point() and k not in packed:
            t = t.to(storage_dtype)
        out[k] = t.detach().contiguous().cpu()
    return out


def atomic_dir(out: Path, overwrite: bool):
    """Context manager yielding a temp dir that replaces `out` on success and vanishes on failure."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        if out.exists() and not overwrite:
            raise BitnestError(f"output {out} already exists (pass --overwrite to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            _publishable(tmp)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return cm()


def _publishable(tmp: Path) -> None:
    """mkdtemp and some writers create owner-only files; give the result ordinary permissions (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for f in tmp.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def write_shards(tmp: Path, state: dict[str, torch.Tensor], max_shard_size: str | int = "2GB") -> None:
    """`state` as HF-style safetensors shards (model.safetensors, or model-0000i-of-0000n + the index) in `tmp`."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(tmp / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_quantized(model, tokenizer, out: str | os.PathLike, quantization_config: dict, *,
                   storage_dtype: torch.dtype = torch.float16, max_shard_size: str | int = "2GB",
                   overwrite: bool = False) -> Path:
    out = Path(out)
    qc = {"quant_method": "bitnest", "format_version": FORMAT_VERSION, **quantization_config,
          "storage_dtype": str(storage_dtype).replace("torch.", ""),
          "modules": {n: m.layer_config() for n, m in _packed_modules(model).items()}}
    state = _unique_state(model, storage_dtype)
    with atomic_dir(out, overwrite) as tmp:
        write_shards(tmp, state, max_shard_size)
        cfg = model.config.to_dict()
        cfg["quantization_config"] = qc
        cfg["dtype"] = qc["storage_dtype"]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        history = getattr(getattr(model, "bitnest_train", None), "history", None)
        if history:  # the training curve travels with the checkpoint (bitnest report plots it)
            (tmp / "training_history.json").write_text(json.dumps(history, default=float))
    return out


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file read into process memory, one tensor at a time.

    safetensors' own loaders return tensors backed by a memory map of the file: the weights then live in the
    page cache, are read from disk again whenever the kernel evicts them, and a switch of precision would page
    the codes back in. A loaded bitnest model owns its bytes instead (the file may be deleted or replaced while
    the model runs), and reading straight into each tensor keeps the peak at the model's size plus one tensor.
    The file was validated by safetensors (models.hf.check_safetensors) before this reads it."""
    import struct

    out = {}
    size = f.stat().st_size
    with open(f, "rb") as fh:
        try:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n)) if 0 < n <= size - 8 else None
        except (struct.error, ValueError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict):
            raise BitnestError(f"{f} is not a readable safetensors file (bad header)")
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = _ST_DTYPES[info["dtype"]], [int(d) for d in info["shape"]], info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise BitnestError(f"{f}: tensor {name!r} has a malformed header entry (or a dtype bitnest does not read)") from None
            t = torch.empty(shape, dtype=dtype)
            if t.numel() * t.element_size() != end - start or not 0 <= start <= end <= size - base:
                raise BitnestError(f"{f}: tensor {name} does not fit its header (offsets {start}..{end}, shape {shape})")
            fh.seek(base + start)
            if end > start and fh.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
                raise BitnestError(f"{f} is truncated (tensor {name})")
            out[name] = t
    return out


def _read_state(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from ..models.hf import check_safetensors

    state = {}
    for f in check_safetensors(path):
        state.update(load_file(str(f)) if mmap else read_safetensors(f))
    return state


def load_quantized(path: str | os.PathLike, bits: int | None = None, overrides: dict[str, int] | None = None,
                   dtype: torch.dtype = torch.float32, mmap: bool = False):
    """Rebuild the model with packed-layer shells from `modules`, then load the packed tensors.

    `bits` serves every nested layer at r bits; `overrides` maps module-name globs to r (Mix'n'Match).
    `dtype`: the unquantized tensors (embeddings, norms, LM head, biases) and so the activations; float32 by
    default (evaluation), bfloat16 for serving (half the bytes of those tensors, bf16 matmuls where they run).
    Memory: the shells live on the meta device and every tensor read from disk is assigned, not copied, so the
    loaded model holds the file's bytes once (plus a cast of the unquantized ones when `dtype` differs), in its
    own memory; `mmap=True` maps the files instead (instant, shared page cache; the weights are then paged in
    from disk on first use and whenever the kernel evicted them).
    """
    import fnmatch

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.blocks import replace_module
    from ..models.hf import Loaded, _load_tokenizer, read_config
    from ..nn.qlinear import QuantLinear

    path = Path(path)
    cfg = read_config(path)
    qc = cfg["quantization_config"]
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise BitnestError(f"{path} was written by a newer bitnest (format {qc['format_version']} > {FORMAT_VERSION}); upgrade bitnest")
    if (bits is not None or overrides) and not qc.get("nested"):
        raise BitnestError(f"{path} stores {qc['config'].get('bits')}-bit {qc['method']} codes; --bits only re-slices "
                           "Matryoshka checkpoints (method sliced/matquant)")
    state = _read_state(path, mmap)
    try:
        config = AutoConfig.from_pretrained(str(path))
        with init_empty_weights(include_buffers=False):  # params on meta: no random init, no double memory
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:
        raise BitnestError(f"could not build the model described by {path}/config.json: {str(e).splitlines()[0]}") from None
    for name, lc in qc["modules"].items():
        lc = dict(lc)
        r = next((b for pat, b in (overrides or {}).items() if fnmatch.fnmatchcase(name, pat)), bits)
        if lc.get("kind") is not None:  # a non-QuantLinear packed module (e.g. OneBit): rebuilt as stored
            cls = _module_class(lc)
            if r is not None and getattr(cls, "nested", False):  # a nested kind (Extra Precision MatQuant)
                if not 1 <= r <= lc["bits"]:
                    raise BitnestError(f"cannot serve {name} at {r} bits: it stores {lc['bits']}-bit codes (choose 1..{lc['bits']})")
                lc["serve_bits"] = r
            replace_module(model, name, cls.from_layer_config(lc, device="meta"))
            continue
        if r is not None:
            if not 1 <= r <= lc["bits"]:
                raise BitnestError(f"cannot serve {name} at {r} bits: it stores {lc['bits']}-bit codes (choose 1..{lc['bits']})")
            lc["serve_bits"] = r
        replace_module(model, name, QuantLinear.from_layer_config(lc, device="meta"))
    keep = _keep_dtype(model)
    for k in list(state):  # one tensor at a time, so at most one extra copy exists while casting
        v = state[k]
        if v.is_floating_point() and not k.endswith((".scale", ".zero")) and k not in keep and v.dtype != dtype:
            state[k] = v.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise BitnestError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    _materialize_meta(model, dtype)
    model.eval()
    storage = getattr(torch, qc.get("storage_dtype", "float16"))
    return Loaded(model, _load_tokenizer(str(path)), str(path), storage, qc)


def _materialize_meta(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Buffers that the checkpoint does not hold and the model did not create (none in practice: the loader's
    check above catches missing tensors) must not stay on the meta device."""
    for name, t in list(model.named_buffers()):
        if t.is_meta:
            raise BitnestError(f"buffer {name} was not in the checkpoint")


def _is_tied(model, key: str) -> bool:
    """True when `key` is a parameter that shares storage with another (tied embeddings)."""
    if not key.endswith(".weight"):
        return False
    try:
        t = model.get_parameter(key)
    except AttributeError:
        return False
    return any(p is t for n, p in model.named_parameters(remove_duplicate=False) if n != key)
