"""What a request may ask for: a width (int8 … int2) or a named Mix'n'Match budget, and what the model can serve.

    p = parse("int4") == parse(4) == parse("4")          # Precision(bits=4)
    parse("mix-3.5")                                     # Precision(budget=3.5): the best mix within 3.5 bits/weight

A Matryoshka (nested) checkpoint serves every width 1..c of its c-bit codes and any budget between c's and 2's
bits per weight; any other checkpoint serves only what it stores (`fixed`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BitnestError

LISTED_WIDTHS = (8, 6, 4, 3, 2)  # the widths /v1/models lists for an int8 parent (any 1..c is accepted)


@dataclass(frozen=True)
class Precision:
    bits: int | None = None      # every nested layer at this width
    budget: float | None = None  # Mix'n'Match: the strategy's mix within this many bits per weight
    fixed: str | None = None     # a checkpoint that cannot switch: its own label ("int4", "onebit", "bf16")

    @property
    def label(self) -> str:
        if self.fixed is not None:
            return self.fixed
        if self.budget is not None:
            return f"mix-{self.budget:g}"
        return f"int{self.bits}"


_INT = re.compile(r"^(?:int)?([1-8])$")
_MIX = re.compile(r"^mix-?(\d+(?:\.\d+)?)$")


def parse(value) -> Precision:
    """A request's precision: 8, "8", "int8", "mix-3.5" (ValueError with a one-line reason otherwise)."""
    if isinstance(value, bool):
        raise ValueError(f"precision must be a width (8, 6, 4, 3, 2) or a budget name like 'mix-3.5', got {value!r}")
    if isinstance(value, int):
        if not 1 <= value <= 8:
            raise ValueError(f"precision {value} is not a width between 1 and 8 bits")
        return Precision(bits=value)
    if isinstance(value, str):
        s = value.strip().lower()
        if m := _INT.match(s):
            return Precision(bits=int(m.group(1)))
        if m := _MIX.match(s):
            return Precision(budget=float(m.group(1)))
    raise ValueError(f"unknown precision {value!r}: use a width (8, 6, 4, 3, 2, or 'int4') or a Mix'n'Match budget "
                     "name like 'mix-3.5' (bits per weight)")


class Capabilities:
    """Which precisions this loaded model serves."""

    def __init__(self, model, loaded_label: str):
        from ..runtime import nested_layers
        self.mods = nested_layers(model)
        self.parent = max((m.bits for m in self.mods.values()), default=None)
        self.own = Precision(bits=self.parent) if self.parent else Precision(fixed=loaded_label)
        self.model = model
        self._mixes: dict[float, dict[str, int]] = {}
        self._bpw: dict[float, float] = {}
        widths = {m.serve_bits for m in self.mods.values()}
        # what the checkpoint serves as loaded (its saved width, as `bitnest generate` serves it); None when mixed
        self.loaded = Precision(bits=widths.pop()) if len(widths) == 1 else (None if widths else self.own)

    @property
    def switchable(self) -> bool:
        return self.parent is not None

    def listed(self, budgets: tuple[float, ...] = ()) -> list[Precision]:
        if not self.switchable:
            return [self.own]
        widths = [b for b in LISTED_WIDTHS if b <= self.parent]
        return [Precision(bits=b) for b in widths] + [Precision(budget=b) for b in budgets]

    def check(self, p: Precision) -> Precision:
        """`p` if this model serves it, else BitnestError (one line, for a 400)."""
        if not self.switchable:
            if p == self.own or (p.bits is not None and self.own.fixed == f"int{p.bits}"):
                return self.own
            raise BitnestError(f"this checkpoint serves only {self.own.label} (it is not a Matryoshka checkpoint); "
                               f"cannot serve {p.label}")
        if p.bits is not None and not 1 <= p.bits <= self.parent:
            raise BitnestError(f"precision int{p.bits} is not servable: the checkpoint stores {self.parent}-bit codes (1..{self.parent})")
        if p.budget is not None:
            self.mix(p)
        return p

    def mix(self, p: Precision) -> dict[str, int]:
        """The per-layer widths that serve `p` (a budget's mix is computed once and kept)."""
        if p.bits is not None:
            return {n: p.bits for n in self.mods}
        if p.budget not in self._mixes:
            from ..runtime import DEFAULT_STRATEGY, resolve_mix
            self._mixes[p.budget] = resolve_mix(self.model, self.mods, None, p.budget, DEFAULT_STRATEGY)
        return self._mixes[p.budget]

    def bits_per_weight(self, p: Precision) -> float:
        """Bits per nested weight that `p` serves (its width, or its mix's weighted mean); a fixed checkpoint's own
        label ("int4" → 4, "bf16" → 16)."""
        if p.bits is not None:
            return float(p.bits)
        if p.budget is not None:
            if p.budget not in self._bpw:
                sizes = {k: m.in_features * m.out_features for k, m in self.mods.items()}
                mix = self.mix(p)
                self._bpw[p.budget] = sum(r * sizes[k] for k, r in mix.items()) / max(sum(sizes[k] for k in mix), 1)
            return self._bpw[p.budget]
        digits = "".join(c for c in p.label if c.isdigit())
        return float(digits) if digits else float("nan")
