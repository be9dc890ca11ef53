"""CoMe: progressive concatenation-based layer merging (arXiv 2510.15304).

One step (come-algorithm.md): scores on the current model, pick the adjacent
pair with the smallest last-token angular distance between its input and its
output (repeat protection: a merged layer is not merged again), split the width
by block influence (CoMe) or by a grid search on calibration loss (CoMe-P),
take each layer's top units, concatenate. Only the merged layer and those above
it are re-scored for the next step: the stream keeps the boundaries below.
"""
from __future__ import annotations

import hashlib
import math
import time


from ..calibration import LayerStream
from ..merge import Selection, concat_merge, merge_provenance, query_heads, replace_pair
from ..scoring import allocate, channel_scores, split_ratio, top_units
from . import Context, Outcome, register


class NoMergeablePairError(ValueError):
    pass


def blocked_pairs(prov: list) -> set[int]:
    """Pairs touching an already merged layer (the release's --wo-repeat)."""
    out = set()
    for i, p in enumerate(prov):
        if isinstance(p, list):
            out.update(j for j in (i - 1, i) if j >= 0)
    return out


def _select(ctx: Context, stream: LayerStream, idx: int, ratio: tuple[float, float], grouping: str):
    a = ctx.adapter
    layers = a.layers
    att_a, mlp_a = channel_scores(a, layers[idx], stream.stats[idx], ctx.ops)
    att_b, mlp_b = channel_scores(a, layers[idx + 1], stream.stats[idx + 1], ctx.ops)
    nkv = allocate(a.num_kv_heads, ratio)
    nmlp = allocate(a.intermediate_size, ratio)
    kv_a, kv_b = top_units(att_a, nkv[0]), top_units(att_b, nkv[1])
    sel = Selection(
        kv_a=kv_a, kv_b=kv_b,
        mlp_a=top_units(mlp_a, nmlp[0]), mlp_b=top_units(mlp_b, nmlp[1]),
        q_heads_a=query_heads(kv_a, a.num_kv_heads, a.group_size, grouping),
        q_heads_b=query_heads(kv_b, a.num_kv_heads, a.group_size, grouping),
    )
    scores = {"att_a": att_a.tolist(), "att_b": att_b.tolist(), "mlp_a": mlp_a.tolist(), "mlp_b": mlp_b.tolist()}
    return sel, nkv, nmlp, scores


def _come(ctx: Context, n_remove: int, grid: bool) -> Outcome:
    opts = ctx.options
    faithful = bool(opts.get("faithful", False))
    allow_repeat = bool(opts.get("allow_repeat", False))
    grid_steps = int(opts.get("grid_steps", 20))
    grouping = "tiled" if faithful else "contiguous"
    # Two more release choices, kept by default, switchable to measure them: the last
    # layer's BI and pair distance on the final-normed hidden state, and the pair
    # distance on the last token only.
    last_normed = {"final_norm": True, "raw": False}.get(opts.get("last_boundary", "final_norm"))
    pair_tokens = opts.get("pair_tokens", "last")
    if last_normed is None or pair_tokens not in ("last", "all"):
        raise ValueError("come: last_boundary must be 'final_norm' or 'raw' and pair_tokens 'last' or 'all', got "
                         f"{opts.get('last_boundary')!r}, {pair_tokens!r}")
    if faithful and (not last_normed or pair_tokens != "last"):
        raise ValueError("faithful mode keeps the release's last_boundary='final_norm' and pair_tokens='last'")
    if pair_tokens == "all" and opts.get("max_cache_bytes") is not None:
        raise ValueError("pair_tokens='all' needs every layer boundary cached: drop max_cache_bytes")
    a = ctx.adapter
    prov: list = list(range(len(a.layers)))
    steps = []

    def progress(l):
        if ctx.progress:
            ctx.progress("layers scored", l + 1, len(a.layers))

    stream = LayerStream(a, ctx.tokens, ctx.batch_size, ctx.ops, final_norm_last=last_normed, progress=progress,
                         max_cache_bytes=opts.get("max_cache_bytes"))
    stream.run(0)
    for step in range(n_remove):
        t0 = time.perf_counter()
        L = len(a.layers)
        bi = [st.bi_sum for st in stream.stats]
        dist = stream.pair_distance(pair_tokens)
        blocked = set() if allow_repeat else blocked_pairs(prov)
        masked = [math.inf if i in blocked else d for i, d in enumerate(dist)]
        if all(math.isinf(d) for d in masked):
            raise NoMergeablePairError(
                f"step {step + 1}: every adjacent pair touches an already merged layer; "
                "ask for fewer removals or pass allow_repeat=True"
            )
        idx = masked.index(min(masked))
        ratio = split_ratio(bi[idx], bi[idx + 1])
        grid_losses = None
        if grid:
            grid_losses = {}
            best = None
            for i in range(grid_steps + 1):
                r = i / grid_steps
                sel, *_ = _select(ctx, stream, idx, (r, 1 - r), grouping)
                cand = concat_merge(a, a.layers[idx], a.layers[idx + 1], sel, r, ctx.ops)
                loss = stream.loss_with(idx, [cand] + list(a.layers[idx + 2:]))
                grid_losses[r] = loss
                if best is None or loss < best[0]:
                    best = (loss, r)
            ratio = (best[1], 1 - best[1])
        sel, nkv, nmlp, scores = _select(ctx, stream, idx, ratio, grouping)
        merged = concat_merge(a, a.layers[idx], a.layers[idx + 1], sel, ratio[0], ctx.ops)
        pair_orig = [prov[idx], prov[idx + 1]]
        replace_pair(a, idx, merged)
        prov = merge_provenance(prov, idx)
        stream.merged(idx)
        rec = {
            "merged_sha256": {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                              for k, v in merged.state_dict().items()},
            "step": step, "layers_before": L, "pair": [idx, idx + 1], "pair_original": pair_orig,
            "ratio": list(ratio), "kv_counts": list(nkv), "mlp_counts": list(nmlp),
            "kv_a": sel.kv_a, "kv_b": sel.kv_b, "q_heads_a": sel.q_heads_a, "q_heads_b": sel.q_heads_b,
            "mlp_a": sel.mlp_a, "mlp_b": sel.mlp_b,
            "bi_sum": bi, "pair_distance_sum": dist, "blocked": sorted(blocked),
            "att_scores": scores, "grid_losses": grid_losses, "provenance": prov,
        }
        rec["seconds"] = time.perf_counter() - t0
        steps.append(rec)
        if ctx.on_step:
            ctx.on_step(prov, steps)
        if step + 1 < n_remove:
            t1 = time.perf_counter()
            stream.run(idx)  # layers below idx saw unchanged inputs: their scores stand
            rec["seconds"] += time.perf_counter() - t1
        if ctx.progress:
            ctx.progress("merges", step + 1, n_remove)
    settings = {"faithful": faithful, "allow_repeat": allow_repeat, "grouping": grouping,
                "last_boundary": "final_norm" if last_normed else "raw", "pair_tokens": pair_tokens,
                "split": "grid" if grid else "bi", "grid_steps": grid_steps if grid else None,
                "layers_run": stream.layers_run}
    return Outcome(provenance=prov, steps=steps, settings=settings)


@register("come", options=("last_boundary", "pair_tokens"))
def come(ctx: Context, n_remove: int) -> Outcome:
    return _come(ctx, n_remove, grid=False)


@register("come-p", options=("last_boundary", "pair_tokens", "grid_steps"))
def come_p(ctx: Context, n_remove: int) -> Outcome:
    return _come(ctx, n_remove, grid=True)
