"""Sliding layer merging (SLM, arXiv 2502.19159).

From the top of the model down: a window starts at the highest layer not yet
visited and grows one layer downward at a time while the model with the
window merged into its lowest layer (LaCo's RDSC rule,
come_fast.merge.rdsc_merge) keeps the similarity of its final hidden states
with the original model's (LaCo's test: per-sentence cosine of the flattened
final hidden states, averaged) at or above ``slm_threshold`` (0.72); the last
window that passed is merged, and the next window starts just below it. A
window that cannot grow leaves its layer as is.

Options: ``slm_threshold`` (0.72), ``slm_sentences`` (5 calibration rows),
``slm_lowest`` (0: lowest layer a window may reach). Deviations, to hit a
requested size: a window never absorbs more than the layers still to be
removed; if the scan reaches the bottom short of the target, the threshold is
lowered by ``slm_relax`` (0.05) and the scan restarts from the top.
"""
from __future__ import annotations

from .. import layerops as ops
from . import Context, Outcome, non_negative_int, number, positive_int, register
from .laco import candidate_similarity, similarity_stream


@register("slm", options={"slm_threshold": number(), "slm_relax": number(0, lo_open=True),
                         "slm_lowest": non_negative_int, "slm_sentences": positive_int})
def slm(ctx: Context, n_remove: int) -> Outcome:
    a = ctx.adapter
    o = ctx.options
    T = float(o.get("slm_threshold", 0.72))
    relax = float(o.get("slm_relax", 0.05))
    lowest = int(o.get("slm_lowest", 0))
    stream, ref = similarity_stream(ctx, "slm_sentences")
    prov = list(range(len(a.layers)))
    steps, removed, passes = [], 0, 0
    while removed < n_remove:
        if passes:
            T -= relax
            if T <= -1:
                raise ValueError(f"slm: cannot reach {n_remove} removals")
        passes += 1
        top = len(a.layers) - 1
        if top <= lowest:  # no window fits: a lower threshold would not change that
            raise ValueError(f"slm: cannot reach {n_remove} removals: {removed} done, and no window of two "
                             f"layers fits above slm_lowest={lowest} in the {len(a.layers)}-layer model")
        while top > lowest and removed < n_remove:
            t = ops.Timer()
            best = None  # (low, sim, layer) of the largest window that passed
            low = top - 1
            tried = []
            while low >= lowest and top - low <= n_remove - removed:
                sim, cand = candidate_similarity(a, stream, ref, low, top - low + 1)
                tried.append({"window": [low, top], "similarity": sim})
                if sim < T:
                    break
                best = (low, sim, cand)
                low -= 1
            rec = {"pass": passes, "threshold": T, "top": top, "tried": tried}
            if best is not None:
                b_low = best[0]
                rec.update({"merged": list(range(b_low, top + 1)), "merged_original": prov[b_low:top + 1],
                            "similarity": best[1]})
                prov = ops.fold_window(a, stream, prov, b_low, top - b_low + 1, layer=best[2])
                removed += top - b_low
                top = b_low - 1
            else:
                top -= 1
            rec["seconds"] = t()
            steps.append(rec)
            ops.tick(ctx, "layers removed", removed, n_remove)
    return Outcome(provenance=prov, steps=steps,
                   settings={"threshold_start": float(o.get("slm_threshold", 0.72)), "threshold_final": T,
                             "passes": passes, "sentences": stream.n, "merge": "rdsc (LaCo rule)",
                             "layers_run": stream.layers_run})
