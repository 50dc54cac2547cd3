"""Exports of a bitnest checkpoint to formats other runtimes load: GPTQ, compressed-tensors, GGUF.

`bitnest export --model CKPT --to gptq|compressed-tensors|gguf [--bits r | --budget B] --out PATH`

Every writer reads the same thing: each quantized Linear as the standalone r-bit layer it serves (a Matryoshka
checkpoint at the chosen width or Mix'n'Match mix): codes t ∈ [0, 2^r), scale α' = α·2^(c−r) and zero point
z' = z / 2^(c−r) per group, ŵ = α'(t − z'). Which grids a format represents exactly:

  grid                                   GPTQ            compressed-tensors    GGUF (gguf.py has the full table)
  symmetric (z' = 2^(r−1))               exact 2,3,4,8   exact 1–8             exact: Q8_0 (r = 8, 7), Q6_K (6),
                                                                               Q5_0 (5), Q4_0 (4), Q3_K (3), Q2_K (2),
                                                                               TQ2_0 (1)
  asymmetric, integer z' (int_zero)      exact 2,3,4,8   exact 1–8             exact: Q8_0 (7, 6), Q5_K (5), Q4_K (4),
                                                                               Q4_0 (3), Q2_K (2), TQ2_0 (1); Q5_1 /
                                                                               Q4_1 (μ = −α'z' in fp16) below g256
  asymmetric, real z' (the paper's)      zero rounded    zero rounded          Q5_K/Q4_K/Q2_K: dmin·m fitted to α'z';
                                                                               Q5_1/Q4_1: μ in fp16
  BitNet (±β, no post_ln)                not at all      not at all            TQ2_0 exact
  OneBit / codebooks / Extra Precision   not at all (a clear error)

GGUF's K-quants (Q2_K–Q6_K, TQ2_0) need in_features a multiple of 256 and, to be exact, whole 256-weight
super-blocks per group (per channel or g a multiple of 256): smaller groups (16–128) are approximate (the groups'
scales fitted to the super-block's 4–8-bit sub-block scales), as are the fp16-rounded mins above; the legacy
32-weight types (Q8_0, Q5_0/1, Q4_0/1) take any g that is a multiple of 32.

A Matryoshka checkpoint served at r < c has z' = z / 2^(c−r), an integer only where 2^(c−r) divides z: integer zero
points make its c-bit parent exact, not its slices. Symmetric grids (z = 2^(c−1), so z' = 2^(r−1)) make every slice
exact — quantize nested checkpoints with --symmetric when they are meant for export.

"zero rounded" writes round(z') and reports the largest weight change it makes (`approximate=True` only;
otherwise a one-line error that says how to get an exact export: `-o int_zero=true` or `--symmetric`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BitnestError

FORMATS = ("gptq", "compressed-tensors", "gguf")


@dataclass
class Layer:
    """One quantized Linear as the standalone r-bit layer it serves."""
    name: str
    codes: torch.Tensor       # (out, in) uint8 in [0, 2^bits)
    scale: torch.Tensor       # (R, G) float16: α' (R = out, or 1 per tensor)
    zero: torch.Tensor        # (R, G) float32: z' (2^(bits−1) for symmetric grids)
    bits: int
    group_size: int           # inputs per group (in_features for per channel)
    symmetric: bool
    per_tensor: bool
    bias: torch.Tensor | None

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def integer_zero(self) -> bool:
        return bool((self.zero == self.zero.round()).all())

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """(R, G) per-row-group values expanded to (out, G)."""
        return t.expand(self.out_features, t.shape[1]) if self.per_tensor else t

    def weight(self, zero: torch.Tensor | None = None) -> torch.Tensor:
        """ŵ (out, in) in fp32, with `zero` instead of z' if given."""
        z = self.rows(self.zero if zero is None else zero)
        a = self.rows(self.scale.float())
        g = self.group_size
        q = self.codes.float().reshape(self.out_features, -1, g)  # (out, G, g)
        return (a.unsqueeze(-1) * (q - z.unsqueeze(-1))).reshape(self.codes.shape)


def affine_layers(model: torch.nn.Module) -> list[Layer]:
    """Every packed layer as a Layer; a clear error for kinds no export represents."""
    from ..eval.bits import packed_modules
    from ..formats.packing import unpack
    from ..nn.qlinear import QuantLinear

    out = []
    for name, m in packed_modules(model).items():
        if type(m) is not QuantLinear:
            kind = getattr(m, "kind", type(m).__name__)
            raise BitnestError(f"{name} is a {kind} layer, which no GPTQ / compressed-tensors / GGUF type represents; "
                               "export affine checkpoints (rtn, gptq, sliced, matquant, clip, mixed)")
        p = m.packed
        r, c = p.bits, p.parent_bits
        s = c - r
        scale = p.scale.float() * (1 << s)
        if scale.abs().max() > torch.finfo(torch.float16).max:
            raise BitnestError(f"{name}: the int{r} slice's scale α·2^{s} overflows float16")
        z = torch.full_like(scale, float(1 << (c - 1))) if p.zero is None else p.zero.float()
        K = p.in_features
        out.append(Layer(name, unpack(p.qweight, r, K), scale.half(), z / (1 << s), r,
                         K if p.group_size in (None, -1) else p.group_size, p.zero is None, p.group_size == -1,
                         None if m.bias is None else m.bias.detach()))
    if not out:
        raise BitnestError("this model has no quantized Linear layers to export")
    return out


