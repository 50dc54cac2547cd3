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
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BitnestError(f"{f} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    except RecursionError:
        raise BitnestError(f"{f} is not valid JSON (nested too deeply)") from None
    if not isinstance(cfg, dict):
        raise BitnestError(f"{f} is not a model config (a JSON object), it holds a {type(cfg).__name__}")
    qc = cfg.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise BitnestError(f"{f}: quantization_config must be a JSON object, got a {type(qc).__name__}")
    return cfg


def safetensors_files(path: Path) -> list[Path]:
    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        try:
            wmap = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(wmap.values()))
            if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
                raise ValueError("weight_map must map tensor names to file names in the same directory")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise BitnestError(f"{idx} is corrupt ({type(e).__name__}: {e})") from None
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _load_tokenizer(src: str):
    """The model's tokenizer; None when the directory has none. Tokenizer files that are there but cannot be
    read (truncated, not JSON, another file under a tokenizer's name) are a one-line error naming the file —
    not a model that silently has no tokenizer."""
    from transformers import AutoTokenizer

    p = Path(src)
    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 — tokenizer libraries raise anything on a bad file
        err = e
    if (p / "tokenizer.bin").is_file():  # a llama2.c tokenizer carried by a bitnest checkpoint
        from .llama2c import Llama2cTokenizer
        return Llama2cTokenizer.from_file(p / "tokenizer.bin")
    present = [n for n in TOKENIZER_FILES if (p / n).is_file()]
    if present:
        msg = (str(err).splitlines() or [""])[0][:200]
        raise BitnestError(f"{p / present[0]}: the tokenizer in {p} cannot be read ({type(err).__name__}: {msg}); "
                           "restore its tokenizer files from the original model")
    return None


