"""LLM-Streamline (arXiv 2403.19135): remove the most redundant contiguous
block of layers and put ONE trained layer in its place.

Block choice: for a block of b layers starting at j, the mean over
calibration tokens of cos(x_j, x_{j+b}) (hidden states at layer boundaries,
x_L after the final norm as in Hugging Face's ``hidden_states``); the block
with the highest mean is replaced. A block of b layers replaced by one layer
removes b - 1 layers' parameters, so b = n_remove + 1.

Replacement: a copy of the block's first layer, trained (come_fast.distill,
MSE) to map the block's input x_j to the block's output on the calibration
hidden states: ``streamline_steps`` (100) AdamW steps, lr ``streamline_lr``
(1e-4... the paper trains far longer on far more data), batches of
``streamline_batch`` (2) sequences. The paper also offers a plain FFN as the
replacement; here it is always a full decoder layer, so the result stays a
stock checkpoint.
"""
from __future__ import annotations

import copy

import torch

from .. import layerops as ops
from ..calibration import run_layers
from ..distill import LossWeights, distill, evaluate_loss, training_only
from . import Context, Outcome, learning_rate, non_negative_int, positive_int, register


def block_similarity(stream, b: int) -> list[float]:
    """Mean token cosine between x_j and x_{j+b}, for j = 0 .. L-b. A boundary
    the stream did not cache (``max_cache_bytes``) is recomputed from the
    nearest cached one below it."""
    L = len(stream.adapter.layers)
    return [ops.mean_token_cosine(stream.input_of(j), stream.input_of(j + b)) for j in range(L - b + 1)]


@register("streamline", options={"streamline_steps": non_negative_int, "streamline_lr": learning_rate,
                                "streamline_batch": positive_int})
def streamline(ctx: Context, n_remove: int) -> Outcome:
    t = ops.Timer()
    a = ctx.adapter
    o = ctx.options
    L = len(a.layers)
    b = n_remove + 1
    if b > L:
        raise ValueError(f"streamline: a block of {b} layers does not fit in {L}")
    stream = ops.open_stream(ctx)
    sims = block_similarity(stream, b)
    j = max(range(len(sims)), key=lambda k: (sims[k], -k))
    with torch.no_grad():
        x_in = stream.input_of(j).clone()
        y = stream.hidden_with(j, list(a.layers[j:j + b]), final_norm=False).clone()  # the block's output
    new = copy.deepcopy(a.layers[j])
    ops.keep_attention_kind(a, new, list(a.layers[j:j + b]))  # before training: it trains as what it will be
    pos = stream.position_ids

    def forward(idx):
        return {"hidden": run_layers(a, [new], x_in[idx], pos), "hidden_target": y[idx]}

    w = LossWeights(mse=1.0)
    bs = int(o.get("streamline_batch", 2))
    with training_only(new, new.parameters()):
        mse_before = evaluate_loss(forward, x_in.shape[0], w, bs)
        rep = distill(forward, list(new.parameters()), x_in.shape[0], steps=int(o.get("streamline_steps", 100)),
                      lr=float(o.get("streamline_lr", 1e-4)), batch_size=bs, weights=w, seed=int(o.get("seed", 0)),
                      progress=ctx.progress or False, label="replacement steps")
        mse_after = evaluate_loss(forward, x_in.shape[0], w, bs)
    ops.check_trained(new.parameters(), "streamline: the trained replacement layer",
                      f"lower streamline_lr (was {float(o.get('streamline_lr', 1e-4))})")
    prov = ops.fold_window(a, None, list(range(L)), j, b, layer=new)
    step = {"block": list(range(j, j + b)), "block_size": b, "similarity": sims, "mse_before": mse_before,
            "mse_after": mse_after, "train_seconds": rep.seconds, "seconds": t()}
    return Outcome(provenance=prov, steps=[step],
                   settings={"block_size": b, "init": "first layer of the block", "steps": rep.steps,
                             "weights": rep.weights, **rep.settings})
