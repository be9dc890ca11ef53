"""Fused linear + KL distillation loss (chunked; never the full [N, V] logits).

Math
----
Student hidden states ``h`` [N, d], head ``W`` [V, d] (bias ``b`` [V]); the
teacher's logits ``z_t`` [N, V], given as such or as ``h_t W_t^T + b_t``.  With
``z_s = h W^T + b``, ``a = z_s / T``, ``c = z_t / T``:

    loss = T^2 / N * sum_n KL(softmax(c[n]) || softmax(a[n]))

(``T^2 * F.kl_div(log_softmax(z_s/T), log_softmax(z_t/T), log_target=True,
reduction="batchmean")``, the KL term of ``come_fast.distill.loss_terms``).
Per row, with ``lse`` the log-sum-exp over the vocabulary,

    KL[n] = sum_v p_t (c - a) + lse(a) - lse(c),    p_t = exp(c - lse(c))

and ``sum_v p_t (c - a) = sum_v exp(c - m_c) (c - a) / sum_v exp(c - m_c)``, so
one pass over vocab blocks with running maxima (online log-sum-exp: when the
maximum rises from m to m', the running sums are multiplied by exp(m - m'))
gives lse(a), lse(c) and the cross term.  A second pass writes the gradient
of the loss with respect to the student logits,

    dz[n, v] = T / N * (exp(a - lse(a)) - exp(c - lse(c)))

over the student-logits buffer (in place), and then ``grad_h = dz W``,
``grad_W += dz^T h``, ``grad_b += sum_n dz``.

Work split (Liger-Kernel's fused linear cross-entropy): the tokens go in
chunks of ``chunk_size`` rows; per chunk the two matmuls ``h W^T`` and
``h_t W_t^T`` (cuBLAS) fill [chunk, V] buffers, the kernel below reduces them
row by row (one program per row, BLOCK_V vocab entries per step), and two more
matmuls turn dz into the gradients.  The gradients are computed in the forward
pass (upstream gradient 1), the autograd Function stores only grad_h [N, d],
grad_W [V, d] (float32) and grad_b, and its backward scales them by the real
upstream gradient.  The teacher side gets no gradient.

Bytes: the kernel reads the two [chunk, V] buffers twice and writes the student
one once: 7B-class (V = 128,256) in bf16 over 4,096 tokens, 5 x 4096 x 128256 x 2 B
= 5.3 GB -> 1.2 ms at 4.3 TB/s, against three matmuls (four when the head
trains) of 2 N V d = 4.3 TFLOP each at d = 4,096 (~4.4 ms each at ~1 PFLOP/s
bf16): the matmuls dominate; what the kernel buys is memory (one [chunk, V]
buffer per model instead of several [N, V] float32 tensors).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no")

CHUNK_ELEMENTS = 2 ** 24  # [chunk, V] elements per logits buffer in the default chunking


# --------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------- #
@triton.jit
def _kl_rows_kernel(
    zs_ptr,
    zt_ptr,
    loss_ptr,
    V,
    stride_s,
    stride_t,
    inv_t,
    loss_scale,
    grad_scale,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Row n of a chunk: loss[n] = loss_scale * KL(softmax(zt[n]/T) || softmax(zs[n]/T)),
    and when COMPUTE_GRAD: zs[n, :] <- grad_scale * (softmax(zs[n]/T) - softmax(zt[n]/T))
    (in zs's dtype, in place).  zs, zt: [rows, V] with row strides stride_s, stride_t
    (unit stride along V).  Grid: (rows,).
    """
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    # pass 1: online log-sum-exp of a and c, and the cross term sum exp(c - m_c) (c - a)
    m_a = float("-inf")
    l_a = 0.0
    m_c = float("-inf")
    l_c = 0.0
    x_c = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        a0 = tl.load(zs_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
        c0 = tl.load(zt_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
        a = tl.where(mask, a0, float("-inf"))
        c = tl.where(mask, c0, float("-inf"))
        m_a_new = tl.maximum(m_a, tl.max(a, 0))
        l_a = l_a * tl.exp(m_a - m_a_new) + tl.sum(tl.exp(a - m_a_new), 0)
        m_a = m_a_new
        m_c_new = tl.maximum(m_c, tl.max(c, 0))
        alpha = tl.exp(m_c - m_c_new)
        e_c = tl.exp(c - m_c_new)
        diff = c0 - a0  # 0 on masked lanes (where e_c is 0 too)
        l_c = l_c * alpha + tl.sum(e_c, 0)
        x_c = x_c * alpha + tl.sum(e_c * diff, 0)
        m_c = m_c_new
    # lse = m + log(l); the maxima and the logs are kept apart (as log_softmax does): m + log(l)
    # rounded to float32 would cost an ulp of lse (~1e-6 at lse ~ 10) in every probability
    log_l_a = tl.log(l_a)
    log_l_c = tl.log(l_c)
    kl = x_c / l_c + (m_a - m_c) + (log_l_a - log_l_c)
    tl.store(loss_ptr + row, kl * loss_scale)
    if COMPUTE_GRAD:
        # pass 2: dz = grad_scale * (p_s - p_t), over the student logits
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            a = tl.load(zs_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
            c = tl.load(zt_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
            g = (tl.exp((a - m_a) - log_l_a) - tl.exp((c - m_c) - log_l_c)) * grad_scale
            tl.store(zs_row + offs, g.to(zs_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- #
# Launcher
# --------------------------------------------------------------------------- #
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def kl_rows_(zs: torch.Tensor, zt: torch.Tensor, temperature: float, loss_scale: float, grad_scale: float,
             compute_grad: bool, *, block_v: Optional[int] = None) -> torch.Tensor:
    """Per-row ``loss_scale * KL(softmax(zt/T) || softmax(zs/T))`` as a new float32 [rows] tensor;
    with ``compute_grad`` also overwrites ``zs`` with ``grad_scale * (softmax(zs/T) - softmax(zt/T))``.

    zs: [rows, V], unit stride along V, any float dtype (written in place when compute_grad);
    zt: [rows, V], unit stride along V, any float dtype (only read).  Moves about
    rows x V x (2 x (elem_s + elem_t) + elem_s) bytes.
    """
    if zs.dim() != 2 or zt.shape != zs.shape:
        raise ValueError(f"kl_rows_: zs {tuple(zs.shape)} and zt {tuple(zt.shape)} must be the same [rows, V]")
    if zs.device != zt.device:
        raise ValueError(f"kl_rows_: zs on {zs.device}, zt on {zt.device}")
    if not zs.is_cuda and not _INTERPRET:
        raise RuntimeError(
            f"come_fast.kernels: linear_kl got tensors on {zs.device}; the Triton kernel needs CUDA "
            "(or TRITON_INTERPRET=1 set before come_fast.kernels is imported). Use the PyTorch path on CPU."
        )
    if zs.stride(-1) != 1:
        raise ValueError("kl_rows_: zs must have unit stride along the vocabulary")
    if zt.stride(-1) != 1:
        zt = zt.contiguous()
    rows, V = zs.shape
    out = torch.empty(rows, dtype=torch.float32, device=zs.device)
    if rows == 0:
        return out
    if block_v is None:
        cap = 8192 if (_INTERPRET and zs.device.type != "cuda") else 4096
        block_v = min(_next_pow2(V), cap)
    if block_v <= 0 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a positive power of 2, got {block_v}")
    warps = 16 if block_v >= 4096 else (8 if block_v >= 1024 else 4)
    _kl_rows_kernel[(rows,)](
        zs, zt, out, V, zs.stride(0), zt.stride(0), 1.0 / float(temperature), float(loss_scale),
        float(grad_scale), COMPUTE_GRAD=bool(compute_grad), BLOCK_V=block_v, num_warps=warps,
    )
    return out


# --------------------------------------------------------------------------- #
# Chunk loop and autograd Function
# --------------------------------------------------------------------------- #
def _default_chunk(n_tokens: int, vocab: int) -> int:
    rows = max(1, CHUNK_ELEMENTS // max(1, vocab))
    if rows >= 16:
        rows -= rows % 16
    return max(1, min(rows, n_tokens))


def _chunked(h2, weight, bias, t_h2, t_w, t_b, t_l2, T: float, chunk: int, need_h: bool, need_w: bool,
             need_b: bool, block_v=None):
    """Loss (float32 scalar) and, as asked, grad_h (h dtype), grad_W and grad_b (float32) for an
    upstream gradient of 1."""
    N = h2.shape[0]
    V = weight.shape[0]
    dev = h2.device
    grads = need_h or need_w or need_b
    g_h = torch.empty_like(h2) if need_h else None
    g_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
    g_b = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    rows = torch.empty(N, dtype=torch.float32, device=dev)
    with torch.no_grad():
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            hc = h2[s:e]
            zs = F.linear(hc, weight, bias)  # own buffer: receives dz
            zt = t_l2[s:e] if t_l2 is not None else F.linear(t_h2[s:e], t_w, t_b)
            rows[s:e] = kl_rows_(zs, zt, T, T * T / N, T / N, grads, block_v=block_v)
            del zt
            if grads:
                if need_b:
                    g_b += zs.sum(0, dtype=torch.float32)
                if need_h:
                    torch.mm(zs, weight, out=g_h[s:e])
                if need_w:  # float32 running sum over the chunks (a bf16 one would round per chunk)
                    if zs.dtype == torch.float32:
                        g_w.addmm_(zs.t(), hc)
                    else:  # chunk-sized casts, never a [V, d] temporary
                        g_w.addmm_(zs.t().float(), hc.float())
            del zs
    return rows.sum(), g_h, g_w, g_b


class LinearKLFunction(torch.autograd.Function):
    """Fused linear + KL: gradients computed in forward, scaled by the upstream gradient in backward."""

    @staticmethod
    def forward(ctx, h2, weight, bias, t_h2, t_w, t_b, t_l2, T, chunk, block_v):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        loss, g_h, g_w, g_b = _chunked(h2, weight, bias, t_h2, t_w, t_b, t_l2, T, chunk, need_h, need_w, need_b,
                                       block_v)
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
        return g_h, g_w, g_b, None, None, None, None, None, None, None


def _check(h, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, temperature, chunk_size):
    if weight.dim() != 2:
        raise ValueError(f"linear_kl: weight must be [V, d], got {tuple(weight.shape)}")
    V, d = weight.shape
    if h.shape[-1] != d:
        raise ValueError(f"linear_kl: hidden states end in {h.shape[-1]}, the head weight is [V={V}, d={d}]")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"linear_kl: bias must be [{V}], got {tuple(bias.shape)}")
    if (teacher_hidden is None) == (teacher_logits is None):
        raise ValueError("linear_kl: give the teacher as teacher_hidden (with teacher_weight) or as "
                         "teacher_logits, exactly one")
    h2 = h.reshape(-1, d)
    N = h2.shape[0]
    t_h2 = t_l2 = None
    if teacher_logits is not None:
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("linear_kl: teacher_weight/teacher_bias go with teacher_hidden, not teacher_logits")
        if teacher_logits.shape[-1] != V:
            raise ValueError(f"linear_kl: teacher logits have vocabulary {teacher_logits.shape[-1]}, the "
                             f"student's head {V}")
        t_l2 = teacher_logits.reshape(-1, V)
        if t_l2.shape[0] != N:
            raise ValueError(f"linear_kl: {t_l2.shape[0]} teacher tokens for {N} student tokens")
    else:
        if teacher_weight is None:
            raise ValueError("linear_kl: teacher_hidden needs teacher_weight (the teacher's head; may be the "
                             "student's own tensor)")
        if teacher_weight.dim() != 2 or teacher_weight.shape[0] != V:
            raise ValueError(f"linear_kl: teacher head {tuple(teacher_weight.shape)} must be [V={V}, d_teacher]")
        if teacher_bias is not None and tuple(teacher_bias.shape) != (V,):
            raise ValueError(f"linear_kl: teacher_bias must be [{V}], got {tuple(teacher_bias.shape)}")
        if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(f"linear_kl: teacher hidden states end in {teacher_hidden.shape[-1]}, the teacher "
                             f"head is {tuple(teacher_weight.shape)}")
        t_h2 = teacher_hidden.reshape(-1, teacher_weight.shape[1])
        if t_h2.shape[0] != N:
            raise ValueError(f"linear_kl: {t_h2.shape[0]} teacher tokens for {N} student tokens")
    T = float(temperature)
    if not T > 0 or T == float("inf"):
        raise ValueError(f"linear_kl: temperature must be a positive finite number, got {temperature}")
    if N == 0:
        raise ValueError("linear_kl: no tokens (the mean over tokens is undefined)")
    chunk = _default_chunk(N, V) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"linear_kl: chunk_size must be >= 1, got {chunk_size}")
    return h2, t_h2, t_l2, T, min(chunk, N)


def linear_kl(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
              teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
              teacher_bias: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None,
              temperature: float = 1.0, chunk_size: Optional[int] = None,
              block_v: Optional[int] = None) -> torch.Tensor:
    """``T^2 * mean over tokens of KL(softmax(z_t/T) || softmax(z_s/T))``, ``z_s = h W^T + b``.

    Same contract as ``come_fast.dispatch.torch_linear_kl``: h [..., d], weight [V, d], bias [V]
    or None; the teacher as ``teacher_hidden`` [..., d_t] with ``teacher_weight`` [V, d_t] (may be
    ``weight`` itself) and ``teacher_bias``, or as ``teacher_logits`` [..., V].  Returns a float32
    scalar; gradients reach h, weight, bias (those requiring grad), never the teacher.
    ``chunk_size``: tokens per chunk (default ~2^24 logits); ``block_v``: vocab block of the kernel.
    Needs CUDA tensors (or TRITON_INTERPRET=1, float32).
    """
    h2, t_h2, t_l2, T, chunk = _check(h, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                      teacher_logits, temperature, chunk_size)
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return LinearKLFunction.apply(h2, weight, bias, t_h2, teacher_weight, teacher_bias, t_l2, T, chunk, block_v)
    return _chunked(h2, weight, bias, t_h2, teacher_weight, teacher_bias, t_l2, T, chunk, False, False, False,
                    block_v)[0]


__all__ = ["linear_kl", "kl_rows_", "LinearKLFunction"]
