"""pytest-benchmark: PyTorch path vs Triton kernels for CoMe scoring and gather-concat.

    pytest benchmarks/bench_kernels.py --benchmark-only                 # CPU: torch only
    TRITON_INTERPRET=1 pytest benchmarks/bench_kernels.py -k smollm2    # + interpreted Triton, tiny token counts
    pytest benchmarks/bench_kernels.py --benchmark-only                 # on a GPU: both, bf16

Shapes: SmolLM2-135M (d=576, I=1536, 9 heads / 3 KV, h=64) and 7B-class
(d=4096, I=11008, 32 heads, h=128), random weights.  Parametrised by device;
on CPU only the PyTorch path runs unless TRITON_INTERPRET is set (then the
Triton kernels run interpreted on tiny token counts: functional, not a speed
measurement).  ``extra_info`` carries the bytes each op must move and the
achieved GB/s.  The PyTorch path is the same plain expression as
``come_fast.dispatch``'s torch functions.  A CUDA-event version with a
copy-bandwidth baseline is ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

INTERP = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no")

try:
    import triton  # noqa: F401

    cs = importlib.import_module("come_fast.kernels.channel_score")
    gc = importlib.import_module("come_fast.kernels.gather_concat")
    _TRITON_ERR = None
except Exception as exc:  # triton missing or package not installed
    cs = gc = None
    _TRITON_ERR = f"{type(exc).__name__}: {exc}"

SHAPES = {
    "smollm2": dict(d=576, I=1536, H=9, H_kv=3, h=64),
    "7b": dict(d=4096, I=11008, H=32, H_kv=32, h=128),
}
DEVICES = ["cpu", "cuda"]


def _tokens(device: str, impl: str, shape: str) -> tuple:
    """(batch, seq) of one calibration batch."""
    if device == "cuda":
        return (8, 2048)
    if impl == "triton":  # interpreted
        return (1, 32)
    return (1, 512) if shape == "7b" else (2, 512)


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def _skip_unless_runnable(device: str, impl: str, shape: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl == "triton":
        if cs is None:
            pytest.skip(f"Triton kernels unavailable ({_TRITON_ERR})")
        if device == "cpu" and not cs._INTERPRET:
            pytest.skip("Triton needs CUDA; set TRITON_INTERPRET=1 to run the kernels interpreted on CPU")
        if device == "cuda" and cs._INTERPRET:
            pytest.skip("kernels were defined under TRITON_INTERPRET=1: unset it to time them on CUDA")
        if device == "cpu" and shape == "7b":
            pytest.skip("7B shapes under the Triton interpreter take too long; use -k smollm2")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn, device, nbytes):
    def call():
        r = fn()
        _sync(device)
        return r

    call()  # warm-up (JIT compile, allocator)
    rounds = 3 if (device == "cpu" and INTERP) else None
    if rounds:
        benchmark.pedantic(call, rounds=rounds, iterations=1)
    else:
        benchmark(call)
    benchmark.extra_info["bytes"] = int(nbytes)
    try:
        med = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = round(nbytes / med / 1e9, 2)
    except Exception:  # benchmarks disabled
        pass


# --------------------------------------------------------------------------- #
# PyTorch path (as come_fast.dispatch)
# --------------------------------------------------------------------------- #
def torch_accumulate_abs_(x, acc):
    acc += x.reshape(-1, x.shape[-1]).abs().sum(0, dtype=acc.dtype)
    return acc


def torch_finalize_scores(acc, weight, n_tokens, group_size=1):
    col = weight.abs().sum(0, dtype=torch.float32)
    s = acc / n_tokens * col
    if group_size > 1:
        s = s.reshape(-1, group_size).mean(1)
    return s


def torch_gather_concat(a, idx_a, b, idx_b, dim, out=None):
    res = torch.cat([a.index_select(dim, idx_a), b.index_select(dim, idx_b)], dim)
    if out is None:
        return res
    out.copy_(res)
    return out


# --------------------------------------------------------------------------- #
# benchmarks
# --------------------------------------------------------------------------- #
IMPLS = ["torch", "triton"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("site", ["mlp", "attn"])
def test_bench_accumulate(benchmark, site, impl, shape, device):
    _skip_unless_runnable(device, impl, shape)
    s = SHAPES[shape]
    C = s["I"] if site == "mlp" else s["H"] * s["h"]
    B, L = _tokens(device, impl, shape)
    x = torch.randn(B, L, C, device=device).to(_dtype(device))
    acc = torch.zeros(C, device=device)
    fn = (lambda: torch_accumulate_abs_(x, acc)) if impl == "torch" else (lambda: cs.accumulate_abs_(x, acc))
    benchmark.group = f"accumulate_abs_ {site} {shape} {device}"
    _run(benchmark, fn, device, x.numel() * x.element_size())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("site", ["mlp", "attn", "attn_tiled"])
def test_bench_finalize(benchmark, site, impl, shape, device):
    _skip_unless_runnable(device, impl, shape)
    if impl == "torch" and site == "attn_tiled":
        pytest.skip("the tiled grouping has no plain torch counterpart here (same cost as 'attn')")
    s = SHAPES[shape]
    d = s["d"]
    if site == "mlp":
        C, gs = s["I"], 1
    else:
        C, gs = s["H"] * s["h"], (s["H"] // s["H_kv"]) * s["h"]
    W = torch.randn(d, C, device=device).to(_dtype(device))
    acc = torch.rand(C, device=device) * 1000
    if impl == "torch":
        fn = lambda: torch_finalize_scores(acc, W, 1000, gs)  # noqa: E731
    else:
        tiled = s["h"] if site == "attn_tiled" else None
        fn = lambda: cs.finalize_scores(acc, W, 1000, group_size=gs, tiled_groups=tiled)  # noqa: E731
    benchmark.group = f"finalize_scores {site} {shape} {device}"
    _run(benchmark, fn, device, W.numel() * W.element_size() + 2 * C * 4)


def _half_split(n: int, device: str, seed: int = 0):
    """Two sorted index lists keeping n units in all (about half from each layer)."""
    g = torch.Generator().manual_seed(seed)
    n_a = n // 2
    ia = torch.randperm(n, generator=g)[:n_a].sort().values
    ib = torch.randperm(n, generator=g)[: n - n_a].sort().values
    return ia.to(device), ib.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["gate_rows", "down_cols", "q_rows"])
def test_bench_gather(benchmark, which, impl, shape, device):
    _skip_unless_runnable(device, impl, shape)
    s = SHAPES[shape]
    d, I, Hh = s["d"], s["I"], s["H"] * s["h"]
    dims = {"gate_rows": ((I, d), 0), "down_cols": ((d, I), 1), "q_rows": ((Hh, d), 0)}
    shp, dim = dims[which]
    if device == "cpu" and impl == "triton":  # interpreter: keep it small
        shp = tuple(min(n, 512) for n in shp)
    dt = _dtype(device)
    a = torch.randn(shp, device=device).to(dt)
    b = torch.randn(shp, device=device).to(dt)
    ia, ib = _half_split(shp[dim], device)
    out = torch.empty_like(a)
    if impl == "torch":
        fn = lambda: torch_gather_concat(a, ia, b, ib, dim, out)  # noqa: E731
    else:
        fn = lambda: gc.gather_concat(a, ia, b, ib, dim, out, validate=False)  # noqa: E731
    benchmark.group = f"gather_concat {which} {shape} {device}"
    _run(benchmark, fn, device, 2 * a.numel() * a.element_size())
