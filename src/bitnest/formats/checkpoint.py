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

from .. import hugepages
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


def _module_class(lc: dict, where: str = "this checkpoint"):
    from ..nn.qlinear import QuantLinear

    if not isinstance(lc, dict):
        raise BitnestError(f"{where} is not an object of layer settings")
    kind = lc.get("kind")
    if kind is None:
        return QuantLinear
    if not isinstance(kind, str) or kind not in MODULE_KINDS:
        raise BitnestError(f"{where} has layers of kind {kind!r}, which this bitnest cannot load "
                           f"(it knows {', '.join(MODULE_KINDS)}); upgrade bitnest")
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


# What a checkpoint writer (bitnest, transformers, the export formats) puts in its directory. `--overwrite`
# replaces a directory that holds only these (a checkpoint bitnest could have written) or nothing; anything else
# there — the user's notes, results, subdirectories — makes it refuse, so no unrelated file is ever deleted.
OWNED_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "training_history.json",
               "quantize_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tokenizer.bin",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
               "chat_template.json")


def _owned(f: Path) -> bool:
    return f.is_file() and not f.is_symlink() and (f.name in OWNED_FILES or f.suffix == ".safetensors")


def check_output(out: str | os.PathLike, overwrite: bool = False, *, file: bool = False) -> Path:
    """Before any work: `out` can be written. It must not exist unless `overwrite`; an existing directory is
    replaced only when it holds nothing but checkpoint files (OWNED_FILES, *.safetensors); the nearest existing
    ancestor must be a directory this process can create entries in (probed with a temporary directory, so a
    read-only file system or a missing permission is found now, not after quantizing or training)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise BitnestError(f"output {out} already exists (pass --overwrite to replace it)")
        if out.is_dir():
            if file:
                raise BitnestError(f"output {out} is a directory; --overwrite replaces a file, not a directory")
            foreign = sorted(f.name for f in out.iterdir() if not _owned(f))
            if foreign:
                raise BitnestError(f"--overwrite would delete {out}/{foreign[0]}"
                                   + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
                                   + ", which is not a checkpoint file; bitnest replaces only a directory holding a "
                                   "checkpoint (move those files, or choose another --out)")
    return check_writable(out)


def check_writable(out: str | os.PathLike) -> Path:
    """`out` can be created (or replaced): its nearest existing ancestor is a directory this process can create
    entries in — probed with a temporary directory, so a read-only file system or a missing permission shows now."""
    out = Path(out)
    anc = out.absolute().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise BitnestError(f"cannot write {out}: {anc} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=anc))
    except OSError as e:
        raise BitnestError(f"cannot write {out}: {anc} is not writable ({e.strerror or e})") from None
    return out


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove what a writer of `out` killed mid-write left beside it — `.NAME.tmp-PID[-…]` (temporary directory
    or file) and `.NAME.old-PID` (the replaced output) — when process PID no longer exists. Returns them."""
    import re

    out = Path(out)
    if not out.parent.is_dir():
        return []
    pat = re.compile(re.escape(f".{out.name}.") + r"(?:tmp|old)-(\d+)(?:-.*)?", re.S)
    gone = []
    for p in out.parent.iterdir():
        m = pat.fullmatch(p.name)
        if m and not _alive(int(m.group(1))):
            _remove(p)
            gone.append(p)
    return gone