def check_config_types(cfg: dict, where: Path) -> None:
    """config.json's fields against the types of its model class's defaults: a flag that must be true/false, a
    size that must be an integer, a float that must be a finite number. transformers builds a model from such a
    config and fails (or returns a tuple instead of logits) only at the first forward. Metadata only; token ids
    (an int or a list) and fields whose default is None are not checked."""
    import math

    from transformers import AutoConfig

    mt = cfg.get("model_type")
    try:
        defaults = AutoConfig.for_model(mt).to_dict() if isinstance(mt, str) else {}
    except Exception:  # an unknown model_type: transformers says so when it builds the model
        return
    for k, v in cfg.items():
        d = defaults.get(k)
        if d is None or k.endswith(("token_id", "token_ids")) or k == "quantization_config":
            continue
        if isinstance(d, bool):
            ok = isinstance(v, bool)
        elif v is None:
            ok = True
        elif isinstance(d, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(d, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                and not (k.endswith("eps") and v < 0)  # a negative norm epsilon: NaN logits
        elif isinstance(d, str):
            ok = isinstance(v, str)
        else:
            ok = True
        if not ok:
            want = {bool: "true or false", int: "an integer", float: "a finite number" + (" ≥ 0" if k.endswith("eps") else ""),
                    str: "a string"}[type(d)]
            raise BitnestError(f"{where}/config.json: {k} must be {want}, got {json.dumps(v)[:60]}")


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_layer_count(cfg: dict, keys, where: Path) -> None:
    """config.json's num_hidden_layers against the decoder layers the weights hold (`...layers.N....` names):
    more would build (and randomly fill) layers that are not there — or, hostile, millions of them before any
    shape is compared; fewer would silently drop the rest. Names only."""
    n = cfg.get("num_hidden_layers")
    if n is None:
        return
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BitnestError(f"{where}/config.json: num_hidden_layers must be a positive integer, got {n!r}")
    idx = {int(m.group(1)) for k in keys if (m := _LAYER_INDEX.search(k))}
    if idx and n != max(idx) + 1:
        raise BitnestError(f"{where}/config.json says num_hidden_layers={n}, but its weights hold {max(idx) + 1} layers")


def _headers(files: list[Path]) -> dict[str, tuple[str, list[int], Path]]:
    """name -> (safetensors dtype, shape, file) from the files' headers (metadata only, no tensor is read)."""
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                out[k] = (sl.get_dtype(), list(sl.get_shape()), f)
    return out


_FLOAT_ST = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _check_fp_dtypes(heads: dict[str, tuple[str, list[int], Path]]) -> None:
    """A full-precision checkpoint's weights and biases are floats: an integer `...weight` would be cast to
    float by transformers and quantized as if it were real (silently wrong). Header metadata only."""
    for k, (dt, shape, f) in heads.items():
        if k.rpartition(".")[2] in ("weight", "bias") and dt not in _FLOAT_ST:
            raise BitnestError(f"{f}: tensor {k} is stored as {dt} {shape}; a full-precision weight must be a float "
                               "tensor (F32/F16/BF16) — this file is not a full-precision model")


def _shape_report(src: str, files: list[Path]) -> str:
    """After transformers refused a size mismatch (its report is a log we silence): name the first tensor whose
    stored shape differs from the one config.json gives it, found on a meta-device model (no memory)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
        expected = model.state_dict()
        for k, (dt, shape, f) in _headers(files).items():
            if k in expected and list(expected[k].shape) != shape:
                return f"{f}: tensor {k} has shape {shape}, but config.json makes it {list(expected[k].shape)}"
    except Exception:  # noqa: BLE001 — only a better message is at stake
        pass
    return f"{src}: a tensor's shape does not match the one config.json gives it"


def _load_hf(src: str, dtype: torch.dtype, allow_pickle: bool) -> Loaded:
    from transformers import AutoModelForCausalLM

    p = Path(src)
    files = []
    if p.exists():
        cfg = read_config(p)
        files = check_safetensors(p, allow_pickle)
        heads = _headers(files)
        check_config_types(cfg, p)
        check_layer_count(cfg, heads, p)
        if "quantization_config" not in cfg:  # other formats (GPTQ, bitsandbytes...) store integer tensors by design
            _check_fp_dtypes(heads)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, use_safetensors=None if allow_pickle else True,
                                                           output_loading_info=True)
    except BitnestError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if "mismatched_sizes" in msg or "size mismatch" in msg:
            raise BitnestError(f"could not load model {src}: {_shape_report(src, files)}") from None
        where = "directory" if p.exists() else "hub id (needs network access)"
        raise BitnestError(f"could not load model {src} as a Hugging Face {where}: {msg}") from None
    missing = sorted((info or {}).get("missing_keys") or ())
    if missing:  # transformers would fill them with random values and carry on
        raise BitnestError(f"{src} lacks {len(missing)} weight(s) its config.json needs, e.g. {missing[0]}; "
                           "the checkpoint is incomplete or belongs to another architecture")
    extra = sorted(k for k in (info or {}).get("unexpected_keys") or () if k.rpartition(".")[2] in ("weight", "bias"))
    if extra:  # weights the config has no place for: transformers would drop them and run a different model
        raise BitnestError(f"{src} holds {len(extra)} weight(s) its config.json has no place for, e.g. {extra[0]}; "
                           "config.json does not describe these weights")
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
    elif p.is_dir() and (read_config(p).get("quantization_config") or {}).get("quant_method") == "bitnest":
        from ..formats.checkpoint import load_quantized
        loaded = load_quantized(p, bits=bits, dtype=dtype)
        from .. import runtime  # the run-time precision switch, bound to the model (upward import: loaders are API)
        runtime.attach(loaded.model)
    else:
        loaded = _load_hf(str(src), dtype, allow_pickle)
    if bits is not None and loaded.quantization_config is None:
        raise BitnestError("--bits applies to bitnest Matryoshka checkpoints; this model is not quantized")
    cfg = getattr(loaded.model, "config", None)
    if getattr(cfg, "return_dict", True) is False:  # an output-format flag: bitnest reads `.logits`, so keep dicts
        cfg.return_dict = True
    _check_vocab(loaded)
    if check:
        check_finite(loaded.model)
    return loaded


def _check_vocab(loaded: Loaded) -> None:
    """A tokenizer with more tokens than the model has embedding rows is another model's tokenizer: its ids
    would index past the embedding at the first prompt that uses them."""
    emb = loaded.model.get_input_embeddings() if hasattr(loaded.model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    try:
        n = len(loaded.tokenizer) if loaded.tokenizer is not None else None
    except TypeError:
        n = None
    if rows and n and n > rows:
        raise BitnestError(f"the tokenizer of {loaded.source} has {n} tokens but the model embeds only {rows}: "
                           "it is not this model's tokenizer")
