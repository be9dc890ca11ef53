"""Choosing a merged layer's MLP channels by what the refit can do with them.

CoMe keeps each source layer's top MLP channels by sensitivity (mean |a_j| x
||W_down[:, j]||_1), a score of each channel alone, at a split fixed before.
Once down_proj is refit by least squares (come_fast.compensate), what counts
is the residual the kept channels reach together. ``mlp_select="ls"``: with
the candidate's attention fixed, every channel of both source layers (2I) is
a feature on the merged layer's shared input (each with its own layer's
post-attention norm, as the folded merge runs it), and

    min_W ||t - h1 - b - a_S W^T||^2 + lam ||W||^2   over subsets S, |S| = I

is approached by structured Optimal Brain Surgeon removal (Hassibi & Stork;
column form as in SparseGPT / ZipLM): with H = G + lam I and W = H^-1 C the
optimal weights over the live channels, removing channel j and re-solving
the rest raises the residual by exactly ||W_j||^2 / [H^-1]_jj, and the
re-solved weights and inverse follow by a rank-|S| update

    W   <- W   - H^-1[:, S] (H^-1[S, S])^-1 W[S]
    H^-1 <- H^-1 - H^-1[:, S] (H^-1[S, S])^-1 H^-1[S, :]

Channels go ``BLOCK`` at a time, the cheapest first; the work is O(n^2) per
removed channel (n = 2I), about 1.5e10 multiply-adds for SmolLM2, whatever
the block. The split between the two layers is then whatever the removal
leaves. The kept channels' down_proj is refit afterwards as always (ridge
chosen on held-out rows).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .adapters import Adapter, get_attr
from .compensate import NormalEquations

ALPHA = 1e-2  # the selection's ridge, relative to mean(diag G): the refit's middle candidates
BLOCK = 32    # channels removed per update


def mlp_activations(adapter: Adapter, layer, h1: torch.Tensor) -> torch.Tensor:
    """The input of ``layer``'s down_proj when its MLP runs on residual ``h1``
    through the layer's own post-attention norm."""
    dev = adapter.part(layer, "gate").weight.device
    n = adapter.part(layer, "post_attn_norm")(h1.to(dev))
    act = get_attr(layer, adapter.family.gate.rsplit(".", 1)[0]).act_fn
    return act(adapter.part(layer, "gate")(n)) * adapter.part(layer, "up")(n)


def union_equations(adapter: Adapter, stream, probe, sources: Sequence, x: torch.Tensor,
                    target: torch.Tensor, skip: Sequence[int] = ()) -> NormalEquations:
    """Normal equations of the refit over all MLP channels of ``sources`` (in
    order, each layer's channels in index order), on the residual h1 that
    ``probe`` (a layer with the candidate's attention) computes from inputs
    ``x``; rows ``skip`` left out."""
    norm = adapter.part(probe, "post_attn_norm")
    down = adapter.part(probe, "down")
    seen = {}
    hook = norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("h1", args[0]))
    n_in = sum(adapter.part(s, "down").in_features for s in sources)
    dev = down.weight.device
    eq = NormalEquations.zeros(n_in, down.out_features, dev)
    skipped = set(skip)
    try:
        with torch.inference_mode():
            for i in range(0, x.shape[0], stream.bs):
                rows = slice(i, i + stream.bs)  # the batch as a view, unless some of its rows are left out
                if skipped:
                    rows = [r for r in range(i, min(i + stream.bs, x.shape[0])) if r not in skipped]
                    if not rows:
                        continue
                stream.forward_layer(probe, x[rows])
                h1 = seen.pop("h1")
                feats = torch.cat([mlp_activations(adapter, s, h1).to(dev) for s in sources], -1)
                R = target[rows].to(dev).float() - h1.to(dev).float()
                if down.bias is not None:
                    R = R - down.bias.float()
                eq.add(feats, R)
    finally:
        hook.remove()
    return eq


