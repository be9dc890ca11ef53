"""Hugging Face compatible save and load.

A whole-layer result (every CoMe merge keeps the original widths) is a plain
checkpoint: safetensors, ``config.json`` with ``num_hidden_layers`` updated,
the tokenizer. Stock ``AutoModelForCausalLM.from_pretrained`` loads it without
custom code. What come_fast knows about it (method, settings, provenance,
achieved ratio) is recorded under the config key ``come_fast`` and, with the
per-step report, in ``come_fast.json`` beside it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .models import _atomic_save_dir

META_FILE = "come_fast.json"


class OutputExistsError(FileExistsError):
    pass


def save_checkpoint(model, tokenizer, out_dir: str | os.PathLike, meta: dict, report: list | None = None,
                    overwrite: bool = False) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} exists; choose another or pass overwrite=True (--overwrite)")
    model.config.come_fast = meta

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(tmp / META_FILE, "w") as f:
            json.dump({**meta, "report": report or []}, f, indent=1)

    # written into a temporary sibling and renamed: an interrupted save leaves
    # nothing half-written under out_dir
    _atomic_save_dir(build, out)
    return out


def read_meta(path: str | os.PathLike) -> dict | None:
    p = Path(path) / META_FILE
    if not p.is_file():
        return None
    with open(p) as f:
        return json.load(f)
