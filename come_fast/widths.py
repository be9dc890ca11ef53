"""Exact ratios: after the whole-layer steps, the remainder taken as MLP channels.

``compress(model, ratio=r, exact=True)`` (CLI ``--exact``):

1. Whole layers: the method runs with as many removals as fit without passing
   ``r`` (``removals_for_ratio(..., rounding="down")``), then the closed-form
   compensation where it is on, as without ``exact``.
2. Channel scores on the compressed model: one pass of its calibration rows
   through the layers (come_fast.calibration.LayerStream) gives each layer's
   S_mlp[j] = mean_tokens |a_j| * ||W_down[:, j]||_1 (come_fast.scoring.
   channel_scores, the score CoMe's merge keeps channels by), where a_j is
   channel j's input to ``down_proj`` and W_down[:, j] what it writes into the
   residual stream: the size of channel j's contribution to the layer output.
3. The remainder, removed / total parameters still missing to ``r``, in MLP
   channels: each channel is a row of gate_proj and of up_proj and a column
   of down_proj (3 x hidden parameters, plus their bias entries). Channels go
   in blocks of ``width_multiple`` so that every width stays a multiple of it:
   a layer's blocks are its channels in ascending score order (its first block
   the ``width_multiple`` lowest-scored, and so on), and the blocks taken are,
   across the candidate layers, those of lowest mean score (a greedy that
   always takes the cheapest next block; within a layer the blocks' means only
   grow, so the dropped channels of every layer are its lowest-scored ones).
   The number of blocks is the one that lands nearest ``r`` (at most half a
   block from it). A layer keeps at least ``width_multiple`` channels.
4. Candidates: the changed layers (merged ones, and a kept layer followed by
   deleted ones: come_fast.compensate.changed_layers), the layers that already
   stand for more than themselves. Where they cannot supply the remainder
   (few changed layers, each keeping ``width_multiple`` channels), the unchanged
   layers nearest to a changed one join, nearest first (reported as
   ``extra_layers``). Methods without a provenance (FinerCut removes
   sublayers, not layers) are refused, as is faithful mode (the release has no
   such step).
5. With compensation on, the refit is run again (come_fast.compensate.
   compensate_model, i.e. ``refit_down`` per layer, bottom-up) over the layers
   it refits (the changed ones, or all with ``ls_layers="all"``, and every
   shrunk one) from the lowest shrunk layer up: their inputs changed.

The achieved ratio (``result.achieved_ratio``) is counted from the parameters,
as always, and must lie within ``TOLERANCE`` (0.5 percentage points) of ``r``;
``result.report`` ends with an ``{"exact": ...}`` step (the widths, the
channels each layer dropped, their scores) and ``result.settings["exact"]``
holds the target, the multiple and the widths.

Why ``width_multiple=64`` by default: an MLP of width w runs as GEMMs whose N
(gate/up) or K (down) dimension is w. GPU GEMM kernels (cuBLAS, CUTLASS,
Triton) tile those dimensions in blocks of 32-256 and tensor cores need K and
N multiples of 8 (16-bit) or 16 (8-bit); a width off such a multiple runs a
partly empty tail tile or falls back to a slower kernel, so a merged layer
that saved 10 channels could run no faster, or slower. 64 is a full tile edge
for the common kernel shapes, a multiple of every CPU vector width (AVX-512:
16 floats) and of 8 x a tensor-parallel degree of 8, while still fine enough to
land within the tolerance on small models (SmolLM2-135M: 64 channels are
0.08% of its parameters). The DeciLM export pads to 256, that format's own
multiple (come_fast/decilm.py). The multiple must divide the original width.

A model whose layers have different MLP widths is saved with the widths
recorded (come_fast/checkpoint.py, come_fast/sublayers.py) and loaded by
``come_fast.load``; ``compress`` refuses such a model as input (the methods
allocate one width to every layer): compress the original instead.
"""
from __future__ import annotations

import copy
import heapq
import math
from typing import Callable, Optional

import torch
from torch import nn

from .adapters import Adapter, count_parameters
from .sublayers import mlp_widths

DEFAULT_WIDTH_MULTIPLE = 64
TOLERANCE = 0.005  # the achieved ratio lies within this of the target (0.5 percentage points)


class WidthError(ValueError):
    """An exact ratio that cannot be met, or a width multiple that does not fit."""


def channel_parameters(adapter: Adapter, layer: Optional[nn.Module] = None) -> int:
    """Parameters one MLP channel holds: a row of gate_proj and of up_proj, a
    column of down_proj, and the two bias entries where gate/up carry biases."""
    layer = adapter.layers[0] if layer is None else layer
    gate, up, down = (adapter.part(layer, r) for r in ("gate", "up", "down"))
    return (gate.in_features + up.in_features + down.out_features
            + (gate.bias is not None) + (up.bias is not None))