def zero_for_export(layer: Layer, approximate: bool) -> tuple[torch.Tensor, float]:
    """Integer zero points for formats that store them; the largest |Δŵ| rounding them makes (0 when exact)."""
    if layer.integer_zero():
        return layer.zero.round(), 0.0
    if not approximate:
        raise BitnestError(f"{layer.name} has real-valued zero points (the paper's asymmetric grid), which this format "
                           "stores as integers; quantize with -o int_zero=true or --symmetric for an exact export, or "
                           "pass --approximate to round them")
    zr = layer.zero.round().clamp(0, (1 << layer.bits) - 1)
    return zr, float((layer.weight(zr) - layer.weight()).abs().max())


def load_for_export(ckpt: str, bits: int | None = None, budget: float | None = None, dtype=torch.float32):
    """The checkpoint loaded at the width / mix to export (a Matryoshka checkpoint's chosen precision)."""
    from .. import runtime
    from ..models.hf import load_model

    loaded = load_model(ckpt, dtype=dtype)
    if loaded.quantization_config is None:
        raise BitnestError(f"{ckpt} is not a bitnest checkpoint; quantize it first (bitnest quantize)")
    if bits is not None or budget is not None:
        if not loaded.quantization_config.get("nested"):
            raise BitnestError("--bits/--budget choose the precision of a Matryoshka checkpoint (sliced/matquant); "
                               f"{ckpt} stores {loaded.quantization_config['config'].get('bits')}-bit codes")
        runtime.set_precision(loaded.model, bits, budget=budget)
    return loaded


def unquantized_state(model: torch.nn.Module, layers: list[Layer], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor that is not part of a quantized layer, in `dtype` (floats), tied duplicates once."""
    names = {l.name for l in layers}
    seen, out = set(), {}
    for k, t in model.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if mod in names:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = (t.to(dtype) if t.is_floating_point() else t).detach().contiguous().cpu()
    return out


def export(ckpt: str, to: str, out: str, *, bits: int | None = None, budget: float | None = None,
           approximate: bool = False, overwrite: bool = False, **kw) -> dict:
    """Write `ckpt` (at `bits` / `budget`) in format `to` to `out`; returns a summary (files, per-layer error)."""
    if to not in FORMATS:
        raise BitnestError(f"unknown export format {to!r}; choose from {', '.join(FORMATS)}")
    loaded = load_for_export(ckpt, bits, budget)
    if to == "gguf":  # GGUF also holds BitNet's sign layers (TQ2_0)
        from .gguf import gguf_layers, write_gguf
        return write_gguf(loaded, gguf_layers(loaded.model), Path(out), approximate=approximate, overwrite=overwrite,
                          **kw)
    layers = affine_layers(loaded.model)
    if to == "gptq":
        from .gptq import write_gptq
        return write_gptq(loaded, layers, Path(out), approximate=approximate, overwrite=overwrite, **kw)
    from .ctensors import write_compressed_tensors
    return write_compressed_tensors(loaded, layers, Path(out), approximate=approximate, overwrite=overwrite)


def save_hf_dir(tmp: Path, loaded, state: dict[str, torch.Tensor], quantization_config: dict | None,
                dtype: torch.dtype) -> None:
    """config.json (the model's config + `quantization_config`), sharded safetensors, the tokenizer."""
    import json

    from ..formats.checkpoint import write_shards

    write_shards(tmp, state)
    cfg = loaded.model.config.to_dict()
    cfg.pop("quantization_config", None)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    cfg["dtype"] = str(dtype).replace("torch.", "")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    if loaded.tokenizer is not None and hasattr(loaded.tokenizer, "save_pretrained"):
        loaded.tokenizer.save_pretrained(str(tmp))


def groups_of(layers: list[Layer]) -> dict[tuple, list[Layer]]:
    """Layers by (bits, group size, symmetric): one config group / dynamic entry per set."""
    out: dict[tuple, list[Layer]] = {}
    for l in layers:
        out.setdefault((l.bits, l.group_size if l.group_size != l.in_features else None, l.symmetric), []).append(l)
    return out


__all__ = ["export", "FORMATS", "Layer", "affine_layers", "zero_for_export"]
