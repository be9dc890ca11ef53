"""Where the parts of a decoder layer live, per model family.

The ground floor of the package: imports nothing of ours. Adding a family means
adding one row to ``FAMILIES``; nothing else in come_fast names a module path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's family has no adapter."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    # inside one decoder layer
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    q_norm: Optional[str] = None  # per-head RMSNorm on q (Qwen3)
    k_norm: Optional[str] = None
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),  # q/k/v carry biases; found from the modules, not the table
    Family("qwen3", ("qwen3",), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
)

SUPPORTED = tuple(t for f in FAMILIES for t in f.model_types)


def get_attr(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Adapter:
    """A family row bound to one model instance, with its head geometry."""

    family: Family
    model: nn.Module

    # geometry ----------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.config.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    # modules -----------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return get_attr(self.model, self.family.layers)

    def set_layers(self, layers: list[nn.Module]) -> None:
        old_types = getattr(self.config, "layer_types", None)
        kinds = {}
        if old_types is not None and len(old_types) == len(self.layers):
            kinds = {id(m): t for m, t in zip(self.layers, old_types)}
        parent_path, name = self.family.layers.rsplit(".", 1)
        setattr(get_attr(self.model, parent_path), name, nn.ModuleList(layers))
        renumber(self, kinds)

    @property
    def embed(self) -> nn.Module:
        return get_attr(self.model, self.family.embed)

    @property
    def final_norm(self) -> nn.Module:
        return get_attr(self.model, self.family.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return get_attr(self.model, self.family.lm_head)

    @property
    def rotary(self) -> nn.Module:
        return get_attr(self.model, self.family.rotary)

    def part(self, layer: nn.Module, role: str) -> Optional[nn.Module]:
        path = getattr(self.family, role)
        return None if path is None else get_attr(layer, path)


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return Adapter(fam, model)
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}: come_fast supports {', '.join(SUPPORTED)}"
    )


FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def attention_kind(layer: nn.Module) -> Optional[str]:
    """The attention kind a decoder layer carries itself (Qwen2/Qwen3:
    ``self_attn.layer_type``, "full_attention" or "sliding_attention"); None
    where the family has no per-layer kind (Llama, Mistral) or the layer has
    no attention (FinerCut)."""
    return getattr(getattr(layer, "self_attn", None), "layer_type", None)


def set_attention_kind(adapter: Adapter, layer: nn.Module, kind: str) -> None:
    """Make ``layer`` a full- or sliding-window-attention layer: its
    ``layer_type`` and the window its attention applies (the config's
    ``sliding_window`` for sliding layers, None for full ones)."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or not hasattr(attn, "layer_type"):
        return
    attn.layer_type = kind
    if hasattr(attn, "sliding_window"):
        attn.sliding_window = getattr(adapter.config, "sliding_window", None) if kind == SLIDING_ATTENTION else None


def combined_attention_kind(sources: list[nn.Module]) -> Optional[str]:
    """The attention kind of one layer made from ``sources`` (a merge, a
    window fold, a trained replacement): theirs when they agree; when they do
    not, full attention, the kind that sees every token any source saw (a
    sliding window would cut off context a full-attention source used)."""
    kinds = {k for k in (attention_kind(s) for s in sources) if k is not None}
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else FULL_ATTENTION


def renumber(adapter: Adapter, kinds: Optional[dict] = None) -> None:
    """Layer indices are what the KV cache is addressed by: after deleting or
    merging layers they must be 0..L-1 again, and the config must agree, or
    ``generate`` indexes past the end of the cache.

    ``config.layer_types`` (Qwen2/Qwen3: which layers use sliding-window
    attention; the model picks each layer's mask by it) is rebuilt from the
    kept layers' own kinds (``attention_kind``). A layer that carries none (its
    attention removed by FinerCut) takes ``kinds[id(layer)]`` (what
    ``set_layers`` read before the change), else its old entry when the count
    did not change, else the one kind all old entries share, else full
    attention (a layer without attention never reads its mask)."""
    layers = adapter.layers
    for i, layer in enumerate(layers):
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = i
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = i
    cfg = adapter.config
    old = getattr(cfg, "layer_types", None)
    cfg.num_hidden_layers = len(layers)
    if old is None:
        return
    kinds = kinds or {}
    same = len(old) == len(layers)
    uniform = old[0] if old and len(set(old)) == 1 else FULL_ATTENTION
    cfg.layer_types = [attention_kind(layer) or kinds.get(id(layer)) or (old[i] if same else uniform)
                       for i, layer in enumerate(layers)]


def count_parameters(model: nn.Module) -> int:
    """All parameters, embeddings included, tied weights counted once."""
    seen = set()
    total = 0
    for p in model.parameters():
        key = ("meta", id(p)) if p.is_meta else p.data_ptr()  # meta tensors (offload="disk") all have pointer 0
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total


def layer_parameters(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())
