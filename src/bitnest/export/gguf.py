"""GGUF for llama.cpp / Ollama, written through the `gguf` package (GGUFWriter, its tensor-name map and vocab).

Which bitnest layers become which GGML type (blocks of 32 inputs, one fp16 scale per block — so a grid maps only
when its groups are whole blocks: per channel, or a group size that is a multiple of 32):

  symmetric int8  → Q8_0   w = d·(t − 128)           exact
  symmetric int4  → Q4_0   w = d·(t − 8)              exact
  asymmetric int4 → Q4_1   w = d·t + m, m = −α'z'     m rounded to fp16: approximate (the largest weight change
                                                      is reported; llama.cpp's perplexity is the measure)
  anything else (2, 3, 5, 6, 7 bits; OneBit; codebooks) → a one-line error: the K-quants and ternary types hold
  per-block scales quantized to 4–6 bits, which do not represent our fp16 per-group scales.

Quantized blocks are packed here from our own codes (never re-quantized from floats) and checked against gguf's
own dequantizer before the file is written. Unquantized tensors (embeddings, norms, layers bitnest left in full
precision) are written as F32 (norms) / F16. Llama-architecture models only; q/k rows are permuted to
llama.cpp's rotary layout exactly as llama.cpp's convert_hf_to_gguf.py does (a row permutation: codes and
scales move together).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import BitnestError
from . import Layer, unquantized_state

BLOCK = 32


def _gguf():
    try:
        import gguf
    except ImportError:
        raise BitnestError("exporting GGUF needs the gguf package (pip install 'bitnest[export]')") from None
    return gguf


def ggml_type(layer: Layer, gguf):
    T = gguf.GGMLQuantizationType
    if layer.group_size % BLOCK or layer.in_features % BLOCK:
        raise BitnestError(f"{layer.name}: group size {layer.group_size} is not a multiple of GGUF's 32-weight blocks")
    if layer.symmetric and layer.bits == 8:
        return T.Q8_0
    if layer.symmetric and layer.bits == 4:
        return T.Q4_0
    if not layer.symmetric and layer.bits == 4:
        return T.Q4_1
    raise BitnestError(f"{layer.name}: no GGUF type holds a {'symmetric' if layer.symmetric else 'asymmetric'} "
                       f"{layer.bits}-bit grid exactly (Q8_0: symmetric int8, Q4_0: symmetric int4, Q4_1: int4); "
                       "export a Matryoshka checkpoint with --bits 8 or 4, or quantize with --symmetric")


def blocks(layer: Layer, qtype, gguf) -> np.ndarray:
    """(out, in/32 · bytes per block) uint8: the layer's codes and scales as GGML blocks."""
    T = gguf.GGMLQuantizationType
    out, K = layer.codes.shape
    nb = K // BLOCK
    per = layer.group_size // BLOCK  # blocks per group
    d = layer.rows(layer.scale).repeat_interleave(per, dim=1)  # (out, nb) float16
    q = layer.codes.reshape(out, nb, BLOCK).to(torch.int16)    # (out, nb, 32)
    d_bytes = d.contiguous().view(torch.uint8).reshape(out, nb, 2)
    if qtype == T.Q8_0:
        body = (q - 128).to(torch.int8).view(torch.uint8)
        parts = [d_bytes, body]
    else:
        nib = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)  # byte j: element j (low), j + 16 (high)
        parts = [d_bytes]
        if qtype == T.Q4_1:
            m = (-(layer.rows(layer.scale).float() * layer.rows(layer.zero))).half()  # (out, G): m = −α'z'
            parts.append(m.repeat_interleave(per, dim=1).contiguous().view(torch.uint8).reshape(out, nb, 2))
        parts.append(nib)
    return torch.cat(parts, dim=-1).reshape(out, -1).numpy()


def _permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order for q/k: (n_head, 2, d/2) -> (n_head, d/2, 2) over the output rows."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _permuted(layer: Layer, n_head: int) -> Layer:
    import dataclasses
    return dataclasses.replace(layer, codes=_permute(layer.codes, n_head),
                               scale=layer.scale if layer.per_tensor else _permute(layer.scale, n_head),
                               zero=layer.zero if layer.per_tensor else _permute(layer.zero, n_head))