def atomic_dir(out: Path, overwrite: bool):
    """Context manager yielding a temp dir that replaces `out` on success and vanishes on failure.

    The temporary directory is `.NAME.tmp-PID-…` beside `out`: a run killed with SIGKILL leaves it, and the next
    write to the same `out` removes it (its PID is gone: `clean_stale`). `overwrite` replaces only a directory
    that holds a checkpoint (`check_output`), or a file."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        check_output(out, overwrite)
        clean_stale(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            yield tmp
            swap_in(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return cm()


def swap_in(tmp: Path, out: Path) -> None:
    """Publish the finished directory `tmp` as `out`: checked publishable, then renamed over any old `out` (moved aside
    first and removed after, so `out` is always either the old or the new checkpoint)."""
    _publishable(tmp)
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        _remove(old)
    else:
        os.replace(tmp, out)


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
    """Write `model` (its quantized modules packed) to the directory `out`. Under an initialized process group of
    several ranks (torchrun) only rank 0 writes; the others return `out` at once without waiting for it."""
    from ..distributed import is_main

    out = Path(out)
    if not is_main():
        return out
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
            # packed codes (integers) on huge pages: every token streams them (bitnest/hugepages.py)
            t = torch.empty(shape, dtype=dtype) if dtype.is_floating_point else hugepages.empty(shape, dtype)
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

    Hostile or damaged files end in one-line BitnestErrors: every `modules` entry is checked for sane fields
    (widths 1..8, serve ≤ bits ≤ parent_bits, a group size that divides the inputs, the Linear it replaces),
    and every stored tensor against the shell its entry builds (name, shape, dtype) before anything is loaded —
    metadata comparisons only, no pass over the data.
    """
    import fnmatch

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.blocks import replace_module
    from ..models.hf import Loaded, _load_tokenizer, check_config_types, check_layer_count, read_config

    path = Path(path)
    cfg = read_config(path)
    qc = cfg["quantization_config"]
    _check_quantization_config(path, qc)
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise BitnestError(f"{path} was written by a newer bitnest (format {qc['format_version']} > {FORMAT_VERSION}); upgrade bitnest")
    if (bits is not None or overrides) and not qc.get("nested"):
        raise BitnestError(f"{path} stores {(qc.get('config') or {}).get('bits')}-bit {qc.get('method')} codes; --bits only "
                           "re-slices Matryoshka checkpoints (method sliced/matquant)")
    state = _read_state(path, mmap)
    check_config_types(cfg, path)
    check_layer_count(cfg, state, path)
    try:
        config = AutoConfig.from_pretrained(str(path))
        with init_empty_weights(include_buffers=False):  # params on meta: no random init, no double memory
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:
        raise BitnestError(f"could not build the model described by {path}/config.json: {str(e).splitlines()[0]}") from None
    entries = {}
    for name, lc in qc["modules"].items():
        where = f"{path}: layer {name} in quantization_config"
        cls = _module_class(lc, where)
        lc = dict(lc)
        _check_entry(where, name, lc, model)
        r = next((b for pat, b in (overrides or {}).items() if fnmatch.fnmatchcase(name, pat)), bits)
        if r is not None and (lc.get("kind") is None or getattr(cls, "nested", False)):  # a nested kind: Extra Precision
            if not 1 <= r <= lc["bits"]:
                raise BitnestError(f"cannot serve {name} at {r} bits: it stores {lc['bits']}-bit codes (choose 1..{lc['bits']})")
            lc["serve_bits"] = r
        try:
            shell = cls.from_layer_config(lc, device="meta")
        except BitnestError as e:
            raise BitnestError(f"{where}: {e}") from None
        except KeyError as e:
            raise BitnestError(f"{where} lacks the field {e}") from None
        except (TypeError, ValueError, RuntimeError) as e:
            raise BitnestError(f"{where} is malformed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        replace_module(model, name, shell)
        entries[name] = lc
    _check_tensors(path, model, state, entries)
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
    for name, m in _packed_modules(model).items():  # a kind's own invariants on small vectors (IntLinear's M0, k)
        if hasattr(m, "check_loaded") and (why := m.check_loaded()):
            raise BitnestError(f"{path}: layer {name} holds {why}; the checkpoint is damaged")
    model.eval()
    storage = getattr(torch, qc.get("storage_dtype", "float16"))
    return Loaded(model, _load_tokenizer(str(path)), str(path), storage, qc)


def layer_summary(qc: dict) -> dict:
    """What the per-layer entries hold — the truth the loader builds from — as {served, stored, group_size,
    symmetric, kinds}: each a sorted list of the distinct values over the layers."""
    mods = [lc for lc in (qc.get("modules") or {}).values() if isinstance(lc, dict)]

    def vals(key, default=None):
        return sorted({lc.get(key, default) for lc in mods if key in lc or default is not None}, key=repr)

    return {"served": vals("serve_bits") or vals("bits"), "stored": vals("bits"), "group_size": vals("group_size"),
            "symmetric": vals("symmetric"), "kinds": vals("kind", "affine")}


def recipe_mismatch(qc: dict) -> list[str]:
    """Where the recorded recipe (`config`: what the method was asked for) disagrees with every layer entry
    (what the checkpoint holds and the loader uses): a hand-edited or corrupted config. A slice
    (`sliced_from`) keeps its parent's recipe, so its bits are not compared."""
    cfg, lay, out = qc.get("config") or {}, layer_summary(qc), []
    if _is_int(cfg.get("bits")) and lay["stored"] and "sliced_from" not in qc \
            and cfg["bits"] not in lay["served"] + lay["stored"] and not cfg.get("overrides"):
        out.append(f"bits={cfg['bits']} (the layers serve {'/'.join(map(str, lay['served']))})")
    if "group_size" in cfg and lay["group_size"] and set(lay["kinds"]) <= {"affine", "actquant", "matquant_ep"} \
            and cfg["group_size"] not in lay["group_size"]:
        out.append(f"group_size={cfg['group_size']} (the layers: {'/'.join(map(str, lay['group_size']))})")
    if isinstance(cfg.get("symmetric"), bool) and lay["symmetric"] and cfg["symmetric"] not in lay["symmetric"]:
        out.append(f"symmetric={cfg['symmetric']} (the layers: {'/'.join(map(str, lay['symmetric']))})")
    return out


STORAGE_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_quantization_config(path: Path, qc) -> None:
    """The top level of a bitnest quantization_config: the fields the loader reads have the right types."""
    where = f"{path}/config.json: quantization_config"
    if not isinstance(qc, dict):
        raise BitnestError(f"{where} is not a JSON object")
    if not _is_int(qc.get("format_version", 0)):
        raise BitnestError(f"{where}: format_version must be an integer, got {qc.get('format_version')!r}")
    if not isinstance(qc.get("config", {}), dict):
        raise BitnestError(f"{where}: config must be an object, got {qc.get('config')!r}")
    if not isinstance(qc.get("nested", False), bool):
        raise BitnestError(f"{where}: nested must be true or false, got {qc.get('nested')!r}")
    if qc.get("storage_dtype", "float16") not in STORAGE_DTYPES:
        raise BitnestError(f"{where}: storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {qc.get('storage_dtype')!r}")
    mods = qc.get("modules")
    if not isinstance(mods, dict) or not mods:
        raise BitnestError(f"{where} lists no quantized modules (\"modules\" must be a non-empty object)")


def _check_entry(where: str, name: str, lc: dict, model: torch.nn.Module) -> None:
    """One `modules` entry: sane field values, and the Linear it replaces has its shape (metadata only)."""
    for k in ("in_features", "out_features"):
        if not _is_int(lc.get(k)) or lc[k] < 1:
            raise BitnestError(f"{where}: {k} must be a positive integer, got {lc.get(k)!r}")
    for k in ("bits", "parent_bits", "serve_bits"):
        if lc.get(k) is not None and (not _is_int(lc[k]) or not 1 <= lc[k] <= 8):
            raise BitnestError(f"{where}: {k} must be an integer in 1..8, got {lc[k]!r}")
    if "bits" in lc:
        b = lc["bits"]
        c, r = lc.get("parent_bits") or b, lc.get("serve_bits") or b
        if b is None:
            raise BitnestError(f"{where}: bits must be an integer in 1..8, got None")
        if c < b:
            raise BitnestError(f"{where}: parent_bits {c} is below the width of its stored codes ({b} bits); "
                               "parent_bits must be ≥ bits")
        if r > b:
            raise BitnestError(f"{where}: serve_bits {r} is above the width of its stored codes ({b} bits)")
        if r != b and c != b:
            raise BitnestError(f"{where}: serve_bits {r} differs from bits {b}, but a stored {b}-bit slice of a {c}-bit "
                               "grid (bits < parent_bits) serves only its own width")
    g = lc.get("group_size")
    if g is not None and (not _is_int(g) or (g != -1 and g < 1)):
        raise BitnestError(f"{where}: group_size must be null (per channel), -1 (per tensor) or a positive integer, got {g!r}")
    if _is_int(g) and g > 0 and lc["in_features"] % g:
        raise BitnestError(f"{where}: group_size {g} does not divide its {lc['in_features']} input features")
    for k in ("symmetric", "bias"):
        if k in lc and not isinstance(lc[k], bool):
            raise BitnestError(f"{where}: {k} must be true or false, got {lc[k]!r}")
    try:
        orig = model.get_submodule(name)
    except AttributeError:
        raise BitnestError(f"{where}: the model described by config.json has no module {name}") from None
    if not isinstance(orig, torch.nn.Linear):
        raise BitnestError(f"{where}: the model's {name} is a {type(orig).__name__}, not a Linear layer")
    if (orig.in_features, orig.out_features) != (lc["in_features"], lc["out_features"]):
        raise BitnestError(f"{where} says {lc['in_features']} inputs → {lc['out_features']} outputs, but the model's "
                           f"{name} is {orig.in_features} → {orig.out_features} (config.json)")


def _describe(lc: dict) -> str:
    kind = lc.get("kind") or "affine"
    g = lc.get("group_size")
    gran = "per channel" if g is None else "per tensor" if g == -1 else f"group {g}"
    return (f"its {lc['bits']}-bit {kind} entry ({gran}, {lc['in_features']} → {lc['out_features']})"
            if "bits" in lc else f"its {kind} entry ({lc['in_features']} → {lc['out_features']})")


def _check_tensors(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor], entries: dict[str, dict]) -> None:
    """Every stored tensor against the shell its config builds: known name, exact shape, and dtype (packed codes
    and integer tensors exactly; a float tensor may be any float dtype, it is cast as before)."""
    expected = model.state_dict(keep_vars=True)  # meta tensors: shapes and dtypes only
    for k, t in state.items():
        e = expected.get(k)
        owner = k.rpartition(".")[0]
        if e is None:
            what = f"{_describe(entries[owner])} has no tensor of that name" if owner in entries else \
                "the model described by config.json has no tensor of that name"
            raise BitnestError(f"{path}: tensor {k} does not belong in this checkpoint: {what}")
        ok_dtype = t.is_floating_point() if e.is_floating_point() else t.dtype == e.dtype
        if tuple(t.shape) != tuple(e.shape) or not ok_dtype:
            want = "a float tensor" if e.is_floating_point() else str(e.dtype).replace("torch.", "")
            by = _describe(entries[owner]) if owner in entries else "config.json"
            raise BitnestError(f"{path}: tensor {k} is {str(t.dtype).replace('torch.', '')} {list(t.shape)}, but "
                               f"{by} needs {want} of shape {list(e.shape)}")


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
