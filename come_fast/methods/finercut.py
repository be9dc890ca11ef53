"""FinerCut (arXiv 2405.18218): greedy removal of attention and MLP
sublayers, each judged separately.

Every step scores each remaining sublayer by the divergence of the model's
next-token distribution without it from the ORIGINAL model's: the
Jensen-Shannon divergence per calibration token, averaged (the paper's
default metric); the sublayer with the smallest divergence is removed, then
all are re-scored. The target is a parameter count, met with sublayers of
unequal sizes (an attention sublayer is about a quarter of a layer in Llama
shapes): ``ratio`` x all parameters when a ratio was asked, else n_remove
layers' worth. ``rounding`` (from compress): "nearest" only considers
sublayers whose removal brings the count closer to the target, "down" only
those that keep it at or under, "up" removes until the target is reached.

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
from . import Context, Outcome, register


def _candidates(layers, removed_so_far: int, target: int, rounding: str):
    out = []
    for l, layer in enumerate(layers):
        for kind in sublayers.KINDS:
            if sublayers.is_removed(layer, kind):
                continue
            size = ops.sublayer_parameters(layer, kind)
            after = removed_so_far + size
            if rounding == "down" and after > target:
                continue
            if rounding == "nearest" and abs(after - target) >= abs(removed_so_far - target):
                continue
            if rounding == "up" and removed_so_far >= target:
                continue
            out.append((l, kind, size))
    return out


@register("finercut")
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
    while True:
        t = ops.Timer()
        cands = _candidates(layers, removed, target, rounding)
        if not cands:
            break
        scores = {}
        for k, (l, kind, size) in enumerate(cands):
            with ops.without_sublayer(layers[l], kind):
                h = stream.hidden_with(l, list(layers[l:]))
            scores[(l, kind)] = ops.output_divergence(stream, ref, h)
            ops.tick(ctx, "sublayers scored", k + 1, len(cands))
        (l, kind) = min(scores, key=lambda key: (scores[key], key))
        size = ops.sublayer_parameters(layers[l], kind)
        sublayers.remove_sublayer(layers[l], kind, l)
        removed += size
        stream.spliced(l, 1, 1)
        stream.run(l, collect=False)
        steps.append({"step": len(steps), "removed": [l, kind], "divergence": scores[(l, kind)],
                      "parameters": size, "removed_total": removed,
                      "scores": [[k[0], k[1], v] for k, v in sorted(scores.items())], "seconds": t()})
        ops.tick(ctx, "parameters removed (k)", min(removed, target) // 1000, target // 1000)
    spec = sublayers.spec_of(layers) or {"attention": [], "mlp": []}
    empty = sorted(set(spec["attention"]) & set(spec["mlp"]))
    prov = ops.delete(a, None, list(range(len(layers))), empty)
    final = sublayers.spec_of(a.layers) or {"attention": [], "mlp": []}
    return Outcome(provenance=prov, steps=steps,
                   settings={"metric": "js_divergence", "target_parameters": target, "rounding": rounding,
                             "removed_parameters": before - count_parameters(a.model),
                             "removed_sublayers_original": {k: [v for v in spec[k]] for k in sublayers.KINDS},
                             "deleted_layers": empty, "sublayers": final, "score_rows": stream.n,
                             "layers_run": stream.layers_run})
