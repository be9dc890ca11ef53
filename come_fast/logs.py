"""Logging. Every long step (loading, calibration sampling, scoring, each
merge or deletion, compensation, distillation, saving) says what it does
through the ``come_fast`` logger or a child (``come_fast.compress``,
``come_fast.calibration``, ...) at INFO, besides the tqdm bars. The library
adds only a NullHandler (come_fast/__init__.py) and never configures the root
logger; the command line sends INFO to stderr (``--quiet``: warnings only).
Turn it on in a program with e.g.
``logging.basicConfig(); logging.getLogger("come_fast").setLevel(logging.INFO)``.
"""
from __future__ import annotations

import logging

ROOT = "come_fast"
# progress labels that count removal steps: each one is logged at INFO
STEP_LABELS = frozenset({"merges", "removals", "layers removed", "sublayers removed"})


def get(name: str | None = None) -> logging.Logger:
    return logging.getLogger(ROOT if not name else f"{ROOT}.{name}")


class StepLog:
    """A progress callback ``(label, done, total)`` (what methods call through
    ``Context.progress``) that forwards to the progress bars, if any, and logs:
    every removal step (``STEP_LABELS``) and the end of every other count
    ("layers scored: 6 of 6") at INFO, the rest at DEBUG."""

    def __init__(self, bar=None, log: logging.Logger | None = None):
        self.bar = bar
        self.log = log or get("compress")

    def __call__(self, label: str, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar(label, done, total)
        level = logging.INFO if label in STEP_LABELS or (total and done >= total) else logging.DEBUG
        if self.log.isEnabledFor(level):
            self.log.log(level, "%s: %d of %d", label, done, total)

    def close(self) -> None:
        if hasattr(self.bar, "close"):
            self.bar.close()


class CliHandler:
    """The command line's logging: INFO (``quiet``: WARNING) from the
    ``come_fast`` logger to the current stderr, as ``HH:MM:SS message``;
    undone by ``close`` (the logger's level and handlers as they were)."""

    def __init__(self, quiet: bool = False):
        import sys

        self.logger = get()
        self.level = self.logger.level
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.WARNING if quiet else logging.INFO)

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
