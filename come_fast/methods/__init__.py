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


@dataclass
class Outcome:
    provenance: list              # nested list of original layer numbers, per layer of the result
    steps: list                   # per step: a dict (decision, scores, seconds)
    settings: dict


REGISTRY: dict[str, Callable[[Context, int], Outcome]] = {}


def register(name: str):
    def deco(fn):
        REGISTRY[name] = fn
        return fn

    return deco


def get(name: str):
    from . import come  # noqa: F401  (registers)

    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def available() -> list[str]:
    from . import come  # noqa: F401

    return sorted(REGISTRY)
