"""LaCo, Layer Collapse (arXiv 2402.11187), with the merge rule as its paper
writes it (RDSC): layer l absorbs the m = C-1 layers after it,

    theta_l <- theta_l + sum_{k=1..m} (theta_{l+k} - theta_l)

on the attention and MLP parameters (come_fast.merge.rdsc_merge); the merged
model is kept if the cosine similarity of its final hidden states with the
ORIGINAL model's, per sentence on the flattened [T*d] states and averaged over
a few sentences, exceeds T; then l steps down by I, else by 1. The scan starts
at l = H - C and stops below L_low.

Options (paper's notation; defaults from the paper's Llama setting):
``laco_layers`` C = 4, ``laco_interval`` I = 2, ``laco_threshold`` T = 0.65,
``laco_lowest`` L = 0, ``laco_highest`` H = number of layers - 1,
``laco_sentences`` = 5 (the first calibration rows stand in for the paper's
few Wikipedia sentences).

Deviations, to hit a requested size: a merge absorbs at most the layers still
to be removed; once n layers are gone the scan stops; if a scan ends short,
the threshold is lowered by ``laco_relax`` (0.05) and the scan restarts from
the top of the current model (each pass is recorded). The public LaCo code
updates the base layer in place while adding differences, so its "merge"
equals keeping the window's last layer; that behaviour is not offered.
"""
from __future__ import annotations

from .. import layerops as ops
from . import Context, Outcome, integer, non_negative_int, number, positive_int, register


def similarity_stream(ctx: Context, key: str):
    rows = int(ctx.options.get(key, 5))
    stream = ops.open_stream(ctx, tokens=ops.calibration_slice(ctx, rows))
    ref = stream.output().clone()
    return stream, ref


def candidate_similarity(a, stream, ref, start: int, count: int):
    cand = ops.rdsc_candidate(a, start, count)
    out = stream.hidden_with(start, [cand] + list(a.layers[start + count:]))
    return ops.sequence_cosine(ref, out), cand


@register("laco", options={"laco_layers": integer(2), "laco_interval": positive_int, "laco_threshold": number(),
                          "laco_relax": number(0, lo_open=True), "laco_lowest": non_negative_int,
                          "laco_highest": non_negative_int, "laco_sentences": positive_int})
def laco(ctx: Context, n_remove: int) -> Outcome:
    a = ctx.adapter
    o = ctx.options
    C = int(o.get("laco_layers", 4))
    I = int(o.get("laco_interval", 2))
    T = float(o.get("laco_threshold", 0.65))
    relax = float(o.get("laco_relax", 0.05))
    low = int(o.get("laco_lowest", 0))
    if C < 2:
        raise ValueError("laco_layers (C) must be at least 2")
    stream, ref = similarity_stream(ctx, "laco_sentences")
    prov = list(range(len(a.layers)))
    steps, removed, passes = [], 0, 0
    while removed < n_remove:
        if passes and T - relax <= -1:
            raise ValueError(f"laco: cannot reach {n_remove} removals")
        if passes:
            T -= relax
        passes += 1
        high = int(o.get("laco_highest", len(a.layers) - 1))
        high = min(high, len(a.layers) - 1)
        l = high - C
        if l < low:  # no window fits: a lower threshold would not change that
            raise ValueError(f"laco: cannot reach {n_remove} removals: {removed} done, and no window of "
                             f"laco_layers={C} layers has its base in [laco_lowest={low}, {high} - {C}] "
                             f"of the {len(a.layers)}-layer model (the top layer is never absorbed)")
        while l >= low and removed < n_remove:
            t = ops.Timer()
            m = min(C - 1, n_remove - removed, len(a.layers) - 1 - l)
            if m < 1:
                l -= 1
                continue
            sim, cand = candidate_similarity(a, stream, ref, l, m + 1)
            ok = sim > T
            rec = {"pass": passes, "threshold": T, "base": l, "absorbed": list(range(l + 1, l + m + 1)),
                   "absorbed_original": prov[l:l + m + 1], "similarity": sim, "accepted": ok}
            if ok:
                prov = ops.fold_window(a, stream, prov, l, m + 1, layer=cand)
                removed += m
                l -= I
                if l >= len(a.layers):
                    l = len(a.layers) - 1 - C
            else:
                l -= 1
            rec["seconds"] = t()
            steps.append(rec)
            ops.tick(ctx, "layers removed", removed, n_remove)
    return Outcome(provenance=prov, steps=steps,
                   settings={"C": C, "I": I, "threshold_start": float(o.get("laco_threshold", 0.65)),
                             "threshold_final": T, "passes": passes, "lowest": low,
                             "sentences": stream.n, "merge": "rdsc (paper)", "layers_run": stream.layers_run})
