"""PPL criterion of Shortened LLaMA (arXiv 2402.02834): the calibration
perplexity of the model with each single layer removed, measured once; the n
layers whose removal hurts least are deleted together.

Each candidate re-runs only the layers above it from the stream's cached
boundary. Option ``score_rows``: score on the first rows of the calibration
only (cost is one forward above each layer per candidate).
"""
from __future__ import annotations

import math

from .. import layerops as ops
from . import Context, Outcome, positive_int, register


@register("ppl", options={"score_rows": positive_int})
def ppl(ctx: Context, n_remove: int) -> Outcome:
    t = ops.Timer()
    a = ctx.adapter
    stream = ops.open_stream(ctx, tokens=ops.calibration_slice(ctx))
    losses = ops.skip_losses(stream, ctx=ctx)
    L = len(a.layers)
    scores = [losses[l] for l in range(L)]
    drop = ops.lowest(scores, n_remove)
    prov = ops.delete(a, None, list(range(L)), drop)
    step = {"removed": drop, "loss_without": scores, "ppl_without": [math.exp(s) for s in scores], "seconds": t()}
    return Outcome(provenance=prov, steps=[step],
                   settings={"score": "calibration_ppl_without_layer", "score_rows": stream.n,
                             "layers_run": stream.layers_run})
