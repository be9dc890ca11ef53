"""Building merged or shortened layer stacks, and provenance.

The concatenation merge (come-algorithm.md, section 4): the merged layer keeps
the original width; its KV groups, query heads and MLP channels are the chosen
units of layer l followed by those of layer l+1, each in ascending index order.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, combined_attention_kind, set_attention_kind
from .dispatch import Ops


@dataclass
class Selection:
    """Which units each of the two source layers contributes."""

    kv_a: list[int]
    kv_b: list[int]
    mlp_a: list[int]
    mlp_b: list[int]
    q_heads_a: list[int]
    q_heads_b: list[int]


def query_heads(kv_groups: list[int], num_kv_heads: int, group_size: int, grouping: str) -> list[int]:
    """The query heads that go with the kept KV groups, ascending.

    ``"contiguous"``: group k owns heads g*k .. g*k+g-1, the heads ``repeat_kv``
    attaches to KV head k (correct). ``"tiled"``: heads k, k+H_kv, k+2*H_kv, ...,
    what the release's ``mask.repeat(g)`` keeps (faithful mode only).
    """
    if grouping == "contiguous":
        heads = [group_size * k + j for k in kv_groups for j in range(group_size)]
    elif grouping == "tiled":
        heads = [k + num_kv_heads * j for k in kv_groups for j in range(group_size)]
    else:
        raise ValueError(f"grouping must be 'contiguous' or 'tiled', not {grouping!r}")
    return sorted(heads)


def _rows(units: list[int], width: int) -> torch.Tensor:
    return torch.tensor([u * width + i for u in units for i in range(width)], dtype=torch.long)


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    getattr(module, name).data = value


NORMS = ("mean", "fold")


def concat_merge(adapter: Adapter, layer_a: nn.Module, layer_b: nn.Module, sel: Selection, r: float,
                 ops: Ops, norms: str = "mean") -> nn.Module:
    """A new layer running the chosen heads and channels of both layers in
    parallel on one normalised input. Weights are row/column copies; o/down
    biases are r-weighted sums.

    ``norms="mean"`` (the release): the merged RMSNorm weights are the plain
    mean of the two layers', so every unit sees a rescaled input, and q/k
    norms (Qwen3) are r-weighted. ``norms="fold"``: each source layer's
    input / post-attention norm weight is folded into its own kept q/k/v and
    gate/up rows (column c scaled by w[c]) and the merged norms become 1, so
    every kept unit sees exactly the input it saw before on the shared input.
    Qwen3's per-head q/k norms act after the projection and before RoPE, where
    nothing can absorb a per-layer weight; they are weighted by the share of
    KV groups each layer contributes (exact when one layer gives all groups).
    When one layer contributes every unit (split 0 or 1) the merge is that
    layer, copied unchanged: a deletion of the other."""
    if norms not in NORMS:
        raise ValueError(f"norms must be one of {NORMS}, not {norms!r}")
    hd = adapter.head_dim
    if norms == "fold":
        if not (sel.kv_b or sel.mlp_b):
            return copy.deepcopy(layer_a)
        if not (sel.kv_a or sel.mlp_a):
            return copy.deepcopy(layer_b)
    merged = copy.deepcopy(layer_a)
    # sliding-window layers (Qwen2/Qwen3): one kind stays; unlike kinds give full attention
    kind = combined_attention_kind([layer_a, layer_b])
    if kind is not None:
        set_attention_kind(adapter, merged, kind)
    dev = adapter.part(layer_a, "q").weight.device
    fold = {}
    if norms == "fold":
        for roles, norm in ((("q", "k", "v"), "input_norm"), (("gate", "up"), "post_attn_norm")):
            for role in roles:
                fold[role] = (adapter.part(layer_a, norm).weight.data, adapter.part(layer_b, norm).weight.data.to(dev))

    def gather(role: str, ia: list[int], ib: list[int], width: int, dim: int, bias: bool) -> None:
        ma, mb, mm = adapter.part(layer_a, role), adapter.part(layer_b, role), adapter.part(merged, role)
        ra, rb = _rows(ia, width).to(dev), _rows(ib, width).to(dev)
        wa, wb = ma.weight.data, mb.weight.data.to(dev)  # layer_b may sit on another device (device_map)
        if role in fold:  # rows read the normalised input: scale column c by the source's norm weight
            wa, wb = wa * fold[role][0].to(wa.dtype), wb * fold[role][1].to(wb.dtype)
        mm.weight.data = ops.gather_concat(wa, ra, wb, rb, dim, out=torch.empty_like(ma.weight.data))
        if bias and getattr(ma, "bias", None) is not None:
            mm.bias.data = ops.gather_concat(ma.bias.data, ra, mb.bias.data.to(dev), rb, 0,
                                             out=torch.empty_like(ma.bias.data))

    def weighted(role: str, attr: str = "weight", share: float = r) -> None:
        ma, mb, mm = adapter.part(layer_a, role), adapter.part(layer_b, role), adapter.part(merged, role)
        if ma is not None and getattr(ma, attr, None) is not None:
            _set(mm, attr, share * getattr(ma, attr).data + (1 - share) * getattr(mb, attr).data.to(dev))

    gather("q", sel.q_heads_a, sel.q_heads_b, hd, 0, True)
    gather("k", sel.kv_a, sel.kv_b, hd, 0, True)
    gather("v", sel.kv_a, sel.kv_b, hd, 0, True)
    gather("o", sel.q_heads_a, sel.q_heads_b, hd, 1, False)
    weighted("o", "bias")
    if adapter.family.q_norm:
        share = r if norms == "mean" else len(sel.kv_a) / max(1, len(sel.kv_a) + len(sel.kv_b))
        weighted("q_norm", share=share)
        weighted("k_norm", share=share)
    gather("gate", sel.mlp_a, sel.mlp_b, 1, 0, True)
    gather("up", sel.mlp_a, sel.mlp_b, 1, 0, True)
    gather("down", sel.mlp_a, sel.mlp_b, 1, 1, False)
    weighted("down", "bias")
    for role in ("input_norm", "post_attn_norm"):
        na, nb, nm = adapter.part(layer_a, role), adapter.part(layer_b, role), adapter.part(merged, role)
        if norms == "fold":
            nm.weight.data = torch.ones_like(na.weight.data)
        else:
            nm.weight.data = torch.stack([na.weight.data, nb.weight.data.to(dev)]).mean(0)
    return merged


def sublayer_modules(adapter: Adapter) -> tuple[str, str]:
    """Attribute names of the attention and MLP submodules of a decoder layer."""
    return adapter.family.q.rsplit(".", 1)[0], adapter.family.gate.rsplit(".", 1)[0]


@torch.no_grad()
def rdsc_merge(adapter: Adapter, base: nn.Module, others: list[nn.Module]) -> nn.Module:
    """LaCo's Reserving-Differences-while-Seeking-Common merge, as its paper
    writes it: theta = theta_base + sum_k (theta_k - theta_base) for every
    parameter of the attention and MLP submodules (projections, their biases,
    q/k norms where present), each difference taken against the ORIGINAL base.
    The layer norms are the base layer's. (The public LaCo code adds the
    differences to a base it has already updated, so its result is the last
    layer of the window: that is ``keep_last``, not this.)"""
    merged = copy.deepcopy(base)
    for sub in sublayer_modules(adapter):
        mb = dict(getattr(base, sub).named_parameters())
        for name, p in getattr(merged, sub).named_parameters():
            theta_b = mb[name].data
            acc = theta_b.clone()
            for o in others:  # another layer may sit on another device (device_map)
                acc += dict(getattr(o, sub).named_parameters())[name].data.to(acc.device) - theta_b
            p.data = acc
    return merged


def replace_window(adapter: Adapter, start: int, count: int, new_layer: nn.Module) -> None:
    """Layers start..start+count-1 become ``new_layer``, indices renumbered."""
    layers = list(adapter.layers)
    adapter.set_layers(layers[:start] + [new_layer] + layers[start + count:])


def window_provenance(prov: list, start: int, count: int) -> list:
    """Entries start..start+count-1 become one nested entry (a single entry stays as is)."""
    if count == 1:
        return list(prov)
    group = sorted(prov[start:start + count], key=first_leaf)
    return prov[:start] + [group] + prov[start + count:]


def replace_pair(adapter: Adapter, l: int, new_layer: nn.Module) -> None:
    """Layer l becomes ``new_layer``, layer l+1 is deleted, indices renumbered."""
    layers = list(adapter.layers)
    adapter.set_layers(layers[:l] + [new_layer] + layers[l + 2:])


def remove_layers(adapter: Adapter, drop: list[int]) -> None:
    drop_set = set(drop)
    adapter.set_layers([m for i, m in enumerate(adapter.layers) if i not in drop_set])


# -- provenance ---------------------------------------------------------------------

def first_leaf(item):
    while isinstance(item, list):
        item = item[0]
    return item


def merge_provenance(prov: list, l: int) -> list:
    """Entries l and l+1 become one nested entry, ordered by first original layer."""
    pair = sorted([prov[l], prov[l + 1]], key=first_leaf)
    return prov[:l] + [pair] + prov[l + 2:]


def delete_provenance(prov: list, drop: list[int]) -> list:
    s = set(drop)
    return [p for i, p in enumerate(prov) if i not in s]
