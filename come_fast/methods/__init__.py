"""Method registry. A method decides WHAT to remove or merge; the mechanisms
(calibration stream, scoring, merge) do the work. Each method is a function
``run(ctx: Context, n_remove: int) -> Outcome`` registered under its CLI name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..adapters import Adapter
from ..dispatch import Ops


@dataclass
class Context:
    adapter: Adapter
    tokens: torch.Tensor          # calibration batches [n, seq_len]
    ops: Ops
    batch_size: int = 2
    options: dict = field(default_factory=dict)  # method-specific settings
    progress: Optional[Callable[[str, int, int], None]] = None  # (label, done, total)
    # progressive methods call this after every step with (provenance, steps so far);
    # the model is consistent at that point (e.g. to save intermediate sizes)
    on_step: Optional[Callable[[list, list], None]] = None


@dataclass
class Outcome:
    provenance: list              # nested list of original layer numbers, per layer of the result
    steps: list                   # per step: a dict (decision, scores, seconds)
    settings: dict


REGISTRY: dict[str, Callable[[Context, int], Outcome]] = {}
# The options each method reads, so that a misspelt one is refused before a long
# run instead of silently ignored. COMMON: set by compress itself, or read by the
# shared calibration stream.
OPTIONS: dict[str, frozenset] = {}
COMMON_OPTIONS = frozenset({"faithful", "allow_repeat", "ratio", "rounding", "seed", "max_cache_bytes"})


def register(name: str, options: tuple = ()):
    def deco(fn):
        REGISTRY[name] = fn
        OPTIONS[name] = frozenset(options)
        return fn

    return deco


METHOD_MODULES = ("come", "shortgpt", "reverse", "sleb", "taylor", "magnitude", "ppl", "laco", "slm",
                  "streamline", "finercut")


def _load_all() -> None:
    import importlib

    for m in METHOD_MODULES:
        importlib.import_module(f"{__name__}.{m}")  # registers


def get(name: str):
    _load_all()

    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def check_options(name: str, options: dict) -> None:
    get(name)
    bad = sorted(set(options) - OPTIONS[name] - COMMON_OPTIONS)
    if bad:
        known = ", ".join(sorted(OPTIONS[name])) or "none"
        raise ValueError(f"unknown option(s) {', '.join(bad)} for method {name!r}; its own options: {known}")


def available() -> list[str]:
    _load_all()

    return sorted(REGISTRY)
