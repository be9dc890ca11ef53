"""What the depth-pruning baselines share: streams over (a slice of) the
calibration batches, the per-layer scores they rank by, "the model with this
layer skipped / these layers replaced" evaluated from the stream's cached
boundaries, and deletion or window merges with their provenance.

Every method in come_fast/methods/ scores and edits through these helpers
(and the stream, scoring and merge modules under them); the only forwards a
method writes itself are the training closures it hands to come_fast.distill.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import (Adapter, combined_attention_kind, count_parameters, layer_parameters,
                       set_attention_kind)
from .calibration import LayerStream
from .merge import delete_provenance, rdsc_merge, remove_layers, replace_window, window_provenance
from . import sublayers


# -- streams ----------------------------------------------------------------------------

def calibration_slice(ctx, rows: Optional[int] = None) -> torch.Tensor:
    """The first ``rows`` calibration sequences (option ``score_rows`` when
    ``rows`` is None; all when neither is set). Methods that re-run the model
    once per candidate use it to bound their cost."""
    rows = rows if rows is not None else ctx.options.get("score_rows")
    t = ctx.tokens
    if rows is None:
        return t
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"score_rows must be a positive integer (calibration rows), got {rows!r}")
    return t[:rows]


def open_stream(ctx, tokens: Optional[torch.Tensor] = None, collect: bool = False,
                final_norm_last: bool = True) -> LayerStream:
    """A stream over ``tokens`` (default: all calibration), already run once."""
    a = ctx.adapter

    def progress(l):
        if ctx.progress:
            ctx.progress("layers scored", l + 1, len(a.layers))

    s = LayerStream(a, ctx.tokens if tokens is None else tokens, ctx.batch_size, ctx.ops,
                    final_norm_last=final_norm_last, progress=progress,
                    max_cache_bytes=ctx.options.get("max_cache_bytes"))
    s.run(0, collect=collect)
    return s


def tick(ctx, label: str, done: int, total: int) -> None:
    if ctx.progress:
        ctx.progress(label, done, total)


# -- scores -----------------------------------------------------------------------------

def block_influence(stream: LayerStream) -> list[float]:
    """ShortGPT's BI_l = mean over tokens of 1 - cos(x_l, x_l+1) (from the stream's running sums)."""
    return [st.bi_sum / st.n_tokens for st in stream.stats]


def lowest(scores, n: int, exclude: Iterable[int] = ()) -> list[int]:
    """Indices of the n lowest scores outside ``exclude``, ascending; ties go
    to the lower index."""
    ex = set(exclude)
    cand = sorted((s, i) for i, s in enumerate(scores) if i not in ex)
    if n > len(cand):
        raise ValueError(f"asked to remove {n} layers but only {len(cand)} may be removed "
                         f"({len(ex)} are protected)")
    return sorted(i for _, i in cand[:n])


def protected_layers(L: int, first: int, last: int) -> set[int]:
    return set(range(min(first, L))) | set(range(max(0, L - last), L))


def skip_losses(stream: LayerStream, candidates: Optional[Iterable[int]] = None, ctx=None,
                label: str = "candidates") -> dict[int, float]:
    """Calibration LM loss with each candidate layer skipped (the model
    itself untouched). Each candidate re-runs only the layers above it."""
    layers = list(stream.adapter.layers)
    cands = list(range(len(layers))) if candidates is None else list(candidates)
    out = {}
    for k, l in enumerate(cands):
        out[l] = stream.loss_with(l, layers[l + 1:])
        if ctx is not None:
            tick(ctx, label, k + 1, len(cands))
    return out


def weight_scores(adapter: Adapter, grads: bool) -> list[float]:
    """Shortened LLaMA's block scores over each layer's weight matrices (the
    q/k/v/o and gate/up/down projections; norms and biases left out):
    sum |W * dL/dW| (``grads``: Taylor, needs .grad filled) or sum |W| (Magnitude)."""
    out = []
    for layer in adapter.layers:
        total = 0.0
        for name, p in layer.named_parameters():
            if p.dim() < 2:
                continue
            if grads:
                if p.grad is None:
                    raise ValueError(f"no gradient for {name}: run the calibration loss backward first")
                total += float((p.detach().double() * p.grad.double()).abs().sum())
            else:
                total += float(p.detach().double().abs().sum())
        out.append(total)
    return out


def accumulate_lm_grads(ctx, tokens: torch.Tensor) -> float:
    """Gradients of the mean next-token loss over ``tokens`` (all positions of
    all rows, as ``model(ids, labels=ids).loss``), accumulated batch by batch
    into the parameters' ``.grad``. Returns the loss."""
    model = ctx.adapter.model
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    n, T = tokens.shape
    count = n * (T - 1)
    total = 0.0
    dev = next(model.parameters()).device
    with torch.enable_grad():
        for i in range(0, n, ctx.batch_size):
            ids = tokens[i:i + ctx.batch_size].to(dev)
            logits = model(ids).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum") / count
            loss.backward()
            total += float(loss.detach())
            tick(ctx, "gradient batches", i // ctx.batch_size + 1, math.ceil(n / ctx.batch_size))
    return total


def mean_token_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Plain cosine of matching token vectors, averaged over all tokens."""
    x = x.reshape(-1, x.shape[-1]).float()
    y = y.reshape(-1, y.shape[-1]).float()
    return float(F.cosine_similarity(x, y, dim=-1).mean())


def sequence_cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    """LaCo's similarity: per sequence, the cosine of the flattened [T*d]
    final hidden states; averaged over sequences."""
    r = ref.reshape(ref.shape[0], -1).float()
    o = out.reshape(out.shape[0], -1).float()
    return float(F.cosine_similarity(r, o, dim=-1).mean())


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) per row of two log-probability tensors."""
    m = torch.logsumexp(torch.stack([logp, logq]), 0) - math.log(2)
    return 0.5 * ((logp.exp() * (logp - m)).sum(-1) + (logq.exp() * (logq - m)).sum(-1))


@torch.inference_mode()
def output_logprobs(stream: LayerStream, hidden: torch.Tensor) -> list[torch.Tensor]:
    """Next-token log-probabilities from final (normed) hidden states, per stream batch."""
    head = stream.adapter.lm_head
    return [F.log_softmax(head(hidden[i:i + stream.bs]).float(), -1) for i in range(0, stream.n, stream.bs)]


@torch.inference_mode()
def output_divergence(stream: LayerStream, ref_logprobs: list[torch.Tensor], hidden: torch.Tensor) -> float:
    """Mean over tokens of JS(reference next-token distribution, this one)."""
    head = stream.adapter.lm_head
    total, count = 0.0, 0
    for k, i in enumerate(range(0, stream.n, stream.bs)):
        lq = F.log_softmax(head(hidden[i:i + stream.bs]).float(), -1)
        total += float(js_divergence(ref_logprobs[k], lq).sum())
        count += lq.shape[0] * lq.shape[1]
    return total / count


# -- structure edits ----------------------------------------------------------------------

def delete(adapter: Adapter, stream: Optional[LayerStream], prov: list, drop: list[int]) -> list:
    """Delete layers ``drop`` (indices of the current model); returns the new provenance.
    The stream, if given, forgets everything above the lowest deleted layer."""
    drop = sorted(set(drop))
    remove_layers(adapter, drop)
    if stream is not None and drop:
        # one splice at the lowest index invalidates everything above it
        stream.spliced(drop[0], len(drop), 0)
    return delete_provenance(prov, drop)


def fold_window(adapter: Adapter, stream: Optional[LayerStream], prov: list, start: int, count: int,
                layer: Optional[nn.Module] = None) -> list:
    """Layers start..start+count-1 become one layer: ``layer`` if given, else
    their LaCo merge (RDSC onto layer ``start``). Returns the new provenance."""
    layers = adapter.layers
    if layer is None:
        layer = rdsc_merge(adapter, layers[start], [layers[k] for k in range(start + 1, start + count)])
    keep_attention_kind(adapter, layer, [layers[k] for k in range(start, start + count)])
    replace_window(adapter, start, count, layer)
    if stream is not None:
        stream.spliced(start, count, 1)
    return window_provenance(prov, start, count)


def rdsc_candidate(adapter: Adapter, start: int, count: int) -> nn.Module:
    layers = adapter.layers
    cand = rdsc_merge(adapter, layers[start], [layers[k] for k in range(start + 1, start + count)])
    keep_attention_kind(adapter, cand, [layers[k] for k in range(start, start + count)])
    return cand


def keep_attention_kind(adapter: Adapter, layer: nn.Module, sources: list[nn.Module]) -> None:
    """``layer`` stands for ``sources``: give it their attention kind (Qwen2/Qwen3
    sliding-window layers), full attention where they differ
    (come_fast.adapters.combined_attention_kind)."""
    kind = combined_attention_kind(sources)
    if kind is not None:
        set_attention_kind(adapter, layer, kind)


def check_trained(params, what: str, hint: str) -> None:
    """The end of every trained path: refuse a result holding NaN or Inf
    (a diverged or under/overflowing training) instead of returning it."""
    for p in params:
        if not torch.isfinite(p.detach()).all():
            if p.dtype == torch.float16:
                hint = "AdamW training in float16 under/overflows: load the model in float32 or bfloat16"
            raise FloatingPointError(f"{what} holds NaN or Inf after training in "
                                     f"{str(p.dtype).replace('torch.', '')}: {hint}")


@contextlib.contextmanager
def without_sublayer(layer: nn.Module, kind: str):
    """The layer with its attention or MLP removed, restored on exit."""
    sub, norm = sublayers._PARTS[kind]
    saved = getattr(layer, sub), getattr(layer, norm)
    sublayers.remove_sublayer(layer, kind)
    try:
        yield layer
    finally:
        setattr(layer, sub, saved[0])
        setattr(layer, norm, saved[1])


def sublayer_parameters(layer: nn.Module, kind: str) -> int:
    sub, norm = sublayers._PARTS[kind]
    return sum(p.numel() for m in (getattr(layer, sub), getattr(layer, norm)) for p in m.parameters())


def parameter_target(ctx, n_remove: int) -> int:
    """Parameters to remove: ``ratio`` x all parameters when a ratio was asked,
    else ``n_remove`` whole layers' worth."""
    a = ctx.adapter
    ratio = ctx.options.get("ratio")
    if ratio:
        return int(round(ratio * count_parameters(a.model)))
    return n_remove * layer_parameters(a.layers[0])


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
