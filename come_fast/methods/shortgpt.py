"""ShortGPT (arXiv 2403.03853): delete the n layers with the lowest Block
Influence BI_l = mean over tokens of 1 - cos(x_l, x_l+1), scored once.

As in the stream (and Hugging Face's ``hidden_states``), x_L is taken after the
final norm, and cosines are clamped to [0, 1] (the paper's BI is 1 - cos).
"""
from __future__ import annotations

from .. import layerops as ops
from . import Context, Outcome, register


@register("shortgpt")
def shortgpt(ctx: Context, n_remove: int) -> Outcome:
    t = ops.Timer()
    a = ctx.adapter
    stream = ops.open_stream(ctx, collect=True)
    bi = ops.block_influence(stream)
    drop = ops.lowest(bi, n_remove)
    prov = ops.delete(a, None, list(range(len(bi))), drop)
    step = {"removed": drop, "block_influence": bi, "seconds": t()}
    return Outcome(provenance=prov, steps=[step], settings={"score": "block_influence", "layers_run": stream.layers_run})
