"""``push_to_hub``: a compression result, a model, or a folder ``save`` wrote,
uploaded to a Hugging Face hub repository (created if missing) with its
model card."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import logs

log = logs.get("hub")
# never uploaded: come_fast's save markers and locks, should a folder hold any
IGNORE = [".come_fast_tmp", ".come_fast_old", "*.lock", ".*.lock"]


def push_to_hub(result_or_folder, repo_id: str, private: bool = False, token=None,
                commit_message: str = "Upload model compressed with come_fast", tokenizer=None):
    """Upload a checkpoint to the hub repository ``repo_id`` (created with
    ``exist_ok=True``; ``private`` applies when it is created) and return what
    ``HfApi.upload_folder`` returns (its commit info).

    ``result_or_folder``: a ``CompressionResult`` or a model (saved to a
    temporary folder with ``come_fast.save``'s layout, model card included,
    the card naming ``repo_id`` in its loading example), or a folder written by
    ``save``, uploaded as it is; its come_fast model card is written again
    naming ``repo_id`` (the files themselves are not copied). ``token``: as
    ``huggingface_hub`` takes it (None: the saved login or ``$HF_TOKEN``)."""
    from huggingface_hub import HfApi

    from .api import CompressionResult, result_meta
    from .checkpoint import read_meta, save_checkpoint

    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repo_id must be a hub repository id such as 'user/name', got {repo_id!r}")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="come_fast_push_") as tmp:
        if isinstance(result_or_folder, (str, os.PathLike)):
            folder = Path(result_or_folder).expanduser()
            if not ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
                raise ValueError(f"{folder} is not a checkpoint folder (config.json and *.safetensors): "
                                 "give a folder come_fast.save wrote, or the result itself")
            folder = _with_card(folder, Path(tmp), repo_id, read_meta(folder))
        elif isinstance(result_or_folder, CompressionResult):
            r = result_or_folder
            folder = save_checkpoint(r.model, tokenizer or r.tokenizer, Path(tmp) / "model", result_meta(r),
                                     r.report, load_path=repo_id)
        elif hasattr(result_or_folder, "config") and hasattr(result_or_folder, "save_pretrained"):
            m = result_or_folder
            meta = getattr(m.config, "come_fast", None)  # a model loaded from a come_fast checkpoint knows it
            meta = dict(meta) if isinstance(meta, dict) else {}
            if "base_model" not in meta:
                from .card import base_model_of

                meta["base_model"] = base_model_of(m)
            folder = save_checkpoint(m, tokenizer, Path(tmp) / "model", meta, None, load_path=repo_id)
        else:
            raise TypeError(f"push_to_hub takes a CompressionResult, a model or a checkpoint folder, "
                            f"got {type(result_or_folder).__name__}")
        log.info("creating (if missing) the hub repository %s", repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        log.info("uploading %s to %s", folder, repo_id)
        out = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                repo_type="model", ignore_patterns=IGNORE)
        log.info("uploaded to %s", repo_id)
        return out


def _with_card(folder: Path, tmp: Path, repo_id: str, meta: dict | None) -> Path:
    """``folder`` itself, or, when it carries come_fast's card (or none and a
    come_fast record), a folder of links to its files with the card written
    again for ``repo_id``."""
    from .card import CARD_MARKER, README, render_card

    card = folder / README
    ours = card.is_file() and CARD_MARKER in card.read_text(encoding="utf-8", errors="replace")
    if meta is None or (card.is_file() and not ours):
        return folder  # a foreign folder, or a card someone wrote: uploaded as it is
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    view = tmp / "model"
    view.mkdir()
    for p in folder.iterdir():
        if p.name != README and p.is_file():
            os.symlink(p.resolve(), view / p.name)
    (view / README).write_text(render_card(meta, repo_id, remote_code=bool(cfg.get("auto_map"))), encoding="utf-8")
    return view
