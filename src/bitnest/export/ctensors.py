"""compressed-tensors `pack-quantized` (what llm-compressor writes and vLLM / transformers load).

Per quantized Linear: `weight_packed` int32 (out, ⌈in·b/32⌉) — the signed codes t − 2^(b−1) packed by
compressed-tensors' own `pack_to_int32` —, `weight_scale` (out, G) float16 = α', `weight_shape` [out, in], and for
asymmetric grids `weight_zero_point` = z' − 2^(b−1) (integers, packed along the output dimension as the library
does). compressed-tensors dequantizes (t − 2^(b−1) − zp)·scale = α'(t − z'): exact for symmetric and integer-zero
grids. One config group per (bits, group size, symmetry), its targets the exact module names ("re:^name$"), so a
mixed-precision export never shares a bare `Linear` target between two widths. Embeddings and lm_head stay in
the model dtype and are listed in `ignore`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import BitnestError
from . import Layer, groups_of, save_hf_dir, unquantized_state, zero_for_export


def _library():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError:
        raise BitnestError("exporting compressed-tensors needs the compressed-tensors package "
                           "(pip install 'bitnest[export]')") from None
    return pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def layer_tensors(layer: Layer, approximate: bool, pack_to_int32) -> tuple[dict[str, torch.Tensor], float]:
    b = layer.bits
    off = 1 << (b - 1)
    signed = (layer.codes.to(torch.int16) - off).to(torch.int8)  # (out, in)
    t = {"weight_packed": pack_to_int32(signed, b),
         "weight_scale": layer.rows(layer.scale).contiguous(),
         "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    err = 0.0
    if not layer.symmetric:
        z, err = zero_for_export(layer, approximate)
        zp = (layer.rows(z) - off).to(torch.int8).contiguous()  # (out, G) in [−2^(b−1), 2^(b−1))
        t["weight_zero_point"] = pack_to_int32(zp, b, packed_dim=0)
    if layer.bias is not None:
        t["bias"] = layer.bias
    return t, err


def write_compressed_tensors(loaded, layers: list[Layer], out: Path, *, approximate: bool = False,
                             overwrite: bool = False) -> dict:
    from ..formats.checkpoint import atomic_dir

    pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme = _library()
    dtype = loaded.storage_dtype  # the unquantized tensors as the checkpoint stores them (nothing re-rounded)
    state = unquantized_state(loaded.model, layers, dtype)
    errors = {}
    for l in layers:
        t, err = layer_tensors(l, approximate, pack_to_int32)
        errors[l.name] = err
        state.update({f"{l.name}.{k}": (v.to(dtype) if k == "bias" else v) for k, v in t.items()})
    config_groups = {}
    for i, ((bits, g, sym), ls) in enumerate(sorted(groups_of(layers).items(), key=lambda kv: str(kv[0]))):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel" if g is None else "group",
                                group_size=g, dynamic=False)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=[f"re:^{re.escape(l.name)}$" for l in ls], weights=args,
                                                         format="pack-quantized")
    qc = QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed",
                            ignore=["lm_head"])
    qdict = qc.model_dump(exclude_none=True)
    qdict["quant_method"] = "compressed-tensors"
    with atomic_dir(out, overwrite) as tmp:
        save_hf_dir(tmp, loaded, state, qdict, dtype)
    return {"format": "compressed-tensors", "out": str(out), "layers": len(layers), "groups": len(config_groups),
            "max_abs_weight_change": max(errors.values())}
