"""Method registry. A method decides WHAT to remove or merge; the mechanisms
(calibration stream, scoring, merge) do the work. Each method is a function
``run(ctx: Context, n_remove: int) -> Outcome`` registered under its CLI name."""
from __future__ import annotations

import math
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
    # with compensate="ls": the original model's hidden states at every layer
    # boundary on the calibration rows (come_fast.compensate.TeacherStates)
    teacher: Optional[object] = None
    # set by a method whose merged layers choose their MLP channels again, among
    # all their original layers', before the final refit (CoMe's mlp_select)
    reselect_mlp: bool = False


@dataclass
class Outcome:
    provenance: list              # nested list of original layer numbers, per layer of the result
    steps: list                   # per step: a dict (decision, scores, seconds)
    settings: dict


REGISTRY: dict[str, Callable[[Context, int], Outcome]] = {}
# The options each method reads, so that a misspelt one is refused before a long
# run instead of silently ignored (COMMON_OPTIONS, below: those every method takes).
OPTIONS: dict[str, frozenset] = {}


# -- option values ----------------------------------------------------------------------
# A validator is a callable ``value -> bool`` with an ``accepts`` text naming the
# values it takes ("a positive integer"). ``register(name, options={...})``
# declares one per option (None: any value); ``check_options`` applies them, so
# a bad value is refused before the model loads, naming the option.

class Validator:
    def __init__(self, test: Callable[[object], bool], accepts: str):
        self.test = test
        self.accepts = accepts

    def __call__(self, value) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError, OverflowError):
            return False

    def __repr__(self) -> str:
        return f"Validator({self.accepts!r})"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: Optional[int] = None, hi: Optional[int] = None, accepts: Optional[str] = None) -> Validator:
    """An int (not a bool, not a float) in [lo, hi] (None: unbounded)."""
    if accepts is None:
        if lo == 1 and hi is None:
            accepts = "a positive integer"
        elif lo == 0 and hi is None:
            accepts = "a non-negative integer"
        elif hi is None:
            accepts = f"an integer >= {lo}"
        elif lo is None:
            accepts = f"an integer <= {hi}"
        else:
            accepts = f"an integer in [{lo}, {hi}]"
    return Validator(lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi), accepts)


def number(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = False,
           accepts: Optional[str] = None) -> Validator:
    """A finite int or float (not a bool) in the interval; ``*_open``: the bound itself is refused."""
    if accepts is None:
        if lo is None and hi is None:
            accepts = "a finite number"
        elif lo == 0 and hi is None:
            accepts = "a positive number" if lo_open else "a non-negative number"
        else:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            accepts = f"a number in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"

    def test(v):
        if not _is_number(v):
            return False
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return False
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return False
        return True

    return Validator(test, accepts)


def one_of(*choices) -> Validator:
    return Validator(lambda v: any(v == c and type(v) is type(c) for c in choices),
                     "one of " + ", ".join(repr(c) for c in choices))


def optional(v: Validator) -> Validator:
    """``v``, or None (the option's default)."""
    return Validator(lambda x: x is None or v(x), f"{v.accepts} or null")


boolean = Validator(lambda v: isinstance(v, bool), "true or false")
positive_int = integer(1)
non_negative_int = integer(0)
# a learning rate: AdamW above 1 only diverges
learning_rate = number(0, 1, lo_open=True, accepts="a number in (0, 1] (a learning rate)")
byte_count = Validator(lambda v: v is None or (_is_number(v) and v >= 0 and float(v).is_integer()),
                       "a non-negative integer (bytes) or null")

# the shared options a caller may pass in ``**options`` (the others are compress's own arguments)
COMMON_VALIDATORS: dict[str, Validator] = {"max_cache_bytes": byte_count}
# the closed-form compensation's settings (come_fast.compensate), read by compress
# and by CoMe's search
_POSITIVE = number(0, lo_open=True)
LS_VALIDATORS: dict[str, Validator] = {
    "ls_alphas": Validator(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_POSITIVE(x) for x in v),
                           "a non-empty list of positive ridges (relative to the mean diagonal)"),
    "ls_weighting": one_of("none", "rms"), "ls_layers": one_of("changed", "all"),
    "ls_select": one_of("layer", "column"), "ls_fit": one_of("down", "map", "best"),
    "ls_parts": one_of("down", "down+o")}
# set by compress itself, read by the shared calibration stream, or the compensation's
COMMON_OPTIONS = frozenset({"faithful", "allow_repeat", "ratio", "rounding", "seed", *COMMON_VALIDATORS,
                            *LS_VALIDATORS})
VALIDATORS: dict[str, dict[str, Optional[Validator]]] = {}


def register(name: str, options: tuple | dict = ()):
    """Register a method under ``name``. ``options``: the names of the options
    it reads, or a dict name -> Validator (None: any value) to check values too."""
    table = dict(options) if isinstance(options, dict) else {k: None for k in options}
    bad = [k for k, v in table.items() if v is not None and not isinstance(v, Validator)]
    if bad:
        raise TypeError(f"method {name!r}: the validators of {bad} are not methods.Validator instances")

    def deco(fn):
        REGISTRY[name] = fn
        OPTIONS[name] = frozenset(table)
        VALIDATORS[name] = table
        return fn

    return deco


METHOD_MODULES = ("come", "shortgpt", "reverse", "sleb", "taylor", "magnitude", "ppl", "laco", "slm",
                  "streamline", "finercut", "replaceme")


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
    for key in sorted(options):
        check = VALIDATORS[name].get(key) or COMMON_VALIDATORS.get(key)
        if check is not None and not check(options[key]):
            raise ValueError(f"option {key}={options[key]!r} for method {name!r}: expected {check.accepts}")


def available() -> list[str]:
    _load_all()

    return sorted(REGISTRY)
