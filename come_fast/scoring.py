"""Scores from calibration statistics: channel sensitivity, block influence,
split ratios, unit allocation and top-k selection (come-algorithm.md, 1-4)."""
from __future__ import annotations

import numpy as np
import torch

from .adapters import Adapter
from .calibration import LayerStats
from .dispatch import Ops


def channel_scores(adapter: Adapter, layer, st: LayerStats, ops: Ops) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_att [H_kv], S_mlp [I]) of one layer.

    S_mlp[j] = mean_tokens |a_j| * ||W_down[:, j]||_1.
    S_att[k] = the same for the o_proj input channels, averaged over the g*h
    channels of KV group k (query heads g*k .. g*k+g-1, the grouping
    ``repeat_kv`` uses, in every mode).
    """
    o, down = adapter.part(layer, "o"), adapter.part(layer, "down")
    att = ops.finalize_scores(st.att_abs, o.weight, st.n_tokens, adapter.group_size * adapter.head_dim)
    mlp = ops.finalize_scores(st.mlp_abs, down.weight, st.n_tokens, 1)
    return att.float().cpu(), mlp.float().cpu()


def split_ratio(bi_a: float, bi_b: float) -> tuple[float, float]:
    """r_l = BI_l / (BI_l + BI_l+1), computed as the release does (normalise,
    raise to the power 1, normalise again) so floats agree with its trace."""
    s = bi_a + bi_b
    na, nb = bi_a / s, bi_b / s
    t = na + nb
    return na / t, nb / t


def allocate(total: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """The layer with the smaller share gets floor(total * share), the other
    the rest; on an exact tie the first layer counts as the larger."""
    big = 0 if ratio[0] >= ratio[1] else 1
    small = 1 - big
    counts = [0, 0]
    counts[small] = int(total * ratio[small])
    counts[big] = total - counts[small]
    return counts[0], counts[1]


def top_units(scores: torch.Tensor, n: int) -> list[int]:
    """The n highest-scoring indices, in ascending index order. Ranked by
    numpy's default argsort (quicksort) like the release, so ties break alike."""
    if n <= 0:
        return []
    order = np.argsort(scores.numpy())
    return sorted(int(i) for i in order[len(order) - n:])