def uniform_width(adapter: Adapter) -> Optional[int]:
    """The one MLP width every layer (with an MLP) shares; None when they differ."""
    ws = {w for w in mlp_widths(adapter.layers) if w is not None}
    return ws.pop() if len(ws) == 1 else (None if ws else adapter.intermediate_size)


def check_uniform_widths(adapter: Adapter) -> None:
    """compress works on models whose layers share one MLP width."""
    if uniform_width(adapter) is None:
        ws = mlp_widths(adapter.layers)
        raise ValueError(f"this model's MLPs have per-layer widths ({ws[:8]}{'...' if len(ws) > 8 else ''}: "
                         "an exact-ratio result); the methods give every layer one width: "
                         "compress the original model instead (with exact=True for an exact ratio)")


def check_exact(adapter: Adapter, width_multiple, ratio, *, method: str, faithful: bool, target_layers,
                rounding: str, no_provenance=("finercut",)) -> int:
    """Validate an exact-ratio request before any work; returns the width multiple."""
    if target_layers is not None or ratio is None:
        raise ValueError("exact=True meets a ratio: give ratio=, not target_layers=")
    if method in no_provenance:
        raise ValueError(f"exact=True takes MLP channels from the layers a whole-layer method changed; "
                         f"{method} removes sublayers and changes no layer's MLP width: use a whole-layer "
                         "method (come, shortgpt, ...) or drop exact")
    if faithful:
        raise ValueError("faithful mode reproduces the release: it has no exact-ratio step (drop exact or faithful)")
    if rounding == "up":
        raise ValueError("exact=True rounds the whole-layer steps down (never past the ratio) and takes the "
                         "rest as MLP channels: rounding='up' contradicts it")
    m = DEFAULT_WIDTH_MULTIPLE if width_multiple is None else width_multiple
    I = adapter.intermediate_size
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        raise ValueError(f"width_multiple must be a positive integer, got {width_multiple!r}")
    if I % m != 0:
        raise ValueError(f"width_multiple={m} does not divide the MLP width {I}: the widths could not keep to "
                         f"multiples of it (divisors of {I} work, e.g. {_divisors_below(I, m)})")
    if m >= I:
        raise ValueError(f"width_multiple={m} leaves no smaller width for an MLP of {I} channels "
                         f"(each layer keeps at least one multiple)")
    total = count_parameters(adapter.model)
    step = m * channel_parameters(adapter) / total
    if step > 2 * TOLERANCE:
        raise ValueError(f"width_multiple={m}: one step of {m} channels is {100 * step:.2f}% of the parameters, "
                         f"too coarse to land within {100 * TOLERANCE:.1f} percentage points; use a smaller "
                         f"multiple (e.g. {_divisors_below(I, m)})")
    return m


def _divisors_below(n: int, m: int) -> str:
    ds = [d for d in (256, 128, 64, 32, 16, 8, 4, 2, 1) if d < m and n % d == 0]
    return ", ".join(map(str, ds[:3])) or "1"


