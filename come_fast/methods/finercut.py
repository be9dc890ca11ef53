"""FinerCut (arXiv 2405.18218): greedy removal of attention and MLP
sublayers, each judged separately.

Every step scores each remaining sublayer by the divergence of the model's
next-token distribution without it from the ORIGINAL model's: the
Jensen-Shannon divergence per calibration token, averaged (the paper's
default metric); the sublayer with the smallest divergence is removed, then
all are re-scored. As in the paper the choice never depends on the target;
the target only decides when to stop. The paper counts sublayers; here the
target is a parameter count (sublayers differ in size: an attention sublayer
is about a quarter of a layer in Llama shapes): ``ratio`` x all parameters
when a ratio was asked, else n_remove layers' worth. ``rounding`` (from
compress) says when to stop: "nearest" (default) before a removal that would
not bring the count closer to the target, "down" before one that would pass
it, "up" once it is reached. So a run to a larger target passes exactly
through the result for every smaller one (``replay`` rebuilds those).

A layer that loses both sublayers is an identity and is deleted at the end.
The result's layers may miss a sublayer: see come_fast/sublayers.py for how
that is held in memory, saved and loaded. Option ``score_rows``: score on the
first calibration rows only (cost per step: one forward above each candidate
plus the output head).
"""
from __future__ import annotations

from .. import layerops as ops
from .. import sublayers
from ..adapters import count_parameters
from . import Context, Outcome, positive_int, register


def accept(removed: int, size: int, target: int, rounding: str) -> bool:
    """Whether the next removal (of ``size`` parameters) still serves the target."""
    if rounding == "nearest":
        return abs(removed + size - target) < abs(removed - target)
    if rounding == "down":
        return removed + size <= target
    if rounding == "up":
        return removed < target
    raise ValueError(f"rounding must be 'nearest', 'down' or 'up', not {rounding!r}")


def _finish(a, steps: list, target: int, rounding: str, before: int, extra: dict) -> Outcome:
    """Delete layers left empty; the outcome."""
    layers = a.layers
    spec = sublayers.spec_of(layers) or {"attention": [], "mlp": []}
    empty = sorted(set(spec["attention"]) & set(spec["mlp"]))
    prov = ops.delete(a, None, list(range(len(layers))), empty)
    final = sublayers.spec_of(a.layers) or {"attention": [], "mlp": []}
    return Outcome(provenance=prov, steps=steps,
                   settings={"metric": "js_divergence", "target_parameters": target, "rounding": rounding,
                             "removed_parameters": before - count_parameters(a.model),
                             "removed_sublayers_original": spec, "deleted_layers": empty, "sublayers": final,
                             **extra})


@register("finercut", options={"score_rows": positive_int})
def finercut(ctx: Context, n_remove: int) -> Outcome:
    a = ctx.adapter
    o = ctx.options
    rounding = o.get("rounding", "nearest")
    target = ops.parameter_target(ctx, n_remove)
    before = count_parameters(a.model)
    stream = ops.open_stream(ctx, tokens=ops.calibration_slice(ctx))
    ref = ops.output_logprobs(stream, stream.output())
    layers = a.layers
    steps, removed = [], 0
    while rounding != "up" or removed < target:
        t = ops.Timer()
        cands = [(l, kind) for l, layer in enumerate(layers) for kind in sublayers.KINDS
                 if not sublayers.is_removed(layer, kind)]
        if not cands:
            break
        scores = {}
        for k, (l, kind) in enumerate(cands):
            with ops.without_sublayer(layers[l], kind):
                h = stream.hidden_with(l, list(layers[l:]))
            scores[(l, kind)] = ops.output_divergence(stream, ref, h)
            ops.tick(ctx, "sublayers scored", k + 1, len(cands))
        (l, kind) = min(scores, key=lambda key: (scores[key], key))
        size = ops.sublayer_parameters(layers[l], kind)
        if not accept(removed, size, target, rounding):
            break
        sublayers.remove_sublayer(layers[l], kind, l)
        removed += size
        steps.append({"step": len(steps), "removed": [l, kind], "divergence": scores[(l, kind)],
                      "parameters": size, "removed_total": removed,
                      "scores": [[k[0], k[1], v] for k, v in sorted(scores.items())], "seconds": t()})
        if ctx.on_step:
            ctx.on_step(list(range(len(layers))), steps)
        stream.spliced(l, 1, 1)
        stream.run(l, collect=False)
        steps[-1]["seconds"] = t()
        ops.tick(ctx, "sublayers removed", len(steps), len(steps))
    return _finish(a, steps, target, rounding, before,
                   {"score_rows": stream.n, "layers_run": stream.layers_run})


def replay(model, report: list, target: int, rounding: str = "nearest") -> tuple[Outcome, int]:
    """The result of a FinerCut run to ``target`` rebuilt from the steps of a
    run to a larger target (same model, calibration and options): its choices
    are the same, only the stop comes earlier. ``model`` is changed in place;
    returns the outcome and the number of steps taken."""
    from ..adapters import adapter_for

    a = adapter_for(model)
    before = count_parameters(model)
    removed, k = 0, 0
    for st in report:
        if (rounding == "up" and removed >= target) or not accept(removed, st["parameters"], target, rounding):
            break
        l, kind = st["removed"]
        sublayers.remove_sublayer(a.layers[l], kind, l)
        removed += st["parameters"]
        k += 1
    # exact: a removal accepted for the smaller target is accepted for the larger one, so the
    # longer run stopped no earlier than this target's run would have
    return _finish(a, list(report[:k]), target, rounding, before, {"replayed_from_steps": len(report)}), k
