"""Reverse order ("Reassessing Layer Pruning in LLMs", arXiv 2411.15558):
delete the last n decoder layers (the final norm and head stay).

Recovery (``recover=True``, default off): the paper's partial-layer
fine-tune, which trains only the last ``recover_layers`` (3) remaining layers,
the final norm and lm_head. Here it is a distillation on the calibration
batches (come_fast.distill): KL to the uncompressed model's next-token
distribution (``recover_kl``, 1.0) plus optional LM cross-entropy
(``recover_ce``, 0.0), ``recover_steps`` (100) AdamW steps at ``recover_lr``
(1e-4), batches of ``recover_batch`` (2) sequences. The paper fine-tunes with
the LM loss on an instruction dataset instead. The frozen layers below run
once: their output is cached and the trained part re-runs from it. With tied
embeddings (SmolLM2) training lm_head also changes the input embedding, as
one tensor; the cached inputs of the trained part were computed before, so
the training sees the head side only.
"""
from __future__ import annotations

import torch

from .. import layerops as ops
from ..calibration import run_layers
from ..distill import LossWeights, distill, evaluate_loss, training_only
from . import Context, Outcome, boolean, learning_rate, non_negative_int, number, positive_int, register


@register("reverse", options={"recover": boolean, "recover_layers": positive_int, "recover_steps": non_negative_int,
                             "recover_lr": learning_rate, "recover_kl": number(0), "recover_ce": number(0),
                             "recover_batch": positive_int})
def reverse(ctx: Context, n_remove: int) -> Outcome:
    t = ops.Timer()
    a = ctx.adapter
    o = ctx.options
    L = len(a.layers)
    recover = bool(o.get("recover", False))
    if recover and not (float(o.get("recover_kl", 1.0)) or float(o.get("recover_ce", 0.0))):
        raise ValueError("reverse: recover_kl and recover_ce are both 0: the recovery has no loss to train on")
    stream = teacher = None
    if recover:
        stream = ops.open_stream(ctx)
        with torch.no_grad():
            teacher = stream.output().clone()  # final normed hidden states of the uncompressed model
            w0 = a.lm_head.weight.detach().clone()
            b0 = None if getattr(a.lm_head, "bias", None) is None else a.lm_head.bias.detach().clone()
    drop = list(range(L - n_remove, L))
    prov = ops.delete(a, stream, list(range(L)), drop)
    steps = [{"removed": drop, "seconds": t()}]
    settings = {"recover": recover}
    if recover:
        steps.append(_recover(ctx, stream, teacher, w0, b0, settings))
    return Outcome(provenance=prov, steps=steps, settings=settings)


def _recover(ctx, stream, teacher, w0, b0, settings: dict) -> dict:
    t = ops.Timer()
    a = ctx.adapter
    o = ctx.options
    L = len(a.layers)
    k = min(int(o.get("recover_layers", 3)), L)
    start = L - k
    with torch.no_grad():
        x_in = stream.input_of(start).clone()  # frozen part, run once
    tokens = stream.tokens
    pos = stream.position_ids
    trained = list(a.layers[start:]) + [a.final_norm, a.lm_head]
    params = [p for m in trained for p in m.parameters()]

    fused = type(a.lm_head).forward is torch.nn.Linear.forward

    def forward(idx):
        x = run_layers(a, a.layers[start:], x_in[idx], pos)
        h = a.final_norm(x)[:, :-1]
        labels = tokens[idx, 1:].to(h.device)
        if fused:  # the chunked linear + KL (distill.fused_kl): neither model's [tokens, vocab] logits held whole
            return {"head_input": h, "head_weight": a.lm_head.weight, "head_bias": a.lm_head.bias,
                    "head_input_target": teacher[idx][:, :-1], "head_weight_target": w0, "head_bias_target": b0,
                    "labels": labels}
        with torch.no_grad():
            tl = torch.nn.functional.linear(teacher[idx], w0, b0)[:, :-1]
        return {"logits": a.lm_head(h), "logits_target": tl, "labels": labels}

    w = LossWeights(mse=0.0, kl=float(o.get("recover_kl", 1.0)), ce=float(o.get("recover_ce", 0.0)))
    bs = int(o.get("recover_batch", 2))
    n = x_in.shape[0]
    # the trained modules are the caller's objects (tied head: the embedding too): a failed
    # training puts their values back, so a failed compress leaves the model as it was given
    saved = [p.detach().clone() for p in params]
    try:
        with training_only(a.model, params):
            before = evaluate_loss(forward, n, w, bs)
            rep = distill(forward, params, n, steps=int(o.get("recover_steps", 100)),
                          lr=float(o.get("recover_lr", 1e-4)), batch_size=bs, weights=w, seed=int(o.get("seed", 0)),
                          progress=ctx.progress or False, label="recovery steps")
            after = evaluate_loss(forward, n, w, bs)
        ops.check_trained(params, "reverse: a recovered layer, the final norm or the output head",
                          f"lower recover_lr (was {float(o.get('recover_lr', 1e-4))})")
    except BaseException:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        raise
    settings.update({"recover_layers": k, "recover_steps": rep.steps, "recover_weights": rep.weights,
                     **{f"recover_{key}": v for key, v in rep.settings.items()}})
    return {"recovery": {"trained_layers": list(range(start, L)), "loss_before": before, "loss_after": after,
                         "loss_first_step": rep.loss_first, "loss_last_step": rep.loss_last, "seconds": t()}}