def candidate_layers(provenance: list, n_original: int, widths: list, m: int, blocks_needed: int):
    """(changed layers, extra unchanged layers) to take channels from: the
    changed ones, then unchanged ones nearest a changed one while the blocks
    they offer fall short of ``blocks_needed``."""
    from .compensate import changed_layers

    def blocks(l):
        return 0 if widths[l] is None else max(0, widths[l] // m - 1)

    changed = [l for l in changed_layers(provenance, n_original) if blocks(l) > 0]
    have = sum(blocks(l) for l in changed)
    extra = []
    if have < blocks_needed:
        L = len(widths)
        anchors = changed or list(range(L))
        rest = sorted((l for l in range(L) if l not in changed and blocks(l) > 0),
                      key=lambda l: (min(abs(l - a) for a in anchors), l))
        for l in rest:
            if have >= blocks_needed:
                break
            extra.append(l)
            have += blocks(l)
    return changed, extra


def plan_blocks(scores: dict, widths: dict, m: int, n_blocks: int) -> dict:
    """{layer: number of blocks to drop}: ``n_blocks`` blocks of ``m``
    channels, each layer's in ascending score order, the cheapest (lowest mean
    score) next block first, a layer keeping at least ``m`` channels."""
    orders = {l: torch.sort(s.double(), stable=True)[1] for l, s in scores.items()}

    def mean(l, j):
        idx = orders[l][j * m:(j + 1) * m]
        return float(scores[l].double()[idx].mean())

    taken = {l: 0 for l in scores}
    heap = [(mean(l, 0), l) for l in scores if widths[l] // m > 1]
    heapq.heapify(heap)
    for _ in range(n_blocks):
        if not heap:
            raise WidthError(f"the candidate layers cannot give {n_blocks} blocks of {m} channels")
        _, l = heapq.heappop(heap)
        taken[l] += 1
        if widths[l] // m - taken[l] > 1:
            heapq.heappush(heap, (mean(l, taken[l]), l))
    return {l: k for l, k in taken.items() if k}


def _take(lin: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear holding ``lin``'s rows (dim 0) or columns (dim 1) ``idx``."""
    w = lin.weight.detach().index_select(dim, idx.to(lin.weight.device)).clone()
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device="meta")
    new.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        b = lin.bias.detach()
        b = b.index_select(0, idx.to(b.device)) if dim == 0 else b
        new.bias = nn.Parameter(b.clone(), requires_grad=lin.bias.requires_grad)
    return new


def shrink_mlp(adapter: Adapter, layer: nn.Module, keep) -> nn.Module:
    """A copy of ``layer`` whose MLP keeps only channels ``keep`` (in their order)."""
    keep = torch.as_tensor(sorted(int(i) for i in keep), dtype=torch.long)
    new = copy.deepcopy(layer)
    fam = adapter.family
    mlp = new
    parent_path = fam.down.rsplit(".", 1)[0]
    for part in parent_path.split("."):
        mlp = getattr(mlp, part)
    for role, dim in (("gate", 0), ("up", 0), ("down", 1)):
        name = getattr(fam, role).rsplit(".", 1)[1]
        setattr(mlp, name, _take(getattr(mlp, name), keep, dim))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)
    return new


def refit_layers(provenance: list, n_original: int, n_layers: int, shrunk, ls_layers: str = "changed") -> list:
    """The layers the compensation refits again after shrinking: those it refits
    (changed ones, or all) and every shrunk one, from the lowest shrunk layer up."""
    from .compensate import changed_layers

    if not shrunk:
        return []
    base = set(range(n_layers)) if ls_layers == "all" else set(changed_layers(provenance, n_original))
    first = min(shrunk)
    return sorted(l for l in base | set(shrunk) if l >= first)


def take_channels(adapter: Adapter, tokens: torch.Tensor, batch_size: int, ops, provenance: list, n_original: int,
                  ratio: float, params_before: int, width_multiple: int,
                  refit: Optional[Callable[[list], list]] = None, max_cache_bytes=None) -> dict:
    """Step 3-5 of the module docstring on the compressed model behind
    ``adapter`` (in place, through new layer objects); returns the report.
    ``refit(layers)``: re-applies the compensation to those layers (None: off)."""
    from .calibration import LayerStream
    from .scoring import channel_scores

    m = width_multiple
    c = channel_parameters(adapter)
    removed = params_before - count_parameters(adapter.model)
    whole_ratio = removed / params_before
    deficit = ratio * params_before - removed
    n_blocks = max(0, math.floor(deficit / (m * c) + 0.5))  # the count that lands nearest the ratio
    widths = mlp_widths(adapter.layers)
    rep = {"target_ratio": ratio, "whole_layer_ratio": whole_ratio, "width_multiple": m, "channel_parameters": c,
           "blocks": n_blocks, "candidates": [], "extra_layers": [], "layers": {}, "refit": None}
    if n_blocks:
        changed, extra = candidate_layers(provenance, n_original, widths, m, n_blocks)
        pool = sorted(changed + extra)
        if sum(widths[l] // m - 1 for l in pool) < n_blocks:
            raise WidthError(f"exact ratio {ratio}: the remaining {deficit / params_before:.2%} of the parameters "
                             f"need {n_blocks} blocks of {m} MLP channels, more than all layers can give while "
                             f"keeping {m} channels each")
        rep["candidates"], rep["extra_layers"] = changed, extra
        stream = LayerStream(adapter, tokens, batch_size, ops, max_cache_bytes=max_cache_bytes)
        stream.run(0, stop=max(pool) + 1)
        scores = {l: channel_scores(adapter, adapter.layers[l], stream.stats[l], ops)[1] for l in pool}
        del stream
        plan = plan_blocks(scores, {l: widths[l] for l in pool}, m, n_blocks)
        layers = list(adapter.layers)
        for l, k in sorted(plan.items()):
            order = torch.sort(scores[l].double(), stable=True)[1]
            drop, keep = order[:k * m], order[k * m:]
            layers[l] = shrink_mlp(adapter, layers[l], keep)
            s = scores[l]
            rep["layers"][str(l)] = {"width_before": widths[l], "width_after": widths[l] - k * m,
                                     "dropped": sorted(int(i) for i in drop),
                                     "max_dropped_score": float(s[drop].max()),
                                     "min_kept_score": float(s[keep].min())}
        adapter.set_layers(layers)
        if refit is not None:
            rep["refit"] = refit(sorted(plan))
    rep["widths"] = mlp_widths(adapter.layers)
    achieved = (params_before - count_parameters(adapter.model)) / params_before
    rep["achieved_ratio"] = achieved
    if abs(achieved - ratio) > TOLERANCE + 1e-12:
        raise WidthError(f"exact ratio {ratio}: reached {achieved:.4f}, more than {100 * TOLERANCE:.1f} "
                         f"percentage points away (width_multiple={m} too coarse for this model?)")
    return rep
