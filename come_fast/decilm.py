"""Export to the DeciLM / nemotron-nas ``block_configs`` form, and reading it back.

The format (NVIDIA's Llama-3.1-Nemotron-51B / Llama-3.3-Nemotron-Super-49B
checkpoints, ``"architectures": ["DeciLMForCausalLM"]``, ``"model_type":
"nemotron-nas"``) is a Llama checkpoint whose ``config.json`` describes every
layer in ``block_configs``::

    {"attention": {"no_op": false, "replace_with_linear": false, "n_heads_in_group": 3},
     "ffn": {"no_op": false, "replace_with_linear": false, "ffn_mult": 4.0}}

``n_heads_in_group`` is the query heads per KV head (num_attention_heads //
num_key_value_heads); ``no_op`` marks a removed sublayer (no weights, and no
norm in front of it: what FinerCut leaves). The MLP width is not written
explicitly: every reader (NVIDIA's remote code, vLLM's and SGLang's
``nemotron_nas``, TensorRT-LLM, mlx-lm, llama.cpp's converter) derives it from
``ffn_mult`` as

    intermediate_size = find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)

so only multiples of 256 are expressible. ``export`` therefore pads each MLP
with zero channels up to the next multiple of 256 (zero gate/up rows and zero
down columns: silu(0) * 0 = 0, the layer computes the same function) and
writes the ``ffn_mult`` that the formula turns back into exactly that width
(checked). The true widths are recorded under ``come_fast_export`` (with the
source config), so ``come_fast.load`` strips the zero padding again and rebuilds
the model it came from, tensor for tensor.

What the format cannot hold is refused with one error: Qwen3's q/k norms,
sliding-window attention (Mistral's ``sliding_window``, Qwen2's
``use_sliding_window``), a ``head_dim`` other than hidden_size //
num_attention_heads (the readers assume it). Qwen2's q/k/v biases are written
as ``attention_bias: true`` with a zero ``o_proj`` bias (the format's bias flag
covers all four projections), which changes nothing.

Who reads the folder: ``come_fast.load`` (always; also foreign DeciLM folders
whose layers share one ``n_heads_in_group``, read as Llama). The transformers
installed here (5.24) has no ``nemotron-nas`` class: stock
``AutoModelForCausalLM.from_pretrained`` fails with its unrecognised-model-type
error (nothing is loaded, nothing re-initialised); NVIDIA's remote code
(``modeling_decilm.py`` and its helpers from a Nemotron-NAS repository, with an
``auto_map``) is not shipped. The config follows the published format field
for field, but no external reader (vLLM, TensorRT-LLM, mlx-lm) was available
here to test it against.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from . import sublayers

FORMATS = ("decilm",)
MULTIPLE = 256          # the format's MLP width multiple
RECORD_KEY = "come_fast_export"
FAMILIES = ("llama", "mistral", "qwen2")


class ExportError(ValueError):
    pass


def width_of_ffn_mult(ffn_mult: float, hidden_size: int) -> int:
    """The published formula: the MLP width a reader builds for ``ffn_mult``."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % MULTIPLE == 0 else n + MULTIPLE - n % MULTIPLE


def ffn_mult_of(width: int, hidden_size: int) -> float:
    """The ``ffn_mult`` that the formula turns into ``width`` (a multiple of 256)."""
    if width % MULTIPLE:
        raise ExportError(f"MLP width {width} is not a multiple of {MULTIPLE}: the format cannot express it")
    m = width * 3 / (2 * hidden_size)
    for cand in (round(m, 6), m):  # the short form where it reproduces the width (mlx-lm rounds to 6 places)
        if width_of_ffn_mult(cand, hidden_size) == width:
            return cand
    raise ExportError(f"no ffn_mult reproduces width {width} at hidden size {hidden_size}")  # pragma: no cover


def padded(width: int) -> int:
    return MULTIPLE * math.ceil(width / MULTIPLE)


# -- export ------------------------------------------------------------------------------

