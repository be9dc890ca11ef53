"""Decoder layers with their attention or their MLP removed (FinerCut).

Self-contained on purpose (imports torch and transformers only): ``save``
copies this file into a checkpoint whose layers miss sublayers, so that stock
transformers can load it with ``trust_remote_code=True`` and nothing of
come_fast installed.

Representation. A removed attention sublayer is the pre-attention norm
replaced by ``nn.Identity`` and the attention module by ``NoAttention``, which
returns zeros (the residual ``x + 0`` is exactly ``x``) and holds no parameters;
a removed MLP likewise (post-attention norm -> Identity, MLP -> ``NoMLP``). The
checkpoint stores only the remaining weights; ``config.json`` carries

    "come_fast_sublayers": {"attention": [layers without attention],
                            "mlp": [layers without MLP]},
    "auto_map": {"AutoModelForCausalLM": "come_fast_sublayers.ComeFastForCausalLM"}

and the folder holds ``come_fast_sublayers.py`` (this file plus one line that
picks the family's CausalLM class). ``ComeFastForCausalLM`` builds the family's
stock model and swaps the listed sublayers out in ``__init__``, so
``from_pretrained`` finds exactly the stored tensors.

Who loads it: ``come_fast.load`` (always), stock
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
Stock ``from_pretrained`` WITHOUT ``trust_remote_code`` silently prefers its
own llama/qwen class and re-initialises the missing sublayers (it warns about
missing weights): do not load such a folder that way. vLLM and llama.cpp do
not read it (vLLM's ``DeciLMForCausalLM`` ``block_configs`` form could express
the Llama case; not exported).

KV cache: a layer without attention still records the sequence length in the
cache (a [batch, 1, tokens, 1] placeholder), because ``generate`` reads the
past length from layer 0's cache entry.

Per-layer MLP widths (``compress(..., exact=True)``, come_fast/widths.py) use
the same file: ``config.json`` carries ``"come_fast_mlp_widths": [width of
layer 0, ...]`` with ``intermediate_size`` the largest, and
``ComeFastForCausalLM`` gives each layer's MLP its width (``set_mlp_width``)
before the weights are read. Stock ``from_pretrained`` without
``trust_remote_code`` builds every MLP at ``intermediate_size`` and stops with
its size-mismatch error (``ignore_mismatched_sizes=False``, its default): it
never silently re-creates them. A result whose layers all share one width is
a plain checkpoint (``intermediate_size`` that width, no remote code).
"""
from __future__ import annotations

import torch
from torch import nn

SPEC_KEY = "come_fast_sublayers"
KINDS = ("attention", "mlp")
# (submodule, norm in front of it) per kind, for every supported family
_PARTS = {"attention": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}


class NoAttention(nn.Module):
    """Stands in for a removed attention sublayer: contributes exactly zero."""

    def __init__(self, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            b, t = hidden_states.shape[:2]
            ph = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(ph, ph, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class NoMLP(nn.Module):
    """Stands in for a removed MLP sublayer: contributes exactly zero."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


def is_removed(layer: nn.Module, kind: str) -> bool:
    return isinstance(getattr(layer, _PARTS[kind][0]), (NoAttention, NoMLP))


def remove_sublayer(layer: nn.Module, kind: str, layer_idx: int | None = None) -> None:
    """Remove the attention or the MLP (with the norm in front of it) of ``layer`` in place."""
    if kind not in _PARTS:
        raise ValueError(f"sublayer kind must be one of {KINDS}, not {kind!r}")
    sub, norm = _PARTS[kind]
    if is_removed(layer, kind):
        raise ValueError(f"the {kind} of this layer is already removed")
    if kind == "attention":
        idx = layer_idx if layer_idx is not None else getattr(getattr(layer, sub), "layer_idx", 0)
        setattr(layer, sub, NoAttention(idx))
    else:
        setattr(layer, sub, NoMLP())
    setattr(layer, norm, nn.Identity())


def spec_of(layers) -> dict | None:
    """{"attention": [...], "mlp": [...]}: the layers missing each sublayer; None when nothing is missing."""
    spec = {k: [i for i, layer in enumerate(layers) if is_removed(layer, k)] for k in KINDS}
    return spec if any(spec.values()) else None


def apply_spec(layers, spec: dict) -> None:
    for kind in KINDS:
        for i in spec.get(kind, []):
            remove_sublayer(layers[i], kind, i)


# -- per-layer MLP widths ----------------------------------------------------------

WIDTHS_KEY = "come_fast_mlp_widths"
_MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


def mlp_width(layer: nn.Module):
    """The MLP width (channels between up and down) of a decoder layer; None without an MLP."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None or isinstance(mlp, NoMLP):
        return None
    return int(mlp.down_proj.in_features)


def mlp_widths(layers) -> list:
    return [mlp_width(layer) for layer in layers]


def set_mlp_width(layer: nn.Module, width: int) -> None:
    """Give ``layer``'s MLP ``width`` channels: new, uninitialised gate/up/down
    projections of that shape on the old ones' device and dtype (a skeleton
    for weights loaded next; on the meta device nothing is allocated)."""
    mlp = layer.mlp
    if isinstance(mlp, NoMLP) or mlp_width(layer) == width:
        return
    for name in _MLP_PROJ:
        old = getattr(mlp, name)
        w = old.weight
        shape = (old.in_features, width) if name != "down_proj" else (width, old.out_features)
        setattr(mlp, name, nn.Linear(*shape, bias=old.bias is not None, device=w.device, dtype=w.dtype))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = width


def apply_widths(layers, widths) -> None:
    for layer, w in zip(layers, widths):
        if w is not None:
            set_mlp_width(layer, int(w))


def causal_lm_class(base):
    """The family's CausalLM class with the MLP widths of ``config.come_fast_mlp_widths``
    and without the sublayers of ``config.come_fast_sublayers``, both set at construction."""

    class ComeFastForCausalLM(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            widths = getattr(config, WIDTHS_KEY, None)
            if widths:
                apply_widths(self.model.layers, widths)
            spec = getattr(config, SPEC_KEY, None)
            if spec:
                apply_spec(self.model.layers, spec)

    ComeFastForCausalLM.__name__ = ComeFastForCausalLM.__qualname__ = "ComeFastForCausalLM"
    return ComeFastForCausalLM
