"""CoMe: progressive concatenation-based layer merging (arXiv 2510.15304).

One step (come-algorithm.md): scores on the current model, pick an adjacent
pair, split its width between the two layers, take each layer's top units
(channel sensitivity), concatenate into one layer of the original width. Only
the merged layer and those above it are re-scored for the next step: the
stream keeps the boundaries below.

The release (``faithful=True``) picks the pair with the smallest last-token
angular distance D between its input and output, splits by block influence
(BI), averages the two norms, never merges a merged layer again and tiles the
GQA heads wrongly. CoMe-P (``method="come-p"``) grid-searches the split on
calibration LM loss. The default mode keeps the release's scores and
changes five things, each an option (the README's ablations):

- ``norms="fold"``: each source layer's norm weights folded into its own kept
  rows, unit norms in the merged layer (come_fast.merge); "mean": the release.
- ``split="search"``: the split r tried over ``split_grid`` (0, 1/4, ..., 1;
  the ends are the deletion of one layer, so deletion is inside the search),
  each candidate refit by the closed-form compensation when it is on, and the
  one whose model is closest to the original (KL of the next-token
  distributions on the held-out calibration rows) kept; "bi": the release.
- ``pair_select``: which pairs are candidates. "bi": the pairs on either side
  of the ``pair_candidates`` layers of lowest block influence (absorbing such
  a layer is what ShortGPT deletes; the search decides how much of it stays);
  "distance": the ``pair_candidates`` pairs of smallest D (1: the release).
- repeats allowed (``allow_repeat``), so that a merged layer can absorb its
  neighbour again and a block of layers can fold into one.
- ``mlp_select="final"``: how a merged layer's MLP channels are chosen
  (MLP_SELECTS below). "score" is the release's rule (each layer's top
  channels by sensitivity, as many as the split gives it), and what the
  search uses; once it has ended, every merged layer chooses again, among all
  the MLP channels of the original layers it stands for, those the down_proj
  refit can use best (come_fast.channel_ls: Optimal Brain Surgeon removal on
  the refit's normal equations), before the final refit. "ls" makes that
  choice at every candidate of the search instead (it changes which merges
  win: on SmolLM2 better at 10% and 30%, worse at 20%), "ls+final" both.

``keep_last=k`` (default 0.125): no merge touches the original model's last k
layers (a float in (0, 1): that share of the depth, rounded half up; the
default, the top eighth, shrinks where the removals asked need the room), as
the deletion methods that lead on the zero-shot tasks keep the top layers
whole. Chosen on SmolLM2's development data (results/keep4): 4 of 30 layers
gives the same model as 0 at 10%, a worse one at 20% (development perplexities
2-3% higher) and a better one at 30% (4-7% lower, calibration KL 8% lower);
6 of 30 was worse than 4 at 30% on WikiText-2 validation and the KL (level on
C4-dev). One model's evidence: 0 restores the search over every layer.

``beam=k`` (default 1, the greedy search): the k partial models the judge
ranks best are kept at every step, each continued by its own candidates.
Measured on SmolLM2 with k=2 (README): the same model at 30%, no gain.

``compress(..., compensate="ls")``, the default for CoMe's default mode, adds
the closed-form refit (come_fast.compensate) inside the search and once more
over the final model.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..calibration import LayerStream
from ..channel_ls import select_mlp
from ..compensate import leaves
from ..merge import Selection, concat_merge, merge_provenance, query_heads, replace_pair
from ..scoring import allocate, channel_scores, split_ratio, top_units
from . import Context, Outcome, Validator, boolean, non_negative_int, number, one_of, positive_int, register


class NoMergeablePairError(ValueError):
    pass


def blocked_pairs(prov: list) -> set[int]:
    """Pairs touching an already merged layer (the release's --wo-repeat)."""
    out = set()
    for i, p in enumerate(prov):
        if isinstance(p, list):
            out.update(j for j in (i - 1, i) if j >= 0)
    return out


def top_layers(keep_last, n_layers: int) -> int:
    """``keep_last`` as a number of layers: an int is one; a float in (0, 1) is a
    share of the original depth, rounded half up (0.125 of 30 layers: 4)."""
    if isinstance(keep_last, float):
        return int(math.floor(keep_last * n_layers + 0.5))
    return int(keep_last or 0)


def protected_pairs(prov: list, keep_last: int, n_layers: int) -> set[int]:
    """Pairs touching one of the original model's last ``keep_last`` layers."""
    out = set()
    for i, p in enumerate(prov):
        if max(leaves(p)) >= n_layers - keep_last:
            out.update(j for j in (i - 1, i) if 0 <= j < len(prov) - 1)
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


# the release's choices: what faithful mode runs, and the baseline of the default mode's ablations
RELEASE = {"norms": "mean", "split": "bi", "pair_select": "distance", "pair_candidates": 1, "mlp_select": "score"}
DEFAULTS = {"norms": "fold", "split": "search", "pair_select": "bi", "pair_candidates": 1,
            "split_grid": (0.0, 0.25, 0.5, 0.75, 1.0), "search_refit": True, "mlp_select": "final",
            # the top eighth of the depth (4 of SmolLM2's 30 layers) never merged; as a default it yields
            # to the removals asked (an explicit keep_last does not: too few layers left is an error)
            "keep_last": 0.125}


# how a merged layer's MLP channels are chosen: "score", the release's sensitivity at the split;
# "ls", by the refit they allow, at every candidate of the search (come_fast.channel_ls.select_mlp);
# "final", the search by score, then every merged layer of the result again from all the original
# layers it stands for (channel_ls.reselect_mlp, before the final refit); "ls+final", both
MLP_SELECTS = ("score", "ls", "final", "ls+final")
IN_SEARCH = ("ls", "ls+final")
AT_THE_END = ("final", "ls+final")


def _kl_to_teacher(a, x: torch.Tensor, teacher_lp: list, bs: int) -> float:
    """Mean over tokens of KL(teacher || student) from last hidden states ``x``."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for k, i in enumerate(range(0, x.shape[0], bs)):
            lq = F.log_softmax(a.lm_head(a.final_norm(x[i:i + bs])).float(), -1)
            lp = teacher_lp[k]
            total += float((lp.exp() * (lp - lq)).sum())
            count += lq.shape[0] * lq.shape[1]
    return total / count


@dataclass
class _Path:
    """One partial model the search keeps: its layers, provenance, step records
    and calibration stream (a beam of width 1 keeps one: the greedy search)."""

    layers: list
    prov: list
    steps: list
    stream: LayerStream


class _Judge:
    """How a candidate merge is scored: CoMe-P's calibration LM loss on all
    rows (``split="grid"``), else KL to the original model's next-token
    distributions on the held-out calibration rows (those the refit does not fit)."""

    def __init__(self, ctx: Context, stream: LayerStream, lm_loss: bool):
        from ..compensate import holdout_rows

        a = ctx.adapter
        self.a, self.stream, self.bs, self.lm = a, stream, ctx.batch_size, lm_loss
        if lm_loss:
            return
        n = ctx.tokens.shape[0]
        rows = ctx.options.get("score_rows")
        self.rows = holdout_rows(n) or list(range(n)) if rows is None else list(range(min(int(rows), n)))
        with torch.inference_mode():  # the stream was just run on the original model
            h = stream.output()[self.rows]
            self.teacher_lp = [F.log_softmax(a.lm_head(h[i:i + self.bs]).float(), -1)
                               for i in range(0, len(self.rows), self.bs)]

    def __call__(self, start: int, layers: list) -> float:
        if self.lm:
            return self.stream.loss_with(start, layers)
        x = self.stream.input_of(start)[self.rows]
        for layer in layers:
            x = self.stream.forward_layer(layer, x)
        return _kl_to_teacher(self.a, x, self.teacher_lp, self.bs)


def _hashes(layer) -> dict:
    """SHA-256 of each tensor's bytes, for any dtype (numpy has no bfloat16: view the bytes instead)."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in layer.state_dict().items()}


def settings_of(opts: dict, method: str) -> dict:
    """The four levers' settings of a run: the release's in faithful mode, the
    default mode's otherwise, each overridden by an explicit option."""
    if opts.get("faithful"):
        return dict(RELEASE)
    base = dict(DEFAULTS) if method == "come" else {**RELEASE, "split": "grid"}
    return {**base, **{k: opts[k] for k in (*DEFAULTS, "pair_candidates") if opts.get(k) is not None}}


def _come(ctx: Context, n_remove: int, method: str) -> Outcome:
    from ..compensate import holdout_rows, refit_parts, refit_settings, spans

    opts = ctx.options
    faithful = bool(opts.get("faithful", False))
    lever = settings_of(opts, method)
    norms, split, pair_select, k_pairs = lever["norms"], lever["split"], lever["pair_select"], lever["pair_candidates"]
    mlp_select = lever["mlp_select"]
    allow_repeat = bool(opts.get("allow_repeat", False))
    grid_steps = int(opts.get("grid_steps", 20))
    splits = {"search": tuple(lever.get("split_grid", DEFAULTS["split_grid"])),
              "grid": tuple(i / grid_steps for i in range(grid_steps + 1))}.get(split)
    grouping = "tiled" if faithful else "contiguous"
    # Two more release choices, kept by default, switchable to measure them: the last
    # layer's BI and pair distance on the final-normed hidden state, and the pair
    # distance on the last token only.
    last_normed = {"final_norm": True, "raw": False}[opts.get("last_boundary", "final_norm")]
    pair_tokens = opts.get("pair_tokens", "last")
    if faithful and (not last_normed or pair_tokens != "last"):
        raise ValueError("faithful mode keeps the release's last_boundary='final_norm' and pair_tokens='last'")
    levers = (*DEFAULTS, "search_solve", "beam")
    if faithful and any(opts.get(k) is not None for k in levers):
        raise ValueError(f"faithful mode reproduces the release: the options {', '.join(levers)} do not apply")
    if pair_tokens == "all" and opts.get("max_cache_bytes") is not None:
        raise ValueError("pair_tokens='all' needs every layer boundary cached: drop max_cache_bytes")
    a = ctx.adapter
    L0 = len(a.layers)
    keep_last = top_layers(lever.get("keep_last", 0), L0)
    if opts.get("keep_last") is None:
        keep_last = min(keep_last, max(L0 - 1 - n_remove, 0))
    if keep_last and n_remove > L0 - keep_last - 1:
        room = max(L0 - keep_last - 1, 0)
        raise ValueError(f"keep_last={opts.get('keep_last')} leaves {max(L0 - keep_last, 0)} of {L0} layers to merge, room for "
                         f"{room} removal{'' if room == 1 else 's'}; {n_remove} asked")
    prov: list = list(range(L0))
    steps = []
    teacher = ctx.teacher if opts.get("search_refit", True) else None  # compensate="ls": refit every candidate
    # "fit": a candidate's refit never sees the rows the judge scores it on
    search_solve = opts.get("search_solve", "all")
    usable = norms == "fold" and ctx.teacher is not None and (mlp_select not in IN_SEARCH or teacher is not None)
    if not usable and mlp_select != "score":
        if opts.get("mlp_select") is not None:
            raise ValueError(f"mlp_select={mlp_select!r} chooses MLP channels by the refit they allow: it needs "
                             "compensate='ls' and norms='fold' (and for 'ls' the refit inside the search)")
        mlp_select = "score"  # the default's choice without the refit: by score, as the release
    ctx.reselect_mlp = mlp_select in AT_THE_END

    def progress(l):
        if ctx.progress:
            ctx.progress("layers scored", l + 1, len(a.layers))

    judged = bool(splits or k_pairs > 1 or pair_select == "bi")
    beam = int(opts.get("beam", 1))
    if beam > 1 and not judged:
        raise ValueError("beam > 1 needs judged candidates: the split search, pair_select='bi' or "
                         "pair_candidates > 1")
    stream = LayerStream(a, ctx.tokens, ctx.batch_size, ctx.ops, final_norm_last=last_normed, progress=progress,
                         max_cache_bytes=opts.get("max_cache_bytes"))
    stream.run(0)
    judge = _Judge(ctx, stream, lm_loss=split == "grid") if judged else None
    paths = [_Path(list(a.layers), prov, [], stream)]

    def activate(path: "_Path") -> None:
        if beam > 1:  # beam=1: the adapter already holds the one path
            a.set_layers(path.layers)
        if judge is not None:
            judge.stream = path.stream

    def candidates(path: "_Path") -> tuple:
        """Every candidate merge of ``path``'s model, merged, refit and judged,
        in the order made; with the scores they were chosen from (bi, dist, blocked)."""
        stream, prov = path.stream, path.prov
        L = len(a.layers)
        bi = [st.bi_sum for st in stream.stats]
        dist = stream.pair_distance(pair_tokens)
        blocked = set() if allow_repeat else blocked_pairs(prov)
        blocked |= protected_pairs(prov, keep_last, L0)
        if pair_select == "bi":
            pairs, used = [], 0
            for j in sorted(range(L), key=lambda j: (bi[j], j)):  # the k lowest-BI layers with a free pair
                ps = [p for p in (j - 1, j) if 0 <= p < L - 1 and p not in blocked]
                pairs += [p for p in ps if p not in pairs]
                used += bool(ps)
                if used == k_pairs:
                    break
        else:
            order = sorted((d, i) for i, d in enumerate(dist) if i not in blocked)
            pairs = [i for _, i in order[:k_pairs]]
        if not pairs:
            if len(paths) > 1:
                return [], bi, dist, blocked
            also = f" or one of the last {keep_last} layers (keep_last)" if keep_last else ""
            raise NoMergeablePairError(
                f"step {step + 1}: every adjacent pair touches an already merged layer{also}; "
                "ask for fewer removals or pass allow_repeat=True" + (" or a smaller keep_last" if keep_last else "")
            )
        cands = []
        for idx in pairs:
            rs = splits if splits else (split_ratio(bi[idx], bi[idx + 1])[0],)
            x_in = stream.input_of(idx) if teacher is not None else None
            end = spans(merge_provenance(prov, idx), L0)[idx][1] if teacher is not None else None
            seen = set()
            for r in rs:
                ratio = (r, 1 - r) if splits else split_ratio(bi[idx], bi[idx + 1])
                sel, nkv, nmlp, scores = _select(ctx, stream, idx, ratio, grouping)
                key = (tuple(sel.kv_a), tuple(sel.kv_b), tuple(sel.mlp_a), tuple(sel.mlp_b))
                if mlp_select in IN_SEARCH:  # the MLP channels follow from the attention
                    key = key[:2]
                if key in seen:  # coarse KV groups: another split gave exactly these units
                    continue
                seen.add(key)
                if mlp_select in IN_SEARCH:
                    probe = concat_merge(a, a.layers[idx], a.layers[idx + 1], sel, ratio[0], ctx.ops, norms=norms)
                    mlp_a, mlp_b = select_mlp(a, stream, probe, a.layers[idx], a.layers[idx + 1], x_in,
                                              teacher[end], keep=len(sel.mlp_a) + len(sel.mlp_b),
                                              skip=holdout_rows(x_in.shape[0]) if search_solve == "fit" else ())
                    sel = replace(sel, mlp_a=mlp_a, mlp_b=mlp_b)
                    nmlp = (len(mlp_a), len(mlp_b))
                cand = concat_merge(a, a.layers[idx], a.layers[idx + 1], sel, ratio[0], ctx.ops, norms=norms)
                c = {"pair": idx, "r": ratio[0], "ratio": ratio, "kv_counts": list(nkv), "mlp_counts": list(nmlp),
                     "_layer": cand, "_sel": sel, "_scores": scores}
                if teacher is not None:
                    c["refit"] = refit_parts(a, stream, cand, x_in, teacher[end], index=idx, target_boundary=end,
                                             solve_on=search_solve, **refit_settings(opts)).as_dict()
                cands.append(c)
        if len(cands) > 1 or beam > 1:
            for n, c in enumerate(cands):
                c["loss"] = judge(c["pair"], [c["_layer"]] + list(a.layers[c["pair"] + 2:]))
                if ctx.progress:
                    ctx.progress("candidates", n + 1, len(cands))
        return cands, bi, dist, blocked

    for step in range(n_remove):
        t0 = time.perf_counter()
        found = []  # per path: its candidates in the order made, and the scores they came from
        for path in paths:
            activate(path)
            found.append(candidates(path))
        pool = [(rank, c) for rank, (cands, *_) in enumerate(found) for c in cands]
        if not pool:
            raise NoMergeablePairError(f"step {step + 1}: no path of the beam has a mergeable pair")
        if len(pool) > 1:
            pool.sort(key=lambda rc: (rc[1]["loss"], rc[0], rc[1]["pair"], -rc[1]["r"]))
        chosen = pool[:beam]
        # a path continued by several candidates gives each but the last a copy of its stream
        last_use = {rank: i for i, (rank, _) in enumerate(chosen)}
        streams = [paths[rank].stream if last_use[rank] == i else paths[rank].stream.copy()
                   for i, (rank, _) in enumerate(chosen)]
        new_paths = []
        for (rank, best), stream in zip(chosen, streams):
            path = paths[rank]
            activate(path)
            cands, bi, dist, blocked = found[rank]
            prov = path.prov
            L = len(a.layers)
            idx, merged, sel = best["pair"], best["_layer"], best["_sel"]
            pair_orig = [prov[idx], prov[idx + 1]]
            replace_pair(a, idx, merged)
            prov = merge_provenance(prov, idx)
            stream.merged(idx)
            rec = {
                "merged_sha256": _hashes(merged),
                "step": step, "layers_before": L, "pair": [idx, idx + 1], "pair_original": pair_orig,
                "ratio": list(best["ratio"]), "kv_counts": best["kv_counts"], "mlp_counts": best["mlp_counts"],
                "kv_a": sel.kv_a, "kv_b": sel.kv_b, "q_heads_a": sel.q_heads_a, "q_heads_b": sel.q_heads_b,
                "mlp_a": sel.mlp_a, "mlp_b": sel.mlp_b,
                "bi_sum": bi, "pair_distance_sum": dist, "blocked": sorted(blocked),
                "att_scores": best["_scores"], "provenance": prov,
                "grid_losses": {c["r"]: c["loss"] for c in cands} if split == "grid" else None,
                "candidates": [{k: v for k, v in c.items() if not k.startswith("_") and k != "ratio"}
                               for c in cands] if len(cands) > 1 else None,
                "refit": best.get("refit"),
            }
            if beam > 1:
                rec["beam"] = {"parent_rank": rank, "loss": best["loss"]}
            rec["seconds"] = time.perf_counter() - t0
            if step + 1 < n_remove:
                t1 = time.perf_counter()
                stream.run(idx)  # layers below idx saw unchanged inputs: their scores stand
                rec["seconds"] += time.perf_counter() - t1
            new_paths.append(_Path(list(a.layers), prov, path.steps + [rec], stream))
        paths = new_paths
        activate(paths[0])  # the best path: what compress would return at this size
        prov, steps, stream = paths[0].prov, paths[0].steps, paths[0].stream
        if ctx.on_step:
            ctx.on_step(prov, steps)
        if ctx.progress:
            ctx.progress("merges", step + 1, n_remove)
    settings = {"faithful": faithful, "allow_repeat": allow_repeat, "grouping": grouping,
                "last_boundary": "final_norm" if last_normed else "raw", "pair_tokens": pair_tokens,
                "norms": norms, "split": split, "split_grid": list(splits) if split == "search" else None,
                "grid_steps": grid_steps if split == "grid" else None, "pair_select": pair_select,
                "pair_candidates": k_pairs, "beam": beam, "mlp_select": mlp_select, "keep_last": keep_last,
                "refit_in_search": teacher is not None,
                "judged_on_rows": None if judge is None or judge.lm else judge.rows,
                "layers_run": stream.layers_run}
    return Outcome(provenance=prov, steps=steps, settings=settings)


_SPLIT = number(0, 1)
SPLIT_GRID = Validator(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_SPLIT(x) for x in v),
                       "a non-empty list of splits in [0, 1]")
_SHARE = number(0, 1, lo_open=True, hi_open=True)
KEEP_LAST = Validator(lambda v: non_negative_int(v) or _SHARE(v),
                      "a number of layers (an integer >= 0) or a share of the depth in (0, 1)")
_COMMON = {"last_boundary": one_of("final_norm", "raw"), "pair_tokens": one_of("last", "all"),
           "norms": one_of("mean", "fold"), "pair_select": one_of("distance", "bi"),
           "pair_candidates": positive_int, "score_rows": positive_int, "search_refit": boolean,
           "search_solve": one_of("all", "fit"), "beam": positive_int, "keep_last": KEEP_LAST, "mlp_select": one_of(*MLP_SELECTS)}


@register("come", options={**_COMMON, "split": one_of("search", "bi"), "split_grid": SPLIT_GRID})
def come(ctx: Context, n_remove: int) -> Outcome:
    return _come(ctx, n_remove, "come")


@register("come-p", options={**_COMMON, "grid_steps": positive_int})
def come_p(ctx: Context, n_remove: int) -> Outcome:
    return _come(ctx, n_remove, "come-p")