def _add_vocab(w, loaded, gguf) -> None:
    tok = loaded.tokenizer
    src = Path(loaded.source)
    if hasattr(tok, "pieces"):  # bitnest's llama2.c tokenizer: sentencepiece-style pieces and scores
        w.add_tokenizer_model("llama")
        w.add_token_list([p for p in tok.pieces])
        w.add_token_scores([float(s) for s in tok.scores])
        types = [gguf.TokenType.NORMAL] * len(tok.pieces)
        types[0] = gguf.TokenType.UNKNOWN
        for i in (tok.bos_token_id, tok.eos_token_id):
            types[i] = gguf.TokenType.CONTROL
        for i in getattr(tok, "_byte_value", {}):
            types[i] = gguf.TokenType.BYTE
        w.add_token_types(types)
        w.add_bos_token_id(tok.bos_token_id)
        w.add_eos_token_id(tok.eos_token_id)
        w.add_unk_token_id(0)
        return
    try:
        vocab = gguf.vocab.BpeVocab(src)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise BitnestError(f"{src}: GGUF export reads byte-level BPE tokenizers (tokenizer.json) and llama2.c ones; "
                           f"this one is not ({e})") from None
    toks, types = [], []
    for text, _, ttype in list(vocab.bpe_tokens()) + list(vocab.added_tokens()):
        toks.append(text)
        types.append(ttype)
    special = {getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    types = [gguf.TokenType.CONTROL if i in special else t for i, t in enumerate(types)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types(types)
    gguf.vocab.SpecialVocab(src, load_merges=True, n_vocab=len(toks)).add_to_gguf(w)


def write_gguf(loaded, layers: list[Layer], out: Path, *, approximate: bool = False, overwrite: bool = False) -> dict:
    gguf = _gguf()
    cfg = loaded.model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise BitnestError(f"GGUF export writes Llama-architecture models; this one is {getattr(cfg, 'model_type', '?')!r}")
    out = Path(out)
    if out.suffix != ".gguf":
        out = out / "model.gguf" if out.is_dir() or not out.suffix else out.with_suffix(".gguf")
    if out.exists() and not overwrite:
        raise BitnestError(f"output {out} already exists (pass --overwrite to replace it)")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    by_name = {l.name: l for l in layers}
    T = gguf.GGMLQuantizationType
    tensors: list[tuple[str, np.ndarray, object]] = []  # (gguf name, data, raw type or None)
    errors, types = {}, {}
    for l in layers:
        qtype = ggml_type(l, gguf)
        if l.name.endswith("q_proj"):
            l = _permuted(l, n_head)
        elif l.name.endswith("k_proj"):
            l = _permuted(l, n_kv)
        data = blocks(l, qtype, gguf)
        back = torch.from_numpy(gguf.quants.dequantize(data, qtype).copy())  # gguf's decoder, our meaning
        want = l.weight()
        err = float((back - want).abs().max())
        if qtype != T.Q4_1 and err > 0:
            raise BitnestError(f"internal: {l.name} does not decode back exactly through gguf ({err:.3g})")
        if qtype == T.Q4_1 and err > 0 and not approximate:
            raise BitnestError(f"{l.name}: Q4_1 stores m = −α·z in float16, which changes weights by up to {err:.3g} "
                               "here; pass --approximate to accept, or quantize with --symmetric (Q4_0, exact)")
        errors[l.name], types[l.name] = err, qtype.name
        if l.bias is not None:
            raise BitnestError(f"{l.name} has a bias, which llama.cpp's Llama graph has no tensor for")
        tensors.append((names.get_name(l.name + ".weight", try_suffixes=(".weight",)) or l.name, data, qtype))
    for k, t in unquantized_state(loaded.model, layers, torch.float32).items():
        if k == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue
        mod = k.rsplit(".", 1)[0]
        if mod.endswith("q_proj"):
            t = _permute(t, n_head)
        elif mod.endswith("k_proj"):
            t = _permute(t, n_kv)
        gname = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if gname is None:
            if "rotary_emb" in k:
                continue
            raise BitnestError(f"no GGUF name for tensor {k}")
        arr = t.numpy() if t.dim() == 1 else t.to(torch.float16).numpy()  # norms in F32, matrices in F16
        tensors.append((gname, arr, None))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(Path(loaded.source).name)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
        w.add_rope_freq_base(float(rope))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
        w.add_rope_dimension_count(head_dim)
        if head_dim * n_head != cfg.hidden_size:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if any(t == "Q4_0" for t in types.values()) else gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(w, loaded, gguf)
        for name, arr, raw in tensors:
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"format": "gguf", "out": str(out), "layers": len(layers), "types": sorted(set(types.values())),
            "max_abs_weight_change": max(errors.values())}
