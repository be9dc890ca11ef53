"""Picks the Triton or the PyTorch implementation of the hot ops.

``backend="auto"``: Triton when the tensors are on a CUDA device and Triton
imports, PyTorch otherwise. ``"triton"`` forces Triton (on a CPU tensor only
under ``TRITON_INTERPRET=1``, which is how the kernels are tested here).
The PyTorch functions below are the reference semantics of the kernels; the
chunked linear + KL loss's PyTorch path (an autograd op) is
``come_fast.linear_kl.torch_linear_kl``, re-exported here.
"""
from __future__ import annotations

import os

import torch

from .linear_kl import torch_linear_kl  # noqa: F401  (the chunked linear + KL loss, PyTorch path)

BACKENDS = ("auto", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    pass


def _triton_ops():
    try:
        from come_fast import kernels
    except Exception as e:  # pragma: no cover - depends on the machine
        raise BackendUnavailableError(f"the Triton kernels cannot be imported: {e}") from None
    if not getattr(kernels, "TRITON_AVAILABLE", False):
        raise BackendUnavailableError("triton is not installed (pip install triton)")
    return kernels


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailableError(
                f"backend='triton' needs a CUDA device (tensors are on {device}) or TRITON_INTERPRET=1"
            )
        _triton_ops()
        return "triton"
    if device.type == "cuda":
        try:
            _triton_ops()
            return "triton"
        except BackendUnavailableError:
            return "torch"
    return "torch"


# -- the PyTorch path ---------------------------------------------------------------

def torch_accumulate_abs_(x: torch.Tensor, acc: torch.Tensor) -> None:
    """acc[c] += sum over all leading positions of |x[..., c]|."""
    acc += x.reshape(-1, x.shape[-1]).abs().sum(0, dtype=acc.dtype)


def torch_finalize_scores(acc: torch.Tensor, weight: torch.Tensor, n_tokens: int, group_size: int = 1) -> torch.Tensor:
    """mean |a_c| times the L1 norm of column c of the consuming weight, averaged
    over contiguous blocks of ``group_size`` channels (one KV group)."""
    col = weight.detach().abs().sum(0, dtype=torch.float32).to(acc.dtype)
    s = acc / n_tokens * col
    if group_size > 1:
        s = s.reshape(-1, group_size).mean(1)
    return s


def torch_gather_concat(a: torch.Tensor, idx_a: torch.Tensor, b: torch.Tensor, idx_b: torch.Tensor,
                        dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    res = torch.cat([a.index_select(dim, idx_a), b.index_select(dim, idx_b)], dim)
    if out is None:
        return res
    out.copy_(res)
    return out


# -- dispatch -------------------------------------------------------------------------

class Ops:
    """The op table for one backend; methods and mechanisms call only these."""

    def __init__(self, backend: str = "auto", device: torch.device | str = "cpu"):
        self.backend = resolve_backend(backend, torch.device(device))
        if self.backend == "triton":
            k = _triton_ops()
            self.accumulate_abs_ = k.accumulate_abs_
            self.finalize_scores = k.finalize_scores
            self.gather_concat = k.gather_concat
            self.linear_kl = k.linear_kl
        else:
            self.accumulate_abs_ = torch_accumulate_abs_
            self.finalize_scores = torch_finalize_scores
            self.gather_concat = torch_gather_concat
            self.linear_kl = torch_linear_kl
