"""SLEB (arXiv 2402.09025): greedy. Score every remaining layer by the
calibration LM loss of the model without it, delete the one whose removal
hurts least, re-score the rest, repeat n times.

The stream keeps the hidden states at layer boundaries: a candidate re-runs
only the layers above it, and after a deletion at l only boundaries above l are
recomputed. Option ``score_rows``: score on the first calibration rows only.
"""
from __future__ import annotations

from .. import layerops as ops
from . import Context, Outcome, positive_int, register


@register("sleb", options={"score_rows": positive_int})
def sleb(ctx: Context, n_remove: int) -> Outcome:
    a = ctx.adapter
    stream = ops.open_stream(ctx, tokens=ops.calibration_slice(ctx))
    prov = list(range(len(a.layers)))
    steps = []
    for step in range(n_remove):
        t = ops.Timer()
        losses = ops.skip_losses(stream, ctx=ctx)
        l = min(losses, key=lambda k: (losses[k], k))
        orig = prov[l]
        prov = ops.delete(a, stream, prov, [l])
        steps.append({"step": step, "removed": l, "removed_original": orig,
                      "loss_without": [losses[k] for k in sorted(losses)], "seconds": t()})
        if ctx.on_step:
            ctx.on_step(prov, steps)  # the model now is exactly SLEB's result for step + 1 removals
        if step + 1 < n_remove:
            t1 = ops.Timer()
            stream.run(l, collect=False)  # refresh the boundaries above the deleted layer
            steps[-1]["seconds"] += t1()
        ops.tick(ctx, "removals", step + 1, n_remove)
    return Outcome(provenance=prov, steps=steps,
                   settings={"score": "calibration_loss_without_layer", "greedy": True, "score_rows": stream.n,
                             "layers_run": stream.layers_run})
