"""Magnitude+ (Shortened LLaMA, arXiv 2402.02834): a layer's importance is
sum |W| over its weight matrices; the n least important layers are deleted,
never the first 4 or the last 2 (options ``keep_first``, ``keep_last``).
Needs no calibration data."""
from __future__ import annotations

from .. import layerops as ops
from . import Context, Outcome, non_negative_int, register
from .taylor import shortened_llama


@register("magnitude+", options={"keep_first": non_negative_int, "keep_last": non_negative_int})
def magnitude_plus(ctx: Context, n_remove: int) -> Outcome:
    t = ops.Timer()
    scores = ops.weight_scores(ctx.adapter, grads=False)
    return shortened_llama(ctx, n_remove, scores, "magnitude", {"seconds": t()})
