"""Load a causal LM: a Hugging Face directory (safetensors), a hub id, a llama2.c `.bin`, or a bitnest
quantized checkpoint. Everything that can go wrong with user input becomes a one-line BitnestError."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BitnestError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, tried on the hub only when no such path exists
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "tf_model.h5")


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object | None
    source: str
    storage_dtype: torch.dtype  # dtype of the unquantized tensors on disk (for byte accounting and saving)
    quantization_config: dict | None = None


def _dtype_from_config(cfg: dict) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise BitnestError(f"{path} is not a model directory (no config.json); pass a Hugging Face model directory, a hub id or a llama2.c .bin")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BitnestError(f"{f} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None


def safetensors_files(path: Path) -> list[Path]:
    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        try:
            names = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise BitnestError(f"{idx} is corrupt ({e})") from None
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def check_safetensors(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files, each opened once so a truncated or corrupt file fails here with one line."""
    from safetensors import safe_open

    files = safetensors_files(path)
    if not files:
        pickled = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickled and not allow_pickle:
            raise BitnestError(f"{path} has only pickle weights ({pickled[0]}); bitnest loads safetensors only "
                               "(convert them, or pass --allow-pickle if you trust the file)")
        if not pickled:
            raise BitnestError(f"{path} has no weights (no *.safetensors file)")
    for f in files:
        if not f.is_file():
            raise BitnestError(f"weight shard {f} listed in the index is missing")
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except Exception as e:  # SafetensorError / OSError: truncated or not safetensors at all
            raise BitnestError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return files


def check_finite(model: torch.nn.Module) -> None:
    """NaN/Inf anywhere is a one-line error. Checked in chunks of 1M values: a whole-tensor isfinite() would
    allocate a mask as large as the embedding, and the freed memory stays in the process (heap fragmentation)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not t.is_meta:
            if not all(torch.isfinite(c).all() for c in t.detach().reshape(-1).split(1 << 20)):
                raise BitnestError(f"weight {name} contains NaN or Inf values; refusing to quantize a broken model")


def _load_tokenizer(src: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception:
        if (Path(src) / "tokenizer.bin").is_file():  # a llama2.c tokenizer carried by a bitnest checkpoint
            from .llama2c import Llama2cTokenizer
            return Llama2cTokenizer.from_file(Path(src) / "tokenizer.bin")
        return None


def _load_hf(src: str, dtype: torch.dtype, allow_pickle: bool) -> Loaded:
    from transformers import AutoModelForCausalLM

    p = Path(src)
    if p.exists():
        cfg = read_config(p)
        check_safetensors(p, allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, use_safetensors=None if allow_pickle else True)
    except BitnestError:
        raise
    except Exception as e:
        where = "directory" if p.exists() else "hub id (needs network access)"
        raise BitnestError(f"could not load model {src} as a Hugging Face {where}: {str(e).splitlines()[0][:300]}") from None
    if not p.exists():
        cfg = model.config.to_dict()
    model.eval()
    return Loaded(model, _load_tokenizer(src), str(src), _dtype_from_config(cfg))


def _looks_like_llama2c(p: Path) -> Path | None:
    if p.is_file() and p.suffix == ".bin" and p.name != "pytorch_model.bin":
        return p
    if p.is_dir() and not (p / "config.json").exists():
        bins = [b for b in p.glob("*.bin") if not b.name.startswith("tok")]
        if len(bins) == 1:
            return bins[0]
    return None


def load_model(src: str | os.PathLike, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
               bits: int | None = None, check: bool = True) -> Loaded:
    """Load anything bitnest understands. `bits` serves a Matryoshka checkpoint at r bits; `dtype` is the dtype of
    every unquantized tensor (and so of the activations). A loaded bitnest checkpoint gets
    `model.set_precision(...)` and `model.precision()` (bitnest.runtime) to switch widths in memory."""
    p = Path(src)
    if not p.exists() and not HUB_ID.match(str(src)):
        raise BitnestError(f"model {src} not found: pass a model directory, a llama2.c .bin or a hub id like org/name")
    if (binp := _looks_like_llama2c(p)) is not None:
        from .llama2c import load_llama2c
        model, tok = load_llama2c(binp)
        loaded = Loaded(model, tok, str(binp), torch.float32)
    elif p.is_dir() and read_config(p).get("quantization_config", {}).get("quant_method") == "bitnest":
        from ..formats.checkpoint import load_quantized
        loaded = load_quantized(p, bits=bits, dtype=dtype)
        from .. import runtime  # the run-time precision switch, bound to the model (upward import: loaders are API)
        runtime.attach(loaded.model)
    else:
        loaded = _load_hf(str(src), dtype, allow_pickle)
    if bits is not None and loaded.quantization_config is None:
        raise BitnestError("--bits applies to bitnest Matryoshka checkpoints; this model is not quantized")
    if check:
        check_finite(loaded.model)
    return loaded
