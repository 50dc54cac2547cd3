"""Method registry: a method is a frozen config dataclass + one function registered under a name.

Adding a method = one new file in this package that calls `register`, plus one import line at the bottom.
The function receives the model, its config and the selected module names, and replaces those modules in
place (with QuantLinear or another packed module).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

from ..errors import BitnestError
from ..grids.affine import AffineSpec


@dataclass(frozen=True)
class QuantConfig:
    """Fields every method shares. `overrides` maps a module-name glob to its own bits (Mix'n'Match,
    sensitivity-driven mixed precision)."""
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = False
    int_zero: bool = False  # asymmetric grids: integer zero points (exact in GPTQ / compressed-tensors / GGUF)
    targets: str | tuple[str, ...] = "all"
    overrides: tuple[tuple[str, int], ...] = field(default_factory=tuple)

    def __post_init__(self):
        AffineSpec(self.bits, self.group_size, self.symmetric)  # validates bits / group size / symmetry
        for pat, b in self.overrides:
            AffineSpec(b, self.group_size, self.symmetric)

    def affine_spec(self, bits: int) -> AffineSpec:
        """The affine grid of this config at `bits` (granularity, symmetry, zero-point convention)."""
        return AffineSpec(bits, self.group_size, self.symmetric, self.int_zero)

    def bits_for(self, name: str) -> int:
        import fnmatch
        for pat, b in self.overrides:
            if fnmatch.fnmatchcase(name, pat):
                return b
        return self.bits

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["overrides"] = dict(self.overrides)
        if isinstance(self.targets, tuple):
            d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "overrides" in d:
            d["overrides"] = tuple(d["overrides"].items()) if isinstance(d["overrides"], dict) else tuple(map(tuple, d["overrides"]))
        if isinstance(d.get("targets"), list):
            d["targets"] = tuple(d["targets"])
        return cls(**d)


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    fn: Callable


REGISTRY: dict[str, Method] = {}


def register(name: str, config_cls: type):
    def deco(fn):
        REGISTRY[name] = Method(name, config_cls, fn)
        return fn
    return deco


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise BitnestError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


from . import rtn, sliced, gptq, onebit, bitnet, clip, kmeans, actquant, mixed, matryoshka, lpfit  # noqa: E402,F401  (registration side effects)
