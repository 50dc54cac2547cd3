"""Architecture-agnostic access to decoder blocks and the Linear layers to quantize."""
from __future__ import annotations

import fnmatch
import re

from torch import nn

from ..errors import BitnestError

# Names of MLP containers / projections across HF families (Llama, Mistral, Gemma, Qwen, GPT-2, OPT, Phi).
_FFN = re.compile(r"(^|\.)(mlp|feed_forward|ffn|block_sparse_moe)(\.|$)|(^|\.)(fc1|fc2|c_fc|gate_proj|up_proj|down_proj|w1|w2|w3)$")
PRESETS = ("all", "ffn", "attn")


def get_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, blocks): the decoder-block ModuleList — the longest ModuleList whose items hold Linears
    (or packed layers, which all carry in_features/out_features, so a quantized model is found too)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and any(hasattr(m, "in_features") for m in mod[0].modules()):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise BitnestError(f"no decoder blocks found in {type(model).__name__}: expected a ModuleList of layers with Linear modules")
    return best


def is_ffn(name: str) -> bool:
    return bool(_FFN.search(name))


def select_linears(model: nn.Module, targets: str | list[str] = "all", kinds: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Names of the modules to quantize.

    targets: "all" (every Linear inside the decoder blocks), "ffn" (MLP projections only — the MatQuant
    paper's default), "attn" (attention projections only), or glob patterns over full module names
    ("model.layers.*.mlp.*"). lm_head and embeddings are outside the blocks, so they are only selected
    when a pattern names them explicitly.
    """
    prefix, _ = get_blocks(model)
    block_linears = [n for n, m in model.named_modules() if isinstance(m, kinds) and n.startswith(prefix + ".")]
    if isinstance(targets, str) and targets in PRESETS:
        if targets == "all":
            return block_linears
        ffn = [n for n in block_linears if is_ffn(n)]
        return ffn if targets == "ffn" else [n for n in block_linears if n not in ffn]
    patterns = [targets] if isinstance(targets, str) else list(targets)
    all_linears = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    names = [n for n in all_linears if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise BitnestError(f"targets {patterns} match no Linear layer (presets: {', '.join(PRESETS)})")
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
