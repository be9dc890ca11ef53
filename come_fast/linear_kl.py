"""Chunked linear + KL distillation loss: the PyTorch path (reference semantics).

Math
----
Student hidden states ``h`` [N, d], head ``W`` [V, d] (bias ``b`` [V]);
teacher logits ``z_t`` [N, V], given as such or as ``h_t W_t^T + b_t`` from the
teacher's own hidden states and head.  With ``z_s = h W^T + b``,
``a = z_s / T``, ``c = z_t / T``, ``p_s = softmax(a)``, ``p_t = softmax(c)``:

    loss = T^2 / N * sum_n KL(p_t[n] || p_s[n])
         = T^2 / N * sum_n sum_v p_t[n, v] (log p_t[n, v] - log p_s[n, v])

which is ``T^2 * F.kl_div(log_softmax(z_s / T), log_softmax(z_t / T),
log_target=True, reduction="batchmean")``: the KL term of
``come_fast.distill.loss_terms``.  Its gradient with respect to the logits is

    dloss / dz_s[n, v] = T / N * (p_s[n, v] - p_t[n, v])  (=: dz)

so ``grad_h = dz W``, ``grad_W = dz^T h``, ``grad_b = sum_n dz``.  The
teacher side is a constant (no gradient flows to it, as in ``loss_terms``
where the targets are computed without grad).

Memory: the tokens are processed in chunks of ``chunk_size`` rows; only one
chunk's [chunk, V] logits of each model exist at a time, and the gradients
are computed in the same pass (as Liger-Kernel's fused linear cross-entropy
does), so the backward stores ``grad_h`` [N, d] (and ``grad_W`` [V, d] in
float32, ``grad_b``) instead of any [N, V] tensor. ``grad_W`` is summed over
the chunks in float32 whatever the dtype (a bf16 running sum would round once
per chunk); low-precision inputs pay a float32 matmul for it.  The default chunk keeps a
[chunk, V] float32 buffer near 64 MB (2^24 elements): 128 rows at V = 128,256.

The Triton path (``come_fast.kernels.linear_kl``) has the same chunk loop with
the per-row softmax/KL/gradient work in one kernel (online logsumexp over vocab
blocks); ``come_fast.dispatch.Ops`` picks one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2 ** 24  # [chunk, V] elements per logits buffer in the default chunking


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS logits, a multiple of 16 when that is >= 16."""
    rows = max(1, CHUNK_ELEMENTS // max(1, vocab))
    if rows >= 16:
        rows -= rows % 16
    return max(1, min(rows, n_tokens))


def check_inputs(h, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, temperature,
                 chunk_size, name="linear_kl"):
    """Validate and flatten the inputs: returns (h2, t_h2, t_logits2, T, chunk) with tokens on dim 0."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be [V, d], got {tuple(weight.shape)}")
    V, d = weight.shape
    if h.shape[-1] != d:
        raise ValueError(f"{name}: hidden states end in {h.shape[-1]}, the head weight is [V={V}, d={d}]")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"{name}: bias must be [{V}], got {tuple(bias.shape)}")
    if (teacher_hidden is None) == (teacher_logits is None):
        raise ValueError(f"{name}: give the teacher as teacher_hidden (with teacher_weight) or as teacher_logits, "
                         "exactly one")
    h2 = h.reshape(-1, d)
    N = h2.shape[0]
    t_h2 = t_l2 = None
    if teacher_logits is not None:
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError(f"{name}: teacher_weight/teacher_bias go with teacher_hidden, not teacher_logits")
        if teacher_logits.shape[-1] != V:
            raise ValueError(f"{name}: teacher logits have vocabulary {teacher_logits.shape[-1]}, the student's "
                             f"head {V}")
        t_l2 = teacher_logits.reshape(-1, V)
        if t_l2.shape[0] != N:
            raise ValueError(f"{name}: {t_l2.shape[0]} teacher tokens for {N} student tokens")
        if not t_l2.dtype.is_floating_point:
            raise TypeError(f"{name}: teacher logits must be floating point, got {t_l2.dtype}")
    else:
        if teacher_weight is None:
            raise ValueError(f"{name}: teacher_hidden needs teacher_weight (the teacher's head; may be the "
                             "student's own tensor)")
        if teacher_weight.dim() != 2 or teacher_weight.shape[0] != V:
            raise ValueError(f"{name}: teacher head {tuple(teacher_weight.shape)} must be [V={V}, d_teacher]")
        if teacher_bias is not None and tuple(teacher_bias.shape) != (V,):
            raise ValueError(f"{name}: teacher_bias must be [{V}], got {tuple(teacher_bias.shape)}")
        if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(f"{name}: teacher hidden states end in {teacher_hidden.shape[-1]}, the teacher head "
                             f"is {tuple(teacher_weight.shape)}")
        t_h2 = teacher_hidden.reshape(-1, teacher_weight.shape[1])
        if t_h2.shape[0] != N:
            raise ValueError(f"{name}: {t_h2.shape[0]} teacher tokens for {N} student tokens")
    T = float(temperature)
    if not T > 0 or T == float("inf"):
        raise ValueError(f"{name}: temperature must be a positive finite number, got {temperature}")
    if N == 0:
        raise ValueError(f"{name}: no tokens (the mean over tokens is undefined)")
    chunk = default_chunk_size(N, V) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
    return h2, t_h2, t_l2, T, min(chunk, N)


def teacher_chunk(t_h2, teacher_weight, teacher_bias, t_l2, s: int, e: int) -> torch.Tensor:
    """The teacher's logits of rows s:e, no gradient (may be a view of the given logits)."""
    with torch.no_grad():
        if t_l2 is not None:
            return t_l2[s:e]
        return F.linear(t_h2[s:e], teacher_weight, teacher_bias)


def _chunked(h2, weight, bias, t_h2, t_w, t_b, t_l2, T: float, chunk: int, need_h: bool, need_w: bool,
             need_b: bool):
    """The loss (float32 scalar) and, as asked, grad_h [N, d] (h dtype), grad_W [V, d] and grad_b [V]
    (float32 accumulators) for an upstream gradient of 1."""
    N = h2.shape[0]
    V = weight.shape[0]
    dev = h2.device
    grads = need_h or need_w or need_b
    g_h = torch.empty_like(h2) if need_h else None
    g_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
    g_b = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    total = torch.zeros((), dtype=torch.float64, device=dev)
    inv_t = 1.0 / T
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        hc = h2[s:e]
        with torch.no_grad():
            z = F.linear(hc, weight, bias)
            a = z.float() if z.dtype != torch.float32 else z  # own buffer either way
            del z
            if T != 1.0:
                a.mul_(inv_t)
            a = torch.log_softmax(a, -1)  # log p_s (log_softmax's own numerics, as the plain loss)
            c = teacher_chunk(t_h2, t_w, t_b, t_l2, s, e).float()
            if T != 1.0:
                c = c * inv_t
            c = torch.log_softmax(c, -1)  # log p_t (a new buffer: the caller's logits are never written)
            p_t = c.exp()
            c.sub_(a).mul_(p_t)  # p_t (log p_t - log p_s)
            total += c.sum(-1).double().sum()  # row sums cascaded, as kl_div's own sum (a flat dot drifts)
            del c
            if grads:
                a.exp_().sub_(p_t).mul_(T / N)  # dz = T/N (p_s - p_t), float32
                del p_t
                if need_b:
                    g_b += a.sum(0)
                dz = a.to(weight.dtype)
                if need_h:
                    torch.mm(dz, weight, out=g_h[s:e])
                if need_w:  # summed over the chunks in float32 (chunk-sized casts, never a [V, d] temporary)
                    g_w.addmm_(a.t(), hc if hc.dtype == torch.float32 else hc.float())
            del a
    loss = (total * (T * T / N)).float()
    return loss, g_h, g_w, g_b


class LinearKLFunction(torch.autograd.Function):
    """Chunked linear + KL with the gradients computed in the forward pass (upstream gradient 1)
    and scaled by the real upstream gradient in backward."""

    @staticmethod
    def forward(ctx, h2, weight, bias, t_h2, t_w, t_b, t_l2, T, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        loss, g_h, g_w, g_b = _chunked(h2, weight, bias, t_h2, t_w, t_b, t_l2, T, chunk, need_h, need_w, need_b)
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(g_h, g_w, g_b)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        g_h, g_w, g_b = ctx.saved_tensors
        one = bool(grad_out == 1)
        if g_h is not None and not one:
            g_h = g_h * grad_out.to(g_h.dtype)
        if g_w is not None:
            g_w = (g_w if one else g_w * grad_out).to(ctx.w_dtype)
        if g_b is not None:
            g_b = (g_b if one else g_b * grad_out).to(ctx.b_dtype)
        return g_h, g_w, g_b, None, None, None, None, None, None


def torch_linear_kl(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                    teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                    teacher_bias: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None,
                    temperature: float = 1.0, chunk_size: Optional[int] = None) -> torch.Tensor:
    """``T^2 * mean over tokens of KL(softmax(z_t/T) || softmax(z_s/T))``, ``z_s = h W^T + b``, chunked.

    h: [..., d] student hidden states (the head's input); weight [V, d]; bias [V] or None.
    Teacher: ``teacher_hidden`` [..., d_t] with ``teacher_weight`` [V, d_t] (may be ``weight``
    itself) and ``teacher_bias``, or ``teacher_logits`` [..., V]; same token count as h.
    Returns a float32 scalar; gradients reach h, weight and bias (those that require grad),
    never the teacher.  ``chunk_size``: tokens per chunk (default: ~2^24 logits per chunk).
    Logits are computed in the inputs' dtype and the softmax math in float32, as
    ``loss_terms`` does on materialised logits.
    """
    h2, t_h2, t_l2, T, chunk = check_inputs(h, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                            teacher_logits, temperature, chunk_size)
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return LinearKLFunction.apply(h2, weight, bias, t_h2, teacher_weight, teacher_bias, t_l2, T, chunk)
    return _chunked(h2, weight, bias, t_h2, teacher_weight, teacher_bias, t_l2, T, chunk, False, False, False)[0]


__all__ = ["torch_linear_kl", "LinearKLFunction", "default_chunk_size", "check_inputs", "CHUNK_ELEMENTS"]
