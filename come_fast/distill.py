"""A small shared trainer: distillation of a part of a model on fixed tensors.

``distill(forward, params, n, ...)`` runs AdamW for ``steps`` steps; each step
draws ``batch_size`` of the ``n`` examples (seeded), calls ``forward(idx)`` and
minimises

    mse * MSE(hidden, hidden_target) + kl * T^2 KL(softmax(logits_target / T) || softmax(logits / T))
    + ce * CE(logits, labels)

over whichever of those keys ``forward`` returns (weights are explicit; a term
whose weight is 0 is not computed). Instead of ``logits``, ``forward`` may
return the head's input and the head (``head_input``, ``head_weight``,
``head_bias``) and the teacher as ``logits_target`` or as its own head input
and head (``head_input_target``, ``head_weight_target``, ``head_bias_target``):
then the KL term is the fused chunked linear + KL op
(``come_fast.dispatch.Ops.linear_kl``: the same value and gradients, without
ever holding the [tokens, vocab] logits of either model). It knows nothing
about layers: the caller decides what is trained (``params``) and what the student and teacher are.
Used by Reverse's recovery fine-tune and LLM-Streamline's replacement layer;
CoMe's hierarchical distillation can build on it (one call per layer group).

CPU budget: meant for tens to a few hundred steps on small batches.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .dispatch import Ops


@contextmanager
def training_only(model: torch.nn.Module, params: Iterable[torch.nn.Parameter]):
    """Within the block only ``params`` of ``model`` take gradients; the
    previous flags come back afterwards, also on error."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


@dataclass
class LossWeights:
    mse: float = 1.0
    kl: float = 0.0
    ce: float = 0.0
    temperature: float = 1.0


@dataclass
class DistillReport:
    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    history: list = field(default_factory=list)  # loss per step
    weights: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


def fused_kl(out: dict, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student), mean over tokens, from the head input and head
    (``head_input``/``head_weight``/``head_bias``) and the teacher's ``logits_target``
    or ``head_input_target``/``head_weight_target``/``head_bias_target``: the chunked
    linear + KL op of the tensors' device (Triton on CUDA, PyTorch otherwise)."""
    h = out["head_input"]
    if "logits_target" in out:
        teacher = {"teacher_logits": out["logits_target"]}
    else:
        teacher = {"teacher_hidden": out["head_input_target"], "teacher_weight": out["head_weight_target"],
                   "teacher_bias": out.get("head_bias_target")}
    return Ops("auto", h.device).linear_kl(h, out["head_weight"], out.get("head_bias"), temperature=temperature,
                                           **teacher)


def loss_terms(out: dict, w: LossWeights) -> dict:
    """The weighted terms of one batch (only those with a weight and their inputs present)."""
    terms = {}
    if w.mse and "hidden" in out:
        terms["mse"] = w.mse * F.mse_loss(out["hidden"].float(), out["hidden_target"].float())
    if w.kl and "head_input" in out and "logits" not in out:
        terms["kl"] = w.kl * fused_kl(out, w.temperature)
    if w.ce and "head_input" in out and "logits" not in out:  # cross-entropy still needs the logits
        out = {**out, "logits": F.linear(out["head_input"], out["head_weight"], out.get("head_bias"))}
    if (w.kl or w.ce) and "logits" in out:
        logits = out["logits"].float()
        logits = logits.reshape(-1, logits.shape[-1])
        if w.kl and "kl" not in terms:
            T = w.temperature
            tgt = out["logits_target"].float().reshape(-1, logits.shape[-1])
            terms["kl"] = w.kl * T * T * F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(tgt / T, -1),
                                                  log_target=True, reduction="batchmean")
        if w.ce:
            terms["ce"] = w.ce * F.cross_entropy(logits, out["labels"].reshape(-1))
    if not terms:
        raise ValueError("distill: no loss term has both a non-zero weight and its tensors in forward()'s output")
    return terms


def distill(forward: Callable[[torch.Tensor], dict], params: Iterable[torch.nn.Parameter], n: int, *,
            steps: int = 100, lr: float = 1e-4, weight_decay: float = 0.0, batch_size: int = 2,
            weights: Optional[LossWeights] = None, schedule: str = "cosine", warmup: int = 0,
            grad_clip: Optional[float] = 1.0, seed: int = 0, progress: bool | Callable = False,
            label: str = "distill") -> DistillReport:
    """Train ``params`` for ``steps`` AdamW steps on batches of the ``n`` examples.

    ``forward(idx)`` (idx: LongTensor of example indices) returns a dict with
    some of ``hidden``/``hidden_target``, ``logits``/``logits_target`` (or the
    ``head_*`` keys of the fused KL, see the module docstring), ``labels``;
    targets must not require grad. ``schedule``: "cosine" (to 0)
    or "constant", after ``warmup`` linear steps. ``progress``: True for a
    tqdm bar, or a callable ``(label, done, total)``.
    """
    w = weights or LossWeights()
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("distill: nothing to train (no parameter requires grad)")
    if n < 1 or steps < 0 or batch_size < 1:
        raise ValueError(f"distill: need n >= 1, steps >= 0, batch_size >= 1 (got {n}, {steps}, {batch_size})")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if warmup and step < warmup:
            return lr * (step + 1) / warmup
        if schedule == "constant":
            return lr
        t = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    g = torch.Generator().manual_seed(seed)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=label, leave=False)
    history = []
    t0 = time.perf_counter()
    perm = torch.randperm(n, generator=g)
    pos = 0
    with torch.enable_grad():
        for step in range(steps):
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos:pos + batch_size] if batch_size <= n else torch.randint(0, n, (batch_size,), generator=g)
            pos += batch_size
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            terms = loss_terms(forward(idx), w)
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            history.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.4g}")
            elif callable(progress):
                progress(label, step + 1, steps)
    if bar is not None:
        bar.close()
    opt.zero_grad(set_to_none=True)
    return DistillReport(steps=steps, seconds=time.perf_counter() - t0,
                         loss_first=history[0] if history else float("nan"),
                         loss_last=history[-1] if history else float("nan"), history=history,
                         weights=asdict(w), settings={"lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                                                      "schedule": schedule, "warmup": warmup, "grad_clip": grad_clip,
                                                      "seed": seed})


@torch.no_grad()
def evaluate_loss(forward: Callable[[torch.Tensor], dict], n: int, weights: Optional[LossWeights] = None,
                  batch_size: int = 2) -> float:
    """The weighted loss over all ``n`` examples (mean of per-batch losses, weighted by batch size)."""
    w = weights or LossWeights()
    total = 0.0
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(i + batch_size, n))
        total += float(sum(loss_terms(forward(idx), w).values())) * len(idx)
    return total / n
