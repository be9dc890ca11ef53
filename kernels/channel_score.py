"""Channel sensitivity statistics for CoMe (MLP channels and attention KV groups).

Math
----
For a linear layer ``y = W z`` with ``W`` of shape ``[d, C]`` and input ``z``
(``[tokens, C]``: the input of ``down_proj`` for the MLP, the concatenated head
outputs entering ``o_proj`` for attention), CoMe scores input channel ``c`` by

    S[c] = mean_t |z[t, c]| * sum_d |W[d, c]|                        (MLP)
    S_att[k] = mean_{c in group k} S[c]                               (attention)

where an attention group ``k`` (one KV head with its ``g`` query heads, ``h``
channels each) is either

* contiguous (the correct ``repeat_kv`` grouping): channels
  ``[k*g*h, (k+1)*g*h)``, i.e. query heads ``g*k .. g*k+g-1``;
* tiled (the released implementation's grouping): query heads
  ``k, k+H_kv, k+2*H_kv, ...``, i.e. channels ``(k + m*H_kv)*h + r`` for
  ``m < g``, ``r < h``.

The statistics arrive over many calibration batches, so the work is split in

1. ``accumulate_abs_(x, acc)``: ``acc[c] += sum_t |x[t, c]|`` (float32 running
   buffer, one pass over the activations, called once per batch);
2. ``finalize_scores(acc, W, n_tokens, ...)``: reads ``W`` once to get its
   column L1 norms ``sum_d |W[d, c]|`` (the same column-reduction kernel as 1.),
   then ``acc / n_tokens * colnorm`` and the group mean in a tiny second kernel.

Both reductions are column sums over a strided 2-D view, so one kernel
(``_abs_colsum_kernel``) serves the activations and the weight.  For
parallelism the rows are cut into ``n_split`` slabs that write float32
partial sums ``[n_split, C]``; a second launch of the same kernel (or the
finalize kernel) folds the partials, so the result is deterministic (no atomics).

No autograd Function: these are calibration statistics, no gradient flows
through them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether a kernel is interpreted; remember
# the state the kernels below were built with.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _abs_colsum_kernel(
    x_ptr,
    out_ptr,
    T,
    C,
    S,
    stride_b,
    stride_s,
    stride_c,
    stride_out,
    rows_per_split,
    ACCUMULATE: tl.constexpr,
    HAS_OUTER: tl.constexpr,
    T_FAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[split, c] (+)= sum_{t in slab split} |x[t, c]|  (float32).

    ``x`` is a strided view with rows ``t`` (``t = b*S + s`` when HAS_OUTER,
    offset ``b*stride_b + s*stride_s``; else offset ``t*stride_s``) and
    columns ``c`` (offset ``c*stride_c``).  Grid: (cdiv(C, BLOCK_C), n_split).

    Bytes: reads T*C*elem once, writes n_split*C*4.  7B-class shapes in bf16,
    128x2048 calibration tokens: MLP activations 262144 x 11008 x 2 B = 5.77 GB
    -> floor 1.34 ms per layer at 4.3 TB/s (summed over all batches);
    attention 262144 x 4096 x 2 B = 2.15 GB -> 0.50 ms.  As the column norm of
    W_down [4096, 11008] bf16: 90.2 MB -> 21 us; W_o [4096, 4096]: 33.6 MB -> 7.8 us.
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_off = cols.to(tl.int64) * stride_c
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    if T_FAST:
        # rows are the contiguous axis (e.g. a transposed view): tile [BLOCK_C, BLOCK_T]
        acc_t = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < t_end
        r64 = rows.to(tl.int64)
        if HAS_OUTER:
            row_off = (r64 // S) * stride_b + (r64 % S) * stride_s
        else:
            row_off = r64 * stride_s
        if T_FAST:
            x = tl.load(
                x_ptr + row_off[None, :] + col_off[:, None],
                mask=rmask[None, :] & cmask[:, None],
                other=0.0,
            ).to(tl.float32)
            acc_t += tl.abs(x)
        else:
            x = tl.load(
                x_ptr + row_off[:, None] + col_off[None, :],
                mask=rmask[:, None] & cmask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.abs(x)
    if T_FAST:
        total = tl.sum(acc_t, axis=1)
    else:
        total = tl.sum(acc, axis=0)
    o_ptr = out_ptr + pid_s.to(tl.int64) * stride_out + cols
    if ACCUMULATE:
        total += tl.load(o_ptr, mask=cmask, other=0.0).to(tl.float32)
    tl.store(o_ptr, total, mask=cmask)


@triton.jit
def _finalize_kernel(
    part_ptr,
    n_part,
    stride_part,
    acc_ptr,
    out_ptr,
    n_tokens,
    inv_group,
    n_groups,
    group_size,
    head_dim,
    grp_stride,
    head_stride,
    BLOCK_G: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """out[k] = inv_group * sum_{i < group_size} acc[c] / n_tokens * sum_s part[s, c],
    c = k*grp_stride + (i // head_dim)*head_stride + i % head_dim.

    Contiguous groups: grp_stride = group_size, head_dim = group_size.
    Tiled groups: grp_stride = h, head_dim = h, head_stride = n_groups*h.
    Plain per-channel scores: group_size = head_dim = grp_stride = 1.
    Grid: (cdiv(n_groups, BLOCK_G),).

    Bytes: reads (n_part + 1)*C*4, writes n_groups*4: tens of KB, launch-bound
    (a few microseconds) at 7B-class shapes.
    """
    pid = tl.program_id(0)
    groups = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = groups < n_groups
    total = tl.zeros([BLOCK_G, BLOCK_I], dtype=tl.float32)
    for i0 in range(0, group_size, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        imask = i < group_size
        c = groups[:, None] * grp_stride + (i // head_dim)[None, :] * head_stride + (i % head_dim)[None, :]
        m = gmask[:, None] & imask[None, :]
        norm = tl.zeros([BLOCK_G, BLOCK_I], dtype=tl.float32)
        for s in range(0, n_part):
            norm += tl.load(part_ptr + s * stride_part + c, mask=m, other=0.0).to(tl.float32)
        a = tl.load(acc_ptr + c, mask=m, other=0.0).to(tl.float32)
        total += a / n_tokens * norm
    res = tl.sum(total, axis=1) * inv_group
    tl.store(out_ptr + groups, res, mask=gmask)


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #
def _check_device(t: torch.Tensor, name: str) -> None:
    if not t.is_cuda and not _INTERPRET:
        raise RuntimeError(
            f"come_fast.kernels: {name} is on {t.device}; the Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 set before come_fast.kernels is imported). Use the PyTorch path on CPU."
        )


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_properties(device).multi_processor_count
        except Exception:  # pragma: no cover - defensive
            return 132
    return 1


def _rows_view(x: torch.Tensor):
    """Describe ``x[..., C]`` as rows x columns without copying when possible.

    Returns (tensor, T, S, stride_b, stride_s, stride_c, has_outer): row t lives at
    (t // S)*stride_b + (t % S)*stride_s (has_outer) or t*stride_s.  Leading dims
    are merged where their strides allow; more than two unmergeable leading dims
    fall back to a reshape copy.
    """
    C = x.shape[-1]
    dims = [(n, st) for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    merged: list = []
    for n, st in dims:
        if merged and merged[-1][1] == st * n:
            pn, _ = merged[-1]
            merged[-1] = (pn * n, st)
        else:
            merged.append((n, st))
    T = 1
    for n, _ in dims:
        T *= n
    if len(merged) == 0:
        return x, T, 1, 0, 0, x.stride(-1), False
    if len(merged) == 1:
        return x, T, merged[0][0], 0, merged[0][1], x.stride(-1), False
    if len(merged) == 2:
        (_, sb), (ns, ss) = merged
        return x, T, ns, sb, ss, x.stride(-1), True
    y = x.reshape(-1, C)
    return y, y.shape[0], y.shape[0], 0, y.stride(0), y.stride(1), False


class _Plan:
    """A column-abs-sum launch: the strided row view of x and the tiling."""

    __slots__ = ("x", "T", "C", "S", "sb", "ss", "sc", "has_outer", "t_fast", "bt", "bc", "ns", "rows", "warps")


def _plan(x: torch.Tensor, block_t=None, block_c=None, n_split=None) -> _Plan:
    p = _Plan()
    p.x, p.T, p.S, p.sb, p.ss, p.sc, p.has_outer = _rows_view(x)
    p.C = x.shape[-1]
    T, C = p.T, p.C
    # rows contiguous in memory (a transposed view): put the row axis fastest in the tile
    p.t_fast = p.ss == 1 and p.sc != 1 and not p.has_outer and T > 1
    if _INTERPRET and x.device.type != "cuda":
        # the interpreter's cost grows with the number of programs: big tiles, one slab
        bc = block_c or min(_next_pow2(C), 2048)
        bt = block_t or min(_next_pow2(T), 64)
        ns = n_split or 1
        warps = 4
    else:
        if p.t_fast:
            bt = block_t or min(max(_next_pow2(T), 16), 256)
            bc = block_c or 32
        else:
            bc = block_c or min(max(_next_pow2(C), 16), 256)
            bt = block_t or 32
        if n_split is None:
            target = 4 * _num_sms(x.device)
            ns = max(1, min(triton.cdiv(target, triton.cdiv(C, bc)), triton.cdiv(T, 4 * bt)))
        else:
            ns = n_split
        warps = 8 if bt * bc >= 8192 else 4
    for v, nm in ((bt, "block_t"), (bc, "block_c")):
        if v <= 0 or v & (v - 1):
            raise ValueError(f"{nm} must be a positive power of 2, got {v}")
    ns = max(1, min(int(ns), max(1, T)))
    rows = triton.cdiv(triton.cdiv(max(T, 1), ns), bt) * bt
    p.ns = triton.cdiv(max(T, 1), rows)  # no empty slabs
    p.rows, p.bt, p.bc, p.warps = rows, bt, bc, warps
    return p


def _launch(p: _Plan, out: torch.Tensor, accumulate: bool) -> None:
    """out[s, c] (+)= slab-s column abs-sums; out is [p.ns, C] (or [C] when p.ns == 1)."""
    grid = (triton.cdiv(p.C, p.bc), p.ns)
    _abs_colsum_kernel[grid](
        p.x, out, p.T, p.C, p.S, p.sb, p.ss, p.sc, p.C, p.rows,
        ACCUMULATE=accumulate, HAS_OUTER=p.has_outer, T_FAST=p.t_fast,
        BLOCK_T=p.bt, BLOCK_C=p.bc, num_warps=p.warps,
    )


def accumulate_abs_(x: torch.Tensor, acc: torch.Tensor, *, block_t: Optional[int] = None,
                    block_c: Optional[int] = None, n_split: Optional[int] = None) -> torch.Tensor:
    """In place: ``acc += x.abs().sum over all leading dims`` (float32), returns ``acc``.

    x: any float dtype, shape [..., C], any strides (no copy unless more than two
    leading dims cannot be merged).  acc: float32, contiguous, shape [C], same
    device.  ``block_t``/``block_c``/``n_split`` override the tiling (tests,
    tuning); the default picks ~4 programs per SM on CUDA and one big tile slab
    under the interpreter.  n_split > 1 writes float32 partials [n_split, C] and
    folds them into ``acc`` with a second launch (deterministic, no atomics).

    Moves T*C*elem bytes (+ 8*n_split*C): 7B MLP, 128x2048 tokens, bf16:
    5.77 GB -> 1.34 ms floor at 4.3 TB/s.
    """
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"accumulate_abs_: x must be a float tensor, got {x.dtype}")
    if acc.dtype != torch.float32 or acc.dim() != 1 or not acc.is_contiguous():
        raise TypeError("accumulate_abs_: acc must be a contiguous 1-D float32 tensor")
    if x.dim() < 1 or x.shape[-1] != acc.shape[0]:
        raise ValueError(f"accumulate_abs_: last dim of x {tuple(x.shape)} must equal acc length {acc.shape[0]}")
    if x.device != acc.device:
        raise ValueError(f"accumulate_abs_: x on {x.device}, acc on {acc.device}")
    _check_device(x, "x")
    if x.numel() == 0:
        return acc
    p = _plan(x, block_t, block_c, n_split)
    if p.ns == 1:
        _launch(p, acc, True)
        return acc
    part = torch.empty((p.ns, p.C), dtype=torch.float32, device=x.device)
    _launch(p, part, False)
    _launch(_plan(part, None, block_c, 1), acc, True)  # fold the slabs, deterministic
    return acc


def column_l1_norm(weight: torch.Tensor, *, block_t: Optional[int] = None, block_c: Optional[int] = None,
                   n_split: Optional[int] = None) -> torch.Tensor:
    """``weight.abs().sum(0)`` for a 2-D weight [d, C], as a new float32 tensor [C].

    Reads the weight once: W_down [4096, 11008] bf16 = 90.2 MB -> 21 us floor at 4.3 TB/s.
    """
    if weight.dim() != 2:
        raise ValueError(f"column_l1_norm: weight must be 2-D, got shape {tuple(weight.shape)}")
    out = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    return accumulate_abs_(weight, out, block_t=block_t, block_c=block_c, n_split=n_split)


def finalize_scores(acc: torch.Tensor, weight: torch.Tensor, n_tokens, group_size: int = 1,
                    tiled_groups: Optional[int] = None, *, block_t: Optional[int] = None,
                    block_c: Optional[int] = None, n_split: Optional[int] = None) -> torch.Tensor:
    """Scores from accumulated |activations|: a new float32 tensor.

    acc: float32 [C] = sum over tokens of |z| (from ``accumulate_abs_``);
    weight: [d, C] (down_proj.weight or o_proj.weight, any float dtype/strides);
    n_tokens: number of tokens accumulated (> 0).

    * group_size == 1: returns [C], ``acc / n_tokens * weight.abs().sum(0)``
      (MLP channel sensitivity).
    * group_size > 1 (attention, group_size = g*h channels per KV group):
      returns [C // group_size], the mean of the per-channel scores over each
      group's channels.  ``tiled_groups=None``: group k = channels
      [k*group_size, (k+1)*group_size) (query heads g*k .. g*k+g-1).
      ``tiled_groups=h`` (the head dim, an int dividing group_size): the
      release's tiling, group k = query heads k, k+H_kv, k+2*H_kv, ... of h
      channels each, H_kv = C // group_size.

    Weight read once (column norms in the accumulate kernel family, float32
    partials), then one small kernel; 7B W_down bf16: 90.2 MB -> 21 us floor.
    """
    if acc.dtype != torch.float32 or acc.dim() != 1:
        raise TypeError("finalize_scores: acc must be a 1-D float32 tensor")
    if weight.dim() != 2 or weight.shape[1] != acc.shape[0]:
        raise ValueError(
            f"finalize_scores: weight must be [d, C] with C = len(acc) = {acc.shape[0]}, got {tuple(weight.shape)}"
        )
    if weight.device != acc.device:
        raise ValueError(f"finalize_scores: acc on {acc.device}, weight on {weight.device}")
    n_tok = float(n_tokens)
    if not n_tok > 0:
        raise ValueError(f"finalize_scores: n_tokens must be > 0, got {n_tokens}")
    C = acc.shape[0]
    group_size = int(group_size)
    if group_size < 1 or C % group_size:
        raise ValueError(f"finalize_scores: group_size {group_size} must divide C = {C}")
    n_groups = C // group_size
    if tiled_groups is None or tiled_groups is False:
        head_dim, grp_stride, head_stride = group_size, group_size, 0
    else:
        if isinstance(tiled_groups, bool):
            raise ValueError("finalize_scores: tiled_groups takes the head dim h (an int), not True")
        h = int(tiled_groups)
        if h < 1 or group_size % h:
            raise ValueError(f"finalize_scores: head dim {h} must divide group_size {group_size}")
        head_dim, grp_stride, head_stride = h, h, n_groups * h
    _check_device(weight, "weight")
    acc = acc.contiguous()
    out = torch.empty(n_groups, dtype=torch.float32, device=acc.device)
    if n_groups == 0:
        return out
    if weight.shape[0] == 0:
        ns = 1
        part = torch.zeros((1, C), dtype=torch.float32, device=acc.device)
    else:
        p = _plan(weight, block_t, block_c, n_split)
        ns = p.ns
        part = torch.empty((ns, C), dtype=torch.float32, device=acc.device)
        _launch(p, part, False)
    if _INTERPRET and acc.device.type != "cuda":
        cap = 4096
    else:
        cap = 1024
    block_i = min(_next_pow2(group_size), cap)
    block_g = max(1, min(_next_pow2(n_groups), cap // block_i))
    grid = (triton.cdiv(n_groups, block_g),)
    _finalize_kernel[grid](
        part, ns, C, acc, out, n_tok, 1.0 / group_size, n_groups, group_size, head_dim, grp_stride,
        head_stride, BLOCK_G=block_g, BLOCK_I=block_i, num_warps=4,
    )
    return out


__all__ = ["accumulate_abs_", "finalize_scores", "column_l1_norm"]
