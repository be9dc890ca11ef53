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

A result whose layers have different MLP widths (``compress(..., exact=True)``)
records them under the config key ``come_fast_mlp_widths`` (``intermediate_size``
is the largest) and carries the same remote-code module. ``come_fast.load``
rebuilds the per-layer shapes on the meta device and assigns the stored
tensors (``load_width_model``); stock ``from_pretrained(path,
trust_remote_code=True)`` reads it too. Stock ``from_pretrained`` without
remote code cannot (transformers' Llama/Mistral/Qwen classes take one
``intermediate_size``): it stops with its size-mismatch error rather than
re-initialising anything. ``come_fast.export(..., format="decilm")`` writes
the DeciLM / ``nemotron-nas`` form instead (come_fast/decilm.py). Whole-layer
results, and any result whose layers share one width, stay plain checkpoints.
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
                    overwrite: bool = False, load_path: str | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face checkpoint folder
    with ``come_fast.json`` (``meta`` and the per-step ``report``) and a model
    card (README.md, come_fast/card.py; ``load_path``: the folder or hub id its
    loading example names, default ``out_dir``), all in one atomic write."""
    import time

    from .card import clean_config_file, write_card
    from .logs import get

    log = get("checkpoint")
    out = Path(out_dir).expanduser()
    # refused targets, an existing folder (without overwrite), a folder being
    # written by another process: before the model is touched
    check_output_dir(out, overwrite)
    model.config.come_fast = meta
    spec = _sublayer_spec_of(model)
    if spec is not None:
        # layers missing their attention or MLP (FinerCut): see come_fast/sublayers.py
        setattr(model.config, sublayers.SPEC_KEY, spec)
    widths = _record_widths(model)
    remote = spec is not None or widths is not None
    if remote:
        model.config.auto_map = {"AutoModelForCausalLM": f"{SUBLAYER_MODULE}.ComeFastForCausalLM"}

    def build(tmp: Path) -> None:
        from .devicemap import has_offloaded
        from .offload import is_lazy, save_streaming

        # compress(..., offload="disk"), or weights offloaded by a device map: the layers are read
        # (materialised) and written one at a time
        if is_lazy(model) or has_offloaded(model):
            save_streaming(model, tmp)
        else:
            model.save_pretrained(tmp)
        if remote:
            _write_sublayer_module(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # no GGUF leftovers (its own model name) nor temporary/cache paths in the config
        clean_config_file(tmp / "config.json", (meta or {}).get("base_model"))
        with open(tmp / META_FILE, "w") as f:
            json.dump({**meta, "report": report or []}, f, indent=1)
        write_card(tmp, meta, str(out_dir) if load_path is None else load_path, remote_code=remote)

    # written into a temporary sibling and renamed, under a lock, the old folder
    # moved aside first and deleted last: an interrupted save leaves nothing
    # half-written under out_dir and never loses the previous checkpoint
    # (details in come_fast/models.py, _atomic_save_dir)
    t0 = time.perf_counter()
    log.info("saving the checkpoint to %s", out)
    _atomic_save_dir(build, out, overwrite=overwrite)
    log.info("saved %s in %.1f s", out, time.perf_counter() - t0)
    return out


def read_meta(path: str | os.PathLike) -> dict | None:
    """The ``come_fast.json`` beside a checkpoint (None where there is none);
    a corrupt one is refused, naming the file."""
    from .models import CheckpointError

    p = Path(path) / META_FILE
    if not p.is_file():
        return None
    try:
        with open(p, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}): a corrupt come_fast record; the model itself may "
                              f"be fine: move {META_FILE} away to load it without its record") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: a corrupt come_fast record (expected a JSON object, got {type(meta).__name__})")
    return meta


# -- layers with sublayers removed --------------------------------------------------

def _sublayer_spec_of(model) -> dict | None:
    from .adapters import adapter_for

    return sublayers.spec_of(adapter_for(model).layers)


def _record_widths(model) -> list | None:
    """Set the config's MLP width entries from the layers themselves: one
    shared width is ``intermediate_size`` (a plain checkpoint); different
    widths go under ``come_fast_mlp_widths`` (returned), ``intermediate_size``
    the largest. Layers without an MLP (FinerCut) count as any width."""
    from .adapters import adapter_for

    cfg = model.config
    widths = sublayers.mlp_widths(adapter_for(model).layers)
    present = sorted({w for w in widths if w is not None})
    if len(present) <= 1:
        if present:
            cfg.intermediate_size = present[0]
        if hasattr(cfg, sublayers.WIDTHS_KEY):
            delattr(cfg, sublayers.WIDTHS_KEY)
        return None
    cfg.intermediate_size = present[-1]
    widths = [present[-1] if w is None else w for w in widths]
    setattr(cfg, sublayers.WIDTHS_KEY, widths)
    return widths


def check_width_spec(config: dict, where="config.json") -> list | None:
    """The ``come_fast_mlp_widths`` entry of a config dict, checked: one
    positive integer per layer, none above ``intermediate_size``. None where
    there is none."""
    from .models import CheckpointError

    widths = config.get(sublayers.WIDTHS_KEY)
    if widths is None:
        return None
    n, top = config.get("num_hidden_layers"), config.get("intermediate_size")
    if not (isinstance(widths, list) and widths
            and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)):
        raise CheckpointError(f"{where}: malformed {sublayers.WIDTHS_KEY} {json.dumps(widths)[:200]}: "
                              "expected a list of positive integers, one per layer")
    if len(widths) != n:
        raise CheckpointError(f"{where}: {sublayers.WIDTHS_KEY} lists {len(widths)} widths for "
                              f"num_hidden_layers {n!r}")
    if isinstance(top, int) and max(widths) > top:
        raise CheckpointError(f"{where}: {sublayers.WIDTHS_KEY} holds a width {max(widths)} above "
                              f"intermediate_size {top}")
    return widths


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


def check_sublayer_spec(config: dict, where="config.json") -> dict | None:
    """The ``come_fast_sublayers`` entry of a config dict, checked: a dict
    with keys among "attention"/"mlp", each a list of distinct layer numbers
    in [0, num_hidden_layers). None where there is none."""
    from .models import CheckpointError

    spec = config.get(sublayers.SPEC_KEY)
    if spec is None:
        return None
    n = config.get("num_hidden_layers")
    bad = f"{where}: malformed {sublayers.SPEC_KEY} {json.dumps(spec)[:200]}"
    if not isinstance(spec, dict) or set(spec) - set(sublayers.KINDS):
        raise CheckpointError(f"{bad}: expected {{\"attention\": [layers], \"mlp\": [layers]}}")
    if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        raise CheckpointError(f"{where}: num_hidden_layers {n!r} is not a positive integer")
    for kind, layers in spec.items():
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise CheckpointError(f"{bad}: {kind!r} must be a list of layer numbers")
        if len(set(layers)) != len(layers) or any(not 0 <= i < n for i in layers):
            raise CheckpointError(f"{bad}: {kind!r} must list distinct layers in [0, {n})")
    return spec


def sublayer_spec(path: str | os.PathLike) -> dict | None:
    """The removed-sublayer spec of a checkpoint folder (None: whole layers only), checked."""
    from .models import _read_json

    p = Path(path) / "config.json"
    if not p.is_file():
        return None
    return check_sublayer_spec(_read_json(p, "config.json"), p)


def load_sublayer_model(path: str | os.PathLike, dtype=None, device="cpu", checked: bool = False):
    """Load a checkpoint whose config carries ``come_fast_sublayers``: the
    family's stock class with those sublayers swapped out before the weights
    are read, so every stored tensor has its place and none is missing.
    ``checked``: the folder already passed ``models.check_checkpoint_folder``."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from .models import _loading_error, check_checkpoint_folder, check_loading_info

    if not checked:
        check_checkpoint_folder(path)
    config = AutoConfig.from_pretrained(path)
    config.auto_map = None
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    cls = sublayers.causal_lm_class(base)
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        model, info = cls.from_pretrained(path, config=config, output_loading_info=True, use_safetensors=True,
                                          **kwargs)
    except Exception as e:
        err = _loading_error(path, e)
        if err is e:
            raise
        raise err from None
    check_loading_info(info, f"{path} (with its {sublayers.SPEC_KEY} skeleton)")
    return model.to(device).eval()