def _source(source):
    """(model, tokenizer, meta, report) of a CompressionResult or a folder written by ``save``."""
    from .api import CompressionResult, result_meta
    from .checkpoint import read_meta
    from .models import _is_decilm, load_model

    if isinstance(source, CompressionResult):
        return source.model, source.tokenizer, result_meta(source), source.report
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file():
            raise ExportError(f"{folder} is not a checkpoint folder (no config.json)")
        if _is_decilm(folder):
            raise ExportError(f"{folder} is already in the DeciLM form")
        meta = read_meta(folder)
        if meta is None:
            raise ExportError(f"{folder} was not written by come_fast.save (no come_fast.json): export converts "
                              "come_fast's compression results only; compress the model first")
        report = meta.pop("report", [])
        model, tok = load_model(folder)
        return model, tok, meta, report
    raise ExportError(f"export takes a CompressionResult or a folder written by come_fast.save, not a "
                      f"{type(source).__name__}: a model come_fast did not compress has no record to export")


def _check_family(model) -> tuple:
    from .adapters import adapter_for

    a = adapter_for(model)
    cfg = model.config
    mt = cfg.model_type
    if mt not in FAMILIES:
        why = {"qwen3": "Qwen3's per-head q/k norms (q_norm, k_norm) have no place in it"}.get(mt, "")
        raise ExportError(f"the DeciLM format is a Llama layout; {mt} cannot be written in it{': ' + why if why else ''}")
    if getattr(cfg, "sliding_window", None) is not None and (mt != "qwen2" or getattr(cfg, "use_sliding_window", False)):
        raise ExportError(f"this {mt} model uses sliding-window attention (sliding_window="
                          f"{cfg.sliding_window}): the DeciLM format has no such layers")
    kinds = set(getattr(cfg, "layer_types", None) or [])
    if kinds - {"full_attention"}:
        raise ExportError(f"layers of kinds {sorted(kinds)}: the DeciLM format has full attention only")
    hd = getattr(cfg, "head_dim", None)
    if cfg.hidden_size % a.num_heads or (hd and hd != cfg.hidden_size // a.num_heads):
        raise ExportError(f"head_dim {hd} is not hidden_size // num_attention_heads "
                          f"({cfg.hidden_size} // {a.num_heads}): DeciLM readers assume it is")
    return a, mt


def _rope(cfg) -> tuple:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
        return theta, (rest if rest.get("rope_type", "default") != "default" else None)
    return getattr(cfg, "rope_theta", 10000.0), getattr(cfg, "rope_scaling", None)


def decilm_form(model) -> tuple[dict, dict]:
    """(config dict, state dict) of ``model`` in the DeciLM form."""
    a, mt = _check_family(model)
    cfg = model.config
    hidden, heads, kv = cfg.hidden_size, a.num_heads, a.num_kv_heads
    layers = a.layers
    spec = sublayers.spec_of(layers) or {}
    no_attn, no_mlp = set(spec.get("attention", [])), set(spec.get("mlp", []))
    widths = sublayers.mlp_widths(layers)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if tied:
        sd.pop("lm_head.weight", None)
    zero_o_bias = False
    blocks, pads = [], []
    for i, (layer, w) in enumerate(zip(layers, widths)):
        attn = {"no_op": i in no_attn, "replace_with_linear": False,
                "n_heads_in_group": None if i in no_attn else heads // kv}
        pre = f"model.layers.{i}."
        if i not in no_attn and a.part(layer, "q").bias is not None and a.part(layer, "o").bias is None:
            o = sd[pre + "self_attn.o_proj.weight"]
            sd[pre + "self_attn.o_proj.bias"] = o.new_zeros(o.shape[0])  # Qwen2: the format's bias covers o_proj
            zero_o_bias = True
        if w is None:
            ffn = {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
            pads.append(None)
        else:
            p = padded(w)
            ffn = {"no_op": False, "replace_with_linear": False, "ffn_mult": ffn_mult_of(p, hidden)}
            pads.append(p)
            if p != w:
                for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                    for kind in ("weight", "bias"):
                        key = f"{pre}mlp.{name}.{kind}"
                        t = sd.get(key)
                        if t is None or (kind == "bias" and dim == 1):
                            continue
                        shape = list(t.shape)
                        shape[dim] = p - w
                        sd[key] = torch.cat([t, t.new_zeros(shape)], dim).contiguous()
        blocks.append({"attention": attn, "ffn": ffn})
    theta, scaling = _rope(cfg)
    attention_bias = bool(zero_o_bias or getattr(cfg, "attention_bias", False))
    dtype = next(model.parameters()).dtype
    source = {k: v for k, v in cfg.to_dict().items()
              if k not in ("come_fast", sublayers.SPEC_KEY, sublayers.WIDTHS_KEY, "auto_map")}
    out = {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
        "block_configs": blocks,
        "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": len(layers),
        "num_key_value_heads": None, "intermediate_size": None,  # per layer, in block_configs
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": cfg.hidden_act,
        "rope_theta": theta, "rope_scaling": scaling,
        "attention_bias": attention_bias, "attention_dropout": 0.0, "mlp_bias": bool(getattr(cfg, "mlp_bias", False)),
        "initializer_range": getattr(cfg, "initializer_range", 0.02), "tie_word_embeddings": tied,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": getattr(cfg, "pad_token_id", None), "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
        RECORD_KEY: {"version": 1, "source_model_type": mt, "source_config": source, "mlp_widths": widths,
                     "padded_widths": pads, "zero_o_proj_bias": zero_o_bias},
    }
    return out, sd


def export(source, format: str = "decilm", out=None, overwrite: bool = False) -> Path:
    """Write ``source`` (a CompressionResult or a folder written by ``come_fast.save``)
    in the DeciLM form into ``out`` (atomically, like ``save``); returns the folder."""
    from safetensors.torch import save_file

    from .card import write_card
    from .checkpoint import META_FILE
    from .savedir import _atomic_save_dir, check_output_dir

    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    if out is None:
        raise ExportError("export needs out=, the folder to write")
    out = Path(out).expanduser()
    check_output_dir(out, overwrite)
    model, tok, meta, report = _source(source)
    config, sd = decilm_form(model)
    config["come_fast"] = meta
    gen = getattr(model, "generation_config", None)

    def build(tmp: Path) -> None:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception:  # a generation config that does not validate is not worth failing the export
                pass
        if tok is not None:
            tok.save_pretrained(tmp)
        with open(tmp / META_FILE, "w") as f:
            json.dump({**meta, "report": report or [], "export": {"format": "decilm"}}, f, indent=1)
        write_card(tmp, meta, str(out), export_format="decilm")

    _atomic_save_dir(build, out, overwrite=overwrite)
    return out


# -- reading it back ---------------------------------------------------------------------

def _blocks(cfg: dict, where) -> list:
    from .models import CheckpointError

    blocks = cfg.get("block_configs")
    n = cfg.get("num_hidden_layers")
    if not isinstance(blocks, list) or len(blocks) != n or not all(isinstance(b, dict) for b in blocks):
        raise CheckpointError(f"{where}: block_configs must list one {{attention, ffn}} entry per layer "
                              f"({n!r} layers)")
    return blocks


def read_blocks(cfg: dict, where="config.json") -> tuple[list, dict, list]:
    """(per-layer MLP widths (None: no MLP), removed-sublayer spec, per-layer KV head counts) from block_configs."""
    from .models import CheckpointError

    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    widths, spec, kvs = [], {"attention": [], "mlp": []}, []
    for i, b in enumerate(_blocks(cfg, where)):
        att, ffn = b.get("attention") or {}, b.get("ffn") or {}
        if att.get("replace_with_linear") or ffn.get("replace_with_linear"):
            raise CheckpointError(f"{where}: layer {i} replaces a sublayer with a linear map (replace_with_linear): "
                                  "come_fast's model families have no such layer")
        if att.get("no_op"):
            spec["attention"].append(i)
        else:
            g = att.get("n_heads_in_group")
            if not (isinstance(g, int) and g > 0 and heads % g == 0):
                raise CheckpointError(f"{where}: layer {i}: n_heads_in_group {g!r} does not divide "
                                      f"num_attention_heads {heads}")
            kvs.append(heads // g)
        if ffn.get("no_op"):
            spec["mlp"].append(i)
            widths.append(None)
        elif ffn.get("ffn_mult") is not None:
            widths.append(width_of_ffn_mult(float(ffn["ffn_mult"]), hidden))
        elif isinstance(ffn.get("intermediate_size"), int):  # the explicit form some readers also take
            widths.append(ffn["intermediate_size"])
        else:
            raise CheckpointError(f"{where}: layer {i}: ffn has neither ffn_mult nor intermediate_size")
    return widths, {k: v for k, v in spec.items() if v}, kvs


def load_decilm(path, dtype=None):
    """A DeciLM folder as a model of come_fast's families (CPU, eval mode):
    the family it was exported from, padding stripped, where ``come_fast_export``
    records it; otherwise a Llama model (every attention layer must share one
    ``n_heads_in_group``)."""
    from transformers import AutoConfig, GenerationConfig, LlamaConfig

    from .checkpoint import assign_weights, read_state_dict
    from .models import CheckpointError, _read_json

    folder = Path(path)
    where = folder / "config.json"
    cfg = _read_json(where, "config.json")
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder} holds a DeciLM config.json but no *.safetensors weights")
    widths, spec, kvs = read_blocks(cfg, where)
    sd = read_state_dict(folder)
    rec = cfg.get(RECORD_KEY)
    if isinstance(rec, dict) and isinstance(rec.get("source_config"), dict):
        src = dict(rec["source_config"])
        src.pop("transformers_version", None)
        config = AutoConfig.for_model(src.pop("model_type"), **src)
        true = rec.get("mlp_widths") or []
        for i, (w, t) in enumerate(zip(widths, true)):
            if w is None or not isinstance(t, int) or t >= w:
                continue
            parts = [(f"model.layers.{i}.mlp.{n}.{k}", d) for n, d in (("gate_proj", 0), ("up_proj", 0),
                                                                        ("down_proj", 1)) for k in ("weight", "bias")
                     if not (k == "bias" and d == 1)]
            present = [(key, d) for key, d in parts if key in sd]
            if all(not sd[key].narrow(d, t, w - t).any() for key, d in present):  # the export's zero padding
                for key, d in present:
                    sd[key] = sd[key].narrow(d, 0, t).contiguous()
                widths[i] = t
        if rec.get("zero_o_proj_bias"):
            for key in [k for k in sd if k.endswith("self_attn.o_proj.bias")]:
                if sd[key].any():
                    raise CheckpointError(f"{where}: {key} is not zero: not the zero bias the export wrote")
                del sd[key]
    else:
        if len(set(kvs)) > 1:
            raise CheckpointError(f"{where}: layers with different KV head counts ({sorted(set(kvs))}): "
                                  "come_fast's families give every layer one count")
        theta = cfg.get("rope_theta", 10000.0)
        rope = {"rope_theta": theta, **(cfg.get("rope_scaling") or {"rope_type": "default"})}
        keep = ("vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings", "rms_norm_eps",
                "hidden_act", "attention_bias", "mlp_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id", "initializer_range")
        config = LlamaConfig(**{k: cfg[k] for k in keep if cfg.get(k) is not None},
                             num_key_value_heads=kvs[0] if kvs else cfg["num_attention_heads"],
                             rope_parameters=rope)
    present = [w for w in widths if w is not None]
    config.num_hidden_layers = len(widths)
    config.intermediate_size = max(present) if present else getattr(config, "intermediate_size", 1)
    for key in (sublayers.SPEC_KEY, sublayers.WIDTHS_KEY, "auto_map"):
        if key in config.__dict__:
            delattr(config, key)
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = ["full_attention"] * len(widths)
    model = assign_weights(config, sd, widths, spec, dtype, where=str(folder))
    if len(set(present)) > 1:
        setattr(model.config, sublayers.WIDTHS_KEY, [max(present) if w is None else w for w in widths])
    if spec:
        setattr(model.config, sublayers.SPEC_KEY, spec)
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except Exception:
            pass
    return model
