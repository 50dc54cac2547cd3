"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout, loaded by transformers + optimum, GPTQModel and vLLM).

Per quantized Linear: `qweight` int32 (in·b/32, out) — for every output column, the codes of its inputs as one
LSB-first bit stream in 32-bit words (for b = 3 too: AutoGPTQ's 3-bit packing is that same stream, 32 codes in 3
words) —, `qzeros` int32 (G, out·b/32) the zero points packed the same way along the outputs, `scales` float16
(G, out), `g_idx` int32 (in,) = j // group size, and `bias`. Dequantization: w = scales·(q − zero), where the
stored zero is z − 1 in the v1 convention (AutoGPTQ, transformers/optimum: `checkpoint_format: "gptq"`) and z
itself in v2 (GPTQModel's `gptq_v2`). v1 cannot store z = 0 (z − 1 = −1 wraps to 2^b − 1): such layers need v2.

bitnest's codes per row (out, ⌈in·b/8⌉ bytes, LSB-first) are exactly those streams, so `qweight` is the packed
codes viewed as little-endian int32 and transposed — no repacking, nothing lost. Widths 2, 3, 4, 8 (what GPTQ
kernels take); mixed widths go to GPTQModel's `dynamic` map (one `+:^name$` entry per layer that differs from the
base width); layers bitnest left unquantized are excluded with `-:^name$`.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from .. import __version__
from ..errors import BitnestError
from ..formats.packing import pack
from . import Layer, save_hf_dir, unquantized_state, zero_for_export

WIDTHS = (2, 3, 4, 8)


def words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) codes -> (rows, n·b/32) int32: each row's LSB-first bit stream in little-endian 32-bit words."""
    n = codes.shape[1]
    if n * bits % 32:
        raise BitnestError(f"GPTQ packs {bits}-bit codes in 32-bit words: {n} values per row do not fill whole words")
    packed = pack(codes, bits)  # (rows, n·b/8) uint8
    buf = torch.empty(packed.shape, dtype=torch.uint8)  # fresh strides (a 1-row result may carry stride 1)
    buf.copy_(packed)
    return buf.view(torch.int32)


def layer_tensors(layer: Layer, fmt: str, approximate: bool) -> tuple[dict[str, torch.Tensor], float]:
    b = layer.bits
    if b not in WIDTHS:
        raise BitnestError(f"{layer.name}: GPTQ has no {b}-bit kernels (widths {', '.join(map(str, WIDTHS))}); "
                           "export another width (--bits) or use compressed-tensors")
    if layer.per_tensor:
        raise BitnestError(f"{layer.name}: a per-tensor grid; GPTQ stores per-channel or per-group scales")
    z, err = zero_for_export(layer, approximate) if not layer.symmetric else (layer.zero, 0.0)
    z = z.to(torch.int64)  # (out, G)
    if fmt == "v1":
        if (z == 0).any():
            raise BitnestError(f"{layer.name} has zero points equal to 0, which GPTQ v1 (stores z − 1) cannot hold; "
                               "export with --gptq-format v2")
        z = z - 1
    G = layer.scale.shape[1]
    t = {"qweight": words(layer.codes, b).t().contiguous(),                               # (in·b/32, out)
         "qzeros": words(z.t().contiguous().to(torch.uint8), b),                          # (G, out·b/32)
         "scales": layer.scale.t().contiguous(),                                          # (G, out)
         "g_idx": (torch.arange(layer.in_features) // (layer.in_features // G)).to(torch.int32)}
    if layer.bias is not None:
        t["bias"] = layer.bias.to(torch.float16)
    return t, err


def _pattern(name: str) -> str:
    return f"^{re.escape(name)}$"


def gptq_config(layers: list[Layer], skipped: list[str], fmt: str) -> dict:
    key = lambda l: (l.bits, -1 if l.group_size == l.in_features else l.group_size, l.symmetric)  # noqa: E731
    (bits, g, sym), _ = Counter(key(l) for l in layers).most_common(1)[0]
    dynamic = {f"+:{_pattern(l.name)}": {"bits": k[0], "group_size": k[1], "sym": k[2]}
               for l in layers if (k := key(l)) != (bits, g, sym)}
    dynamic.update({f"-:{_pattern(n)}": {} for n in skipped})
    qc = {"quant_method": "gptq", "bits": bits, "group_size": g, "sym": sym, "desc_act": False, "static_groups": False,
          "true_sequential": True, "lm_head": False, "damp_percent": 0.01, "pack_dtype": "int32",
          "checkpoint_format": "gptq" if fmt == "v1" else "gptq_v2", "meta": {"quantizer": [f"bitnest:{__version__}"]}}
    if dynamic:
        qc["dynamic"] = dynamic
    return qc


def write_gptq(loaded, layers: list[Layer], out: Path, *, gptq_format: str = "v1", approximate: bool = False,
               overwrite: bool = False) -> dict:
    from ..formats.checkpoint import atomic_dir
    from ..models.blocks import get_blocks

    if gptq_format not in ("v1", "v2"):
        raise BitnestError(f"--gptq-format must be v1 or v2, got {gptq_format!r}")
    dtype = torch.float16
    state = unquantized_state(loaded.model, layers, dtype)
    errors = {}
    for l in layers:
        t, errors[l.name] = layer_tensors(l, gptq_format, approximate)
        state.update({f"{l.name}.{k}": v for k, v in t.items()})
    names = {l.name for l in layers}
    prefix = get_blocks(loaded.model)[0]
    skipped = [n for n, m in loaded.model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(prefix + ".") and n not in names]
    qc = gptq_config(layers, skipped, gptq_format)
    with atomic_dir(out, overwrite) as tmp:
        save_hf_dir(tmp, loaded, state, qc, dtype)
        import json
        (tmp / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items() if k != "quant_method"}, indent=2))
    return {"format": f"gptq ({gptq_format})", "out": str(out), "layers": len(layers), "skipped": skipped,
            "max_abs_weight_change": max(errors.values())}
