"""The concatenation merge checked by construction on tiny random models.

Reference: each source layer run with its own modules, with the o_proj columns
of unselected heads (and down_proj columns of unselected channels) zeroed, so
its output is exactly the sum of the selected units' contributions. The merged
layer on the same normalised input must equal the sum of the two.
"""
import pytest
import torch

from come_fast.adapters import adapter_for
from come_fast.dispatch import Ops
from come_fast.merge import (Selection, concat_merge, delete_provenance, merge_provenance, query_heads,
                             replace_pair)
from tiny import FAMILIES, tiny_model


def masked_copy(layer, heads: list[int], channels: list[int], hd: int):
    import copy

    m = copy.deepcopy(layer)
    with torch.no_grad():
        keep = torch.zeros(m.self_attn.o_proj.weight.shape[1], dtype=torch.bool)
        for h in heads:
            keep[h * hd:(h + 1) * hd] = True
        m.self_attn.o_proj.weight[:, ~keep] = 0
        if m.self_attn.o_proj.bias is not None:
            m.self_attn.o_proj.bias.zero_()
        keep = torch.zeros(m.mlp.down_proj.weight.shape[1], dtype=torch.bool)
        keep[channels] = True
        m.mlp.down_proj.weight[:, ~keep] = 0
    return m


def attn(layer, h, rotary):
    pos = torch.arange(h.shape[1])[None]
    out, _ = layer.self_attn(hidden_states=h, position_embeddings=rotary(h, pos), attention_mask=None)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_layer_is_sum_of_selected_units(family):
    model = tiny_model(family)
    a = adapter_for(model)
    la, lb = a.layers[1], a.layers[2]
    if a.family.q_norm:  # the merged q/k norms are an r-weighted sum: equal inputs keep the identity exact
        with torch.no_grad():
            lb.self_attn.q_norm.weight.copy_(la.self_attn.q_norm.weight)
            lb.self_attn.k_norm.weight.copy_(la.self_attn.k_norm.weight)
    H, Hkv, g, hd, I = a.num_heads, a.num_kv_heads, a.group_size, a.head_dim, a.intermediate_size
    kv_a = [Hkv - 1] if Hkv > 1 else [0]
    kv_b = [k for k in range(Hkv) if k not in kv_a] if Hkv > 1 else []
    if Hkv == H:  # MHA: split heads 1 / 3
        kv_a, kv_b = [2], [0, 1, 3]
    mlp_a = sorted(torch.randperm(I)[:37].tolist())
    mlp_b = sorted(torch.randperm(I)[:I - 37].tolist())
    sel = Selection(kv_a, kv_b, mlp_a, mlp_b, query_heads(kv_a, Hkv, g, "contiguous"),
                    query_heads(kv_b, Hkv, g, "contiguous"))
    r = 0.3
    merged = concat_merge(a, la, lb, sel, r, Ops("torch"))
    # shapes unchanged
    for (n1, p1), (n2, p2) in zip(la.named_parameters(), merged.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape
    h = torch.randn(2, 11, a.config.hidden_size)
    with torch.no_grad():
        want = attn(masked_copy(la, sel.q_heads_a, mlp_a, hd), h, a.rotary) + \
            attn(masked_copy(lb, sel.q_heads_b, mlp_b, hd), h, a.rotary)
        if la.self_attn.o_proj.bias is not None:
            want += r * la.self_attn.o_proj.bias + (1 - r) * lb.self_attn.o_proj.bias
        got = attn(merged, h, a.rotary)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want_mlp = masked_copy(la, [], mlp_a, hd).mlp(h) + masked_copy(lb, [], mlp_b, hd).mlp(h)
        torch.testing.assert_close(merged.mlp(h), want_mlp, rtol=1e-5, atol=1e-5)
    # norms: plain mean
    torch.testing.assert_close(merged.input_layernorm.weight, (la.input_layernorm.weight + lb.input_layernorm.weight) / 2)
    torch.testing.assert_close(merged.post_attention_layernorm.weight,
                               (la.post_attention_layernorm.weight + lb.post_attention_layernorm.weight) / 2)


def test_tiled_grouping_breaks_the_identity_for_gqa():
    """The release's tiling attaches query heads to another group's KV head
    (faithful mode keeps it): the sum identity must then fail."""
    model = tiny_model("llama")
    a = adapter_for(model)
    la, lb = a.layers[1], a.layers[2]
    kv_a, kv_b = [1], [0]
    sel = Selection(kv_a, kv_b, list(range(48)), list(range(48)), query_heads(kv_a, 2, 2, "tiled"),
                    query_heads(kv_b, 2, 2, "tiled"))
    assert sel.q_heads_a == [1, 3] and sel.q_heads_b == [0, 2]
    merged = concat_merge(a, la, lb, sel, 0.5, Ops("torch"))
    h = torch.randn(1, 9, 64)
    with torch.no_grad():
        want = attn(masked_copy(la, [2, 3], [], 16), h, a.rotary) + attn(masked_copy(lb, [0, 1], [], 16), h, a.rotary)
        assert not torch.allclose(attn(merged, h, a.rotary), want, atol=1e-3)


def test_query_head_groupings():
    assert query_heads([0, 2], 3, 3, "contiguous") == [0, 1, 2, 6, 7, 8]
    assert query_heads([0, 2], 3, 3, "tiled") == [0, 2, 3, 5, 6, 8]  # the reference trace's step 0
    assert query_heads([1], 3, 3, "tiled") == [1, 4, 7]
    assert query_heads([], 3, 3, "tiled") == []


def test_provenance_nesting():
    p = list(range(6))
    p = merge_provenance(p, 2)
    assert p == [0, 1, [2, 3], 4, 5]
    p = merge_provenance(p, 1)
    assert p == [0, [1, [2, 3]], 4, 5]
    p = merge_provenance(p, 2)
    assert p == [0, [1, [2, 3]], [4, 5]]
    assert delete_provenance(p, [0, 2]) == [[1, [2, 3]]]


def test_replace_pair_renumbers_for_the_kv_cache():
    model = tiny_model("qwen3")
    a = adapter_for(model)
    replace_pair(a, 2, a.layers[2])
    assert model.config.num_hidden_layers == 5
    assert [l.self_attn.layer_idx for l in a.layers] == list(range(5))
    x = torch.randint(0, 128, (1, 5))
    out = model.generate(x, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