def obs_keep(G: torch.Tensor, C: torch.Tensor, keep: int, alpha: float = ALPHA, block: int = BLOCK) -> list[int]:
    """The ``keep`` features left after greedy OBS removal (ascending indices)
    for the ridge problem with Gram ``G`` [n, n] and cross term ``C`` [n, d]."""
    n = G.shape[0]
    if not 0 < keep <= n:
        raise ValueError(f"keep must be in 1..{n}, got {keep}")
    G = G.double()
    lam = alpha * float(G.diagonal().mean().clamp_min(1e-30))
    H = G + lam * torch.eye(n, dtype=torch.float64, device=G.device)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    W = Hinv @ C.double()
    alive = torch.ones(n, dtype=torch.bool, device=G.device)
    remove = n - keep
    while remove > 0:
        k = min(block, remove)
        cost = torch.full((n,), float("inf"), dtype=torch.float64, device=G.device)
        cost[alive] = W[alive].pow(2).sum(1) / Hinv.diagonal()[alive]
        S = torch.topk(cost, k, largest=False).indices
        HS = Hinv[:, S]
        M = torch.linalg.inv(Hinv[S][:, S])
        W -= HS @ (M @ W[S])
        Hinv -= HS @ M @ HS.T
        alive[S] = False
        remove -= k
    return alive.nonzero().flatten().tolist()


def select_mlp(adapter: Adapter, stream, probe, layer_a, layer_b, x: torch.Tensor, target: torch.Tensor,
               keep: int, skip: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """(channels of layer a, channels of layer b) to keep, ``keep`` in all,
    chosen on the rows not in ``skip``."""
    eq = union_equations(adapter, stream, probe, [layer_a, layer_b], x, target, skip)
    kept = obs_keep(eq.G, eq.C, keep)
    I_a = adapter.part(layer_a, "down").in_features
    return [j for j in kept if j < I_a], [j - I_a for j in kept if j >= I_a]


def reselect_mlp(adapter: Adapter, stream, layer, sources: Sequence, x: torch.Tensor, target: torch.Tensor) -> dict:
    """Give ``layer`` (a merged layer, changed in place) the MLP channels of
    all its ``sources`` (the original layers it stands for) that the refit can
    use best, as many as it has now: its attention and the shared input stay,
    its post-attention norm becomes 1 and each kept channel's gate/up row
    carries its own source's norm weight (the folded merge). A block merged
    step by step chose its channels among those the earlier steps kept, each
    on the shared input of its own step; here every original channel of the
    block is a candidate on the final layer's real input. Returns the kept
    channels per source."""
    eq = union_equations(adapter, stream, layer, sources, x, target)
    dev = adapter.part(layer, "gate").weight.device
    kept = torch.tensor(obs_keep(eq.G, eq.C, adapter.part(layer, "down").in_features), device=dev)

    def stacked(role: str, attr: str = "weight", fold: bool = False, dim: int = 0):
        parts = []
        for s in sources:
            t = getattr(adapter.part(s, role), attr)
            if t is None:
                return None
            t = t.detach().to(dev)
            if fold:
                w = adapter.part(s, "post_attn_norm").weight.detach().to(dev)
                t = t * w.to(t.dtype)
            parts.append(t)
        return torch.cat(parts, dim)

    with torch.no_grad():
        for role in ("gate", "up"):
            mod = adapter.part(layer, role)
            mod.weight.data = stacked(role, fold=True)[kept].contiguous()
            if mod.bias is not None:
                mod.bias.data = stacked(role, "bias")[kept].contiguous()
        down = adapter.part(layer, "down")
        down.weight.data = stacked("down", dim=1)[:, kept].contiguous()
        norm = adapter.part(layer, "post_attn_norm")
        norm.weight.data = torch.ones_like(norm.weight.data)
    counts, start = [], 0
    for s in sources:
        n = adapter.part(s, "down").in_features
        counts.append(int(((kept >= start) & (kept < start + n)).sum()))
        start += n
    return {"channels_per_source": counts, "pool": start}
