"""Hierarchical distillation along the layer provenance (CoMe's post-training).

The student is the compressed model, the teacher the original. Student layer
k came from the original layers in its provenance (``[2, 3]``, ``[[5, 6], 7]``,
or one number for a layer kept as is); its output is matched to the teacher's
hidden state after the LAST of those original layers, and the final next-token
distributions are matched with a KL loss (the paper's single-process schedule,
one joint run):

    loss = mse * mean_k ||h_k - t_k||^2 / ||t_k||^2  +  kl * KL(p_teacher || p_student)

Each layer's term is divided by the teacher target's mean square: hidden
states grow with depth (and carry a few huge activations), and without the
scale the deepest layers alone would set the gradient. Only the decoder layers
train; embeddings, final norm and head stay as they are (tied in SmolLM2), so
the result is the same plain checkpoint. The teacher runs once over the
calibration rows: its targets are cached, its head reapplied per batch, chunk
by chunk inside the fused linear + KL loss (``come_fast.linear_kl``), which
never holds either model's [tokens, vocab] logits whole.

This works after any whole-layer method (each keeps a provenance); CoMe is
the one whose paper prescribes it. Training data: the calibration rows.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .adapters import Adapter
from .calibration import run_layers
from .distill import LossWeights, distill, evaluate_loss, training_only


def last_original(item) -> int:
    """The deepest original layer in a provenance entry."""
    if isinstance(item, (list, tuple)):
        return max(last_original(x) for x in item)
    return int(item)


def _run_layers(a: Adapter, x: torch.Tensor, pos: torch.Tensor, keep: Optional[set] = None):
    """The outputs of the layers in ``keep`` (all when None), in layer order, and the last output."""
    outs = []
    last = run_layers(a, a.layers, x, pos, on_output=lambda i, h: outs.append(h) if keep is None or i in keep else None)
    return outs, last


@torch.no_grad()
def teacher_targets(teacher: Adapter, tokens: torch.Tensor, provenance: list, batch_size: int = 2):
    """The teacher's hidden state after the last original layer of each student
    layer ([n, T, d] per student layer), and its final-normed last hidden state."""
    want = [last_original(p) for p in provenance]
    L = len(teacher.layers)
    if max(want) >= L:
        raise ValueError(f"provenance names original layer {max(want)} but the teacher has {L} layers")
    device = next(teacher.model.parameters()).device
    pos = torch.arange(tokens.shape[1], device=device)[None]
    keep = sorted(set(want))
    at = {j: i for i, j in enumerate(keep)}
    per_layer = [[] for _ in keep]
    final = []
    for i in range(0, tokens.shape[0], batch_size):
        x = teacher.embed(tokens[i:i + batch_size].to(device))
        outs, last = _run_layers(teacher, x, pos, set(keep))
        for j, o in enumerate(outs):
            per_layer[j].append(o)
        final.append(teacher.final_norm(last))
    cat = [torch.cat(t) for t in per_layer]
    return [cat[at[j]] for j in want], torch.cat(final)


def hierarchical_distill(student: Adapter, teacher: Adapter, tokens: torch.Tensor, provenance: list, *,
                         steps: int = 100, lr: float = 1e-4, mse: float = 1.0, kl: float = 1.0,
                         batch_size: int = 2, seed: int = 0, progress=False) -> dict:
    """Train the student's decoder layers in place; returns a report (losses
    before and after on all calibration rows, seconds, settings)."""
    t0 = time.perf_counter()
    if len(provenance) != len(student.layers):
        raise ValueError(f"provenance has {len(provenance)} entries for {len(student.layers)} student layers")
    if steps < 1:
        raise ValueError(f"distill_steps must be at least 1, got {steps}")
    targets, t_final = teacher_targets(teacher, tokens, provenance, batch_size)
    scale = [float(t.float().pow(2).mean().sqrt()) for t in targets]
    device = next(student.model.parameters()).device
    pos = torch.arange(tokens.shape[1], device=device)[None]
    w_head, b_head = teacher.lm_head.weight, getattr(teacher.lm_head, "bias", None)

    model = student.model
    params = [p for layer in student.layers for p in layer.parameters()]

    def forward(idx):
        x = student.embed(tokens[idx].to(device))
        outs, last = _run_layers(student, x, pos)
        out = {"hidden": torch.cat([o / s for o, s in zip(outs, scale)], -1),
               "hidden_target": torch.cat([targets[k][idx] / s for k, s in enumerate(scale)], -1)}
        if kl:
            head, h_last = student.lm_head, student.final_norm(last)
            if type(head).forward is torch.nn.Linear.forward:
                # the fused chunked linear + KL (distill.fused_kl): neither model's
                # [tokens, vocab] logits are ever held whole
                out.update(head_input=h_last, head_weight=head.weight, head_bias=head.bias,
                           head_input_target=t_final[idx], head_weight_target=w_head, head_bias_target=b_head)
            else:
                out["logits"] = head(h_last)
                with torch.no_grad():
                    out["logits_target"] = torch.nn.functional.linear(t_final[idx], w_head, b_head)
        return out

    # the mean over the concatenation is the mean of the per-layer scaled MSEs (same width each)
    weights = LossWeights(mse=mse, kl=kl, ce=0.0)
    n = tokens.shape[0]
    try:
        with training_only(model, params):
            before = evaluate_loss(forward, n, weights, batch_size)
            rep = distill(forward, params, n, steps=steps, lr=lr, batch_size=batch_size, weights=weights, seed=seed,
                          progress=progress, label="distillation steps")
            after = evaluate_loss(forward, n, weights, batch_size)
    finally:
        model.eval()
    return {"loss_before": before, "loss_after": after, "loss_first_step": rep.loss_first,
            "loss_last_step": rep.loss_last, "steps": steps, "seconds": time.perf_counter() - t0,
            "matched_teacher_layers": [last_original(p) for p in provenance],
            "settings": {**rep.settings, "weights": rep.weights, "rows": n, "seq_len": int(tokens.shape[1])}}
