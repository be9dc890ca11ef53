"""Hugging Face compatible save and load.

A whole-layer result (every CoMe merge keeps the original widths) is a plain
checkpoint: safetensors, ``config.json`` with ``num_hidden_layers`` updated,
the tokenizer. Stock ``AutoModelForCausalLM.from_pretrained`` loads it without
custom code. What come_fast knows about it (method, settings, provenance,
achieved ratio) is recorded under the config key ``come_fast`` and, with the
per-step report, in ``come_fast.json`` beside it.

A result whose layers miss an attention or MLP sublayer (FinerCut) stores only
the remaining weights, lists the missing sublayers under the config key
``come_fast_sublayers`` and carries ``come_fast_sublayers.py`` (remote code,
``auto_map``): ``come_fast.load`` reads it, and so does stock
``from_pretrained(path, trust_remote_code=True)``; stock loading without
``trust_remote_code`` would re-initialise the missing sublayers. Details in
come_fast/sublayers.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .savedir import (OutputBusyError, OutputExistsError, UnsafeOutputError,  # noqa: F401 (re-exported)
                     _atomic_save_dir, check_output_dir)
from . import sublayers

META_FILE = "come_fast.json"
SUBLAYER_MODULE = "come_fast_sublayers"  # file (and module) name of the remote code a sublayer checkpoint carries


def save_checkpoint(model, tokenizer, out_dir: str | os.PathLike, meta: dict, report: list | None = None,
                    overwrite: bool = False) -> Path:
    out = Path(out_dir).expanduser()
    # refused targets, an existing folder (without overwrite), a folder being
    # written by another process: before the model is touched
    check_output_dir(out, overwrite)
    model.config.come_fast = meta
    spec = _sublayer_spec_of(model)
    if spec is not None:
        # layers missing their attention or MLP (FinerCut): see come_fast/sublayers.py
        setattr(model.config, sublayers.SPEC_KEY, spec)
        model.config.auto_map = {"AutoModelForCausalLM": f"{SUBLAYER_MODULE}.ComeFastForCausalLM"}

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if spec is not None:
            _write_sublayer_module(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(tmp / META_FILE, "w") as f:
            json.dump({**meta, "report": report or []}, f, indent=1)

    # written into a temporary sibling and renamed, under a lock, the old folder
    # moved aside first and deleted last: an interrupted save leaves nothing
    # half-written under out_dir and never loses the previous checkpoint
    # (details in come_fast/models.py, _atomic_save_dir)
    _atomic_save_dir(build, out, overwrite=overwrite)
    return out


def read_meta(path: str | os.PathLike) -> dict | None:
    p = Path(path) / META_FILE
    if not p.is_file():
        return None
    with open(p) as f:
        return json.load(f)


# -- layers with sublayers removed --------------------------------------------------

def _sublayer_spec_of(model) -> dict | None:
    from .adapters import adapter_for

    return sublayers.spec_of(adapter_for(model).layers)


def _write_sublayer_module(model, folder: Path) -> None:
    """This package's sublayers.py plus the line that picks the family's class:
    what ``trust_remote_code=True`` imports."""
    base = type(model)
    for cls in base.__mro__:  # the stock class, also when ``model`` is already a ComeFastForCausalLM
        if cls.__module__.startswith("transformers.models."):
            base = cls
            break
    src = Path(sublayers.__file__).read_text()
    src += (f"\n\nfrom {base.__module__} import {base.__name__} as _Base  # noqa: E402\n\n"
            "ComeFastForCausalLM = causal_lm_class(_Base)\n")
    (folder / f"{SUBLAYER_MODULE}.py").write_text(src)


def sublayer_spec(path: str | os.PathLike) -> dict | None:
    """The removed-sublayer spec of a checkpoint folder (None: whole layers only)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return None
    with open(p) as f:
        return json.load(f).get(sublayers.SPEC_KEY)


def load_sublayer_model(path: str | os.PathLike, dtype=None, device="cpu"):
    """Load a checkpoint whose config carries ``come_fast_sublayers``: the
    family's stock class with those sublayers swapped out before the weights
    are read, so every stored tensor has its place and none is missing."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(path)
    config.auto_map = None
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    cls = sublayers.causal_lm_class(base)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model, info = cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{path}: checkpoint does not match its come_fast_sublayers skeleton: {bad}")
    return model.to(device).eval()