# -- per-layer MLP widths: a meta-device skeleton, the stored tensors assigned -----------

def read_state_dict(folder: str | os.PathLike) -> dict:
    """Every tensor of a folder's safetensors files (the shards its index names, else every
    ``*.safetensors``), read with safetensors only (never pickle)."""
    from safetensors.torch import load_file

    from .models import _unreadable

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        from .models import _read_json

        files = sorted({folder / f for f in _read_json(index, "safetensors index").get("weight_map", {}).values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors' SafetensorError, a missing shard
            raise _unreadable(f, e) from None
    return sd


def assign_weights(config, state_dict: dict, widths=None, spec=None, dtype=None, where="checkpoint"):
    """The family's stock model built on the meta device (no memory, no
    initialisation), its MLPs given ``widths`` and ``spec``'s sublayers removed,
    then ``state_dict`` assigned (``load_state_dict(assign=True)``): every
    parameter must come from it (the tied ``lm_head`` excepted), none may be
    left over, every shape must match. The rotary embedding's buffers (not
    stored) are computed afresh. Returns the model on the CPU in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import CheckpointError

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        layers = model.model.layers
        if widths:
            sublayers.apply_widths(layers, widths)
        if spec:
            sublayers.apply_spec(layers, spec)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: the shapes of some weights do not match the config "
                              f"({str(e).strip().splitlines()[-1][:300]})") from None
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        parts = [f"{len(v)} {k} (e.g. {', '.join(sorted(v)[:3])})" for k, v in
                 (("missing", missing), ("unexpected", unexpected)) if v]
        raise CheckpointError(f"{where}: the weights do not match the config: {'; '.join(parts)}. "
                              "A missing weight would be re-created at random; refusing to load")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is not None:
        model.to(dtype)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)  # buffers not stored: computed as HF does
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: {len(left)} tensors have no value after loading (e.g. {left[:3]})")
    return model.eval()


def load_width_model(path: str | os.PathLike, dtype=None, device="cpu", checked: bool = False):
    """Load a checkpoint whose config carries ``come_fast_mlp_widths``: the
    per-layer MLP shapes (and any removed sublayers) built on the meta device,
    the stored tensors assigned. ``checked``: the folder already passed
    ``models.check_checkpoint_folder``."""
    from transformers import AutoConfig, GenerationConfig

    from .models import check_checkpoint_folder

    if not checked:
        check_checkpoint_folder(path)
    config = AutoConfig.from_pretrained(path)
    if "auto_map" in config.__dict__:  # the stock class, not the remote code it names
        del config.auto_map
    widths = getattr(config, sublayers.WIDTHS_KEY, None)
    spec = getattr(config, sublayers.SPEC_KEY, None)
    model = assign_weights(config, read_state_dict(path), widths, spec, dtype, where=str(path))
    if (Path(path) / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except Exception:  # a generation config is a convenience, not the model
            pass
    return model.to(device)
