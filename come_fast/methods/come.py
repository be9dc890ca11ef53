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

import torch
import torch.nn.functional as F

from ..calibration import LayerStream
from ..merge import Selection, concat_merge, merge_provenance, query_heads, replace_pair
from ..scoring import allocate, channel_scores, split_ratio, top_units
from . import Context, Outcome, Validator, number, one_of, positive_int, register


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
            "merged_sha256": _hashes(merged),
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


@register("come", options={"last_boundary": one_of("final_norm", "raw"), "pair_tokens": one_of("last", "all")})
def come(ctx: Context, n_remove: int) -> Outcome:
    return _come(ctx, n_remove, grid=False)


@register("come-p", options={"last_boundary": one_of("final_norm", "raw"), "pair_tokens": one_of("last", "all"),
                             "grid_steps": positive_int})
def come_p(ctx: Context, n_remove: int) -> Outcome:
    return _come(ctx, n_remove, grid=True)


# -- CoMe with the levers: folded norms, a split search that contains deletion, loss-aware pairs,
# -- closed-form compensation inside the search ------------------------------------------------

def _kl_to_teacher(a, x: torch.Tensor, teacher_lp: list, bs: int) -> float:
    """Mean over tokens of KL(teacher || student) from final hidden states ``x``."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for k, i in enumerate(range(0, x.shape[0], bs)):
            lq = F.log_softmax(a.lm_head(a.final_norm(x[i:i + bs])).float(), -1)
            lp = teacher_lp[k]
            total += float((lp.exp() * (lp - lq)).sum())
            count += lq.shape[0] * lq.shape[1]
    return total / count


def _lm_loss(a, x: torch.Tensor, tokens: torch.Tensor, bs: int) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, x.shape[0], bs):
            logits = a.lm_head(a.final_norm(x[i:i + bs][:, :-1])).float()
            tgt = tokens[i:i + bs, 1:].to(logits.device)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"))
            count += tgt.numel()
    return total / count


def _come_search(ctx: Context, n_remove: int) -> Outcome:
    from ..compensate import refit_down, spans

    opts = ctx.options
    a = ctx.adapter
    L0 = len(a.layers)
    norms = opts.get("norms", "fold")
    grid = opts.get("split_grid", (0.0, 0.25, 0.5, 0.75, 1.0))
    k_pairs = opts.get("pair_candidates", 6)
    search_loss = opts.get("search_loss", "kl")
    from ..compensate import holdout_rows

    # candidates are judged on the rows the refit holds out (its ridge choice aside, it never fits them)
    rows = holdout_rows(ctx.tokens.shape[0]) if opts.get("score_rows") is None else list(range(int(opts["score_rows"])))
    teacher = ctx.teacher  # set when compress(..., compensate="ls"): candidates are refit inside the search
    allow_repeat = bool(opts.get("allow_repeat", True))
    prov: list = list(range(L0))
    steps = []

    def progress(l):
        if ctx.progress:
            ctx.progress("layers scored", l + 1, len(a.layers))

    stream = LayerStream(a, ctx.tokens, ctx.batch_size, ctx.ops, final_norm_last=True, progress=progress,
                         max_cache_bytes=opts.get("max_cache_bytes"))
    stream.run(0)
    score_tokens = ctx.tokens[rows]
    teacher_lp = None
    if search_loss == "kl":
        with torch.inference_mode():
            # the original model's final-normed last hidden state on the score rows
            hL = a.final_norm(teacher[L0][rows]) if teacher is not None else stream.output()[rows]
            teacher_lp = [F.log_softmax(a.lm_head(hL[i:i + ctx.batch_size]).float(), -1)
                          for i in range(0, len(rows), ctx.batch_size)]

    def loss_of(start: int, layers: list) -> float:
        x = stream.input_of(start)[rows]
        with torch.inference_mode():
            for layer in layers:
                x = stream.forward_layer(layer, x)
        if search_loss == "kl":
            return _kl_to_teacher(a, x, teacher_lp, ctx.batch_size)
        return _lm_loss(a, x, score_tokens, ctx.batch_size)

    for step in range(n_remove):
        t0 = time.perf_counter()
        L = len(a.layers)
        bi = [st.bi_sum for st in stream.stats]
        dist = stream.pair_distance(opts.get("pair_tokens", "last"))
        blocked = set() if allow_repeat else blocked_pairs(prov)
        order = sorted((d, i) for i, d in enumerate(dist) if i not in blocked)
        if not order:
            raise NoMergeablePairError(f"step {step + 1}: every adjacent pair touches an already merged layer; "
                                       "ask for fewer removals or pass allow_repeat=True")
        pairs = [i for _, i in order[:k_pairs]] if k_pairs else [i for _, i in order]
        cands = []
        for idx in pairs:
            x_in = stream.input_of(idx)
            new_prov = merge_provenance(prov, idx)
            end = spans(new_prov, L0)[idx][1]
            seen_layers = {}
            for r in grid:
                sel, nkv, nmlp, _ = _select(ctx, stream, idx, (r, 1 - r), "contiguous")
                key = (tuple(sel.kv_a), tuple(sel.kv_b), tuple(sel.mlp_a), tuple(sel.mlp_b))
                if key in seen_layers:  # the same units as another split (coarse KV groups): same layer
                    continue
                cand = concat_merge(a, a.layers[idx], a.layers[idx + 1], sel, r, ctx.ops, norms=norms)
                refit = None
                if teacher is not None:
                    refit = refit_down(a, stream, cand, x_in, teacher[end], index=idx, target_boundary=end,
                                       weighting=opts.get("ls_weighting", "none")).as_dict()
                loss = loss_of(idx, [cand] + list(a.layers[idx + 2:]))
                seen_layers[key] = True
                cands.append({"pair": idx, "r": r, "loss": loss, "kv_counts": list(nkv), "mlp_counts": list(nmlp),
                              "refit": refit, "_layer": cand, "_sel": sel})
                if ctx.progress:
                    ctx.progress("candidates", len(cands), len(pairs) * len(grid))
        best = min(cands, key=lambda c: (c["loss"], c["pair"], -c["r"]))
        idx, merged, sel = best["pair"], best["_layer"], best["_sel"]
        pair_orig = [prov[idx], prov[idx + 1]]
        replace_pair(a, idx, merged)
        prov = merge_provenance(prov, idx)
        stream.merged(idx)
        rec = {
            "merged_sha256": _hashes(merged),
            "step": step, "layers_before": L, "pair": [idx, idx + 1], "pair_original": pair_orig,
            "ratio": [best["r"], 1 - best["r"]], "kv_counts": best["kv_counts"], "mlp_counts": best["mlp_counts"],
            "kv_a": sel.kv_a, "kv_b": sel.kv_b, "q_heads_a": sel.q_heads_a, "q_heads_b": sel.q_heads_b,
            "mlp_a": sel.mlp_a, "mlp_b": sel.mlp_b, "bi_sum": bi, "pair_distance_sum": dist,
            "candidates": [{k: v for k, v in c.items() if not k.startswith("_")} for c in cands],
            "loss": best["loss"], "refit": best["refit"], "provenance": prov,
        }
        steps.append(rec)
        if step + 1 < n_remove:
            stream.run(idx)
        rec["seconds"] = time.perf_counter() - t0
        if ctx.on_step:
            ctx.on_step(prov, steps)
        if ctx.progress:
            ctx.progress("merges", step + 1, n_remove)
    settings = {"faithful": False, "allow_repeat": allow_repeat, "grouping": "contiguous", "norms": norms,
                "split": "search", "split_grid": list(grid), "pair_select": "loss", "pair_candidates": k_pairs,
                "search_loss": search_loss, "score_rows": rows, "refit_in_search": teacher is not None,
                "layers_run": stream.layers_run}
    return Outcome(provenance=prov, steps=steps, settings=settings)


def _hashes(layer) -> dict:
    """SHA-256 of each tensor's bytes, for any dtype (numpy has no bfloat16: view the bytes instead)."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in layer.state_dict().items()}


_SPLIT = number(0, 1)
SPLIT_GRID = Validator(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_SPLIT(x) for x in v),
                       "a non-empty list of splits in [0, 1]")


@register("come-x", options={"norms": one_of("mean", "fold"), "split_grid": SPLIT_GRID,
                             "pair_candidates": positive_int, "search_loss": one_of("kl", "lm"),
                             "score_rows": positive_int, "pair_tokens": one_of("last", "all")})
def come_x(ctx: Context, n_remove: int) -> Outcome:
    return _come_search(ctx, n_remove)
