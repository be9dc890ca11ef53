"""Taylor+ (Shortened LLaMA, arXiv 2402.02834): a layer's importance is the
sum over its weight matrices of |W * dL/dW| (first-order Taylor estimate of
the loss change when the weights are zeroed), with dL/dW the gradient of the
calibration LM loss; the n least important layers are deleted at once. "+":
the first 4 and the last 2 layers are never deleted (options ``keep_first``,
``keep_last``). Option ``score_rows``: gradients on the first calibration rows.
"""
from __future__ import annotations

from .. import layerops as ops
from . import Context, Outcome, non_negative_int, positive_int, register


def protected(ctx: Context, n_remove: int) -> set[int]:
    """The layers ``keep_first`` and ``keep_last`` protect; refuses (before any
    scoring: Taylor's costs a backward pass) when too few are left to remove."""
    L = len(ctx.adapter.layers)
    keep = ops.protected_layers(L, int(ctx.options.get("keep_first", 4)), int(ctx.options.get("keep_last", 2)))
    if n_remove > L - len(keep):
        raise ValueError(f"asked to remove {n_remove} layers but only {L - len(keep)} may be removed "
                         f"({len(keep)} of {L} are protected by keep_first={int(ctx.options.get('keep_first', 4))}, "
                         f"keep_last={int(ctx.options.get('keep_last', 2))})")
    return keep


def shortened_llama(ctx: Context, n_remove: int, scores: list[float], name: str, extra: dict) -> Outcome:
    a = ctx.adapter
    L = len(a.layers)
    keep = protected(ctx, n_remove)
    drop = ops.lowest(scores, n_remove, exclude=keep)
    prov = ops.delete(a, None, list(range(L)), drop)
    step = {"removed": drop, "scores": scores, "protected": sorted(keep), **extra}
    return Outcome(provenance=prov, steps=[step],
                   settings={"score": name, "keep_first": int(ctx.options.get("keep_first", 4)),
                             "keep_last": int(ctx.options.get("keep_last", 2))})


@register("taylor+", options={"keep_first": non_negative_int, "keep_last": non_negative_int,
                               "score_rows": positive_int})
def taylor_plus(ctx: Context, n_remove: int) -> Outcome:
    t = ops.Timer()
    protected(ctx, n_remove)
    tokens = ops.calibration_slice(ctx)
    model = ctx.adapter.model
    # the gradients need every weight to require them: the caller's flags (a model
    # frozen for inference) come back afterwards, also when scoring fails
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        loss = ops.accumulate_lm_grads(ctx, tokens)
        scores = ops.weight_scores(ctx.adapter, grads=True)
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in flags:
            p.requires_grad_(f)
    return shortened_llama(ctx, n_remove, scores, "taylor", {"calibration_loss": loss, "score_rows": tokens.shape[0],
                                                            "seconds": t()})
