"""The chunked linear + KL distillation loss (``come_fast.linear_kl`` and the Triton
``come_fast.kernels.linear_kl``) against the plain PyTorch KL on materialised logits.

Reference: ``T^2 * F.kl_div(log_softmax(z_s / T), log_softmax(z_t / T), log_target=True,
reduction="batchmean")`` with ``z_s = h W^T + b`` and the teacher's logits computed without
gradient (``come_fast.distill.loss_terms``' KL term), written out here independently.

Tolerance rule (flash-attention's, as in tests/test_kernels.py): the op's max error
against a float64 reference (the same inputs upcast) must be at most twice the error of
the plain PyTorch computation in the op's dtype against that reference, plus a small
atol.  float32 on the PyTorch path and on the Triton path (interpreted on CPU:
``TRITON_INTERPRET=1``, small shapes); bfloat16 only on a CUDA device.
"""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from come_fast import dispatch
from come_fast.distill import LossWeights, loss_terms
from come_fast.linear_kl import default_chunk_size, torch_linear_kl

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_INTERP = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no")
CUDA = torch.cuda.is_available()

try:
    import triton  # noqa: F401

    lk = importlib.import_module("come_fast.kernels.linear_kl")
    if not CUDA and _INTERP and not lk._INTERPRET:
        # defined before the interpreter flag was set (another module imported it): define again
        lk = importlib.reload(lk)
    _TRITON_SKIP = None if (CUDA or _INTERP) else "no CUDA device and TRITON_INTERPRET=0"
except Exception as exc:  # triton missing
    lk = None
    _TRITON_SKIP = f"Triton kernels unavailable ({type(exc).__name__}: {exc})"

DEVICE = "cuda" if (CUDA and not _INTERP) else "cpu"

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: see conftest


def triton_linear_kl(*args, **kw):
    if _TRITON_SKIP:
        pytest.skip(_TRITON_SKIP)
    return lk.linear_kl(*args, **kw)


IMPLS = {"torch": torch_linear_kl, "triton": triton_linear_kl}


# --------------------------------------------------------------------------- #
# reference and helpers
# --------------------------------------------------------------------------- #
def naive_kl(h, W, b=None, *, t_h=None, t_w=None, t_b=None, t_logits=None, T=1.0):
    """The materialised KL (loss_terms' formula): logits in the inputs' dtype, softmax math in
    float32 (float64 when the inputs are float64)."""
    up = torch.float64 if h.dtype == torch.float64 else torch.float32
    zs = F.linear(h, W, b).to(up)
    with torch.no_grad():
        zt = t_logits if t_logits is not None else F.linear(t_h, t_w, t_b)
        zt = zt.to(up)
    zs, zt = zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1])
    return T * T * F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), log_target=True,
                            reduction="batchmean")


def make(N, d, V, *, dtype=torch.float32, bias=True, teacher="hidden", d_t=None, seed=0, device=DEVICE,
         scale=2.0):
    """Random inputs with logits of std ~scale (a KL of order 1: far from 0 and from saturation)."""
    g = torch.Generator().manual_seed(seed)
    d_t = d_t or d
    x = {
        "h": torch.randn(N, d, generator=g),
        "W": torch.randn(V, d, generator=g) * (scale / d ** 0.5),
        "b": torch.randn(V, generator=g) * 0.5 if bias else None,
    }
    if teacher == "hidden":
        x["t_h"] = torch.randn(N, d_t, generator=g)
        x["t_w"] = torch.randn(V, d_t, generator=g) * (scale / d_t ** 0.5)
        x["t_b"] = torch.randn(V, generator=g) * 0.5 if bias else None
    else:
        x["t_logits"] = torch.randn(N, V, generator=g) * scale
    return {k: (v.to(device=device, dtype=dtype) if v is not None else None) for k, v in x.items()}


def leaves(x, names=("h", "W", "b")):
    out = {}
    for k, v in x.items():
        if v is None:
            out[k] = None
        else:
            v = v.detach().clone()
            out[k] = v.requires_grad_(k in names)
    return out


def teacher_kw(x):
    if "t_logits" in x:
        return {"teacher_logits": x["t_logits"]}
    return {"teacher_hidden": x["t_h"], "teacher_weight": x["t_w"], "teacher_bias": x["t_b"]}


def run_naive(x, T, upstream):
    kw = {k: x[k] for k in ("t_h", "t_w", "t_b", "t_logits") if k in x}
    loss = naive_kl(x["h"], x["W"], x["b"], T=T, **kw)
    (loss * upstream).backward()
    return loss.detach(), {k: x[k].grad for k in ("h", "W", "b") if x[k] is not None}


def run_op(fn, x, T, upstream, **kw):
    loss = fn(x["h"], x["W"], x["b"], temperature=T, **teacher_kw(x), **kw)
    (loss * upstream).backward()
    return loss.detach(), {k: x[k].grad for k in ("h", "W", "b") if x[k] is not None}


def upcast(x):
    return {k: (v.detach().double() if v is not None else None) for k, v in x.items()}


_ATOL_ULPS = {torch.float32: 2, torch.bfloat16: 8}


def run_naive_rows(x, T, upstream, chunk):
    """The materialised KL in the same dtype, computed over the same row blocks as the op's chunks
    (each block's batchmean weighted by its share of the rows): PyTorch's own GEMMs of those shapes.
    A BLAS may round a GEMM of a few rows differently from one of many (MKL on an AMD EPYC:
    a [5, 49153] x [49153, 16] product has 12x the error of the [12, 49153] one), so PyTorch's own
    error at the op's shapes belongs in the rule's baseline."""
    kw = {k: x[k] for k in ("t_h", "t_w", "t_b", "t_logits") if k in x}
    N = x["h"].shape[0]
    loss = 0
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        part = {k: (v[s:e] if k in ("t_h", "t_logits") else v) for k, v in kw.items()}
        loss = loss + naive_kl(x["h"][s:e], x["W"], x["b"], T=T, **part) * ((e - s) / N)
    (loss * upstream).backward()
    return loss.detach(), {k: x[k].grad for k in ("h", "W", "b") if x[k] is not None}


def assert_tol(out, torch_out, ref64, what, dtype):
    """flash-attention rule: err(op) <= 2 * err(PyTorch in the same dtype) + atol; ``torch_out``
    may be several PyTorch results (whole, and by the op's row blocks): the larger error counts."""
    err_o = (out.double() - ref64).abs().max().item()
    outs = torch_out if isinstance(torch_out, (list, tuple)) else [torch_out]
    err_t = max((t.double() - ref64).abs().max().item() for t in outs)
    atol = _ATOL_ULPS[dtype] * torch.finfo(torch.float32).eps * ref64.abs().max().item() + 1e-30
    assert err_o <= 2 * err_t + atol, f"{what}: op err {err_o:.3e} > 2 x PyTorch err {err_t:.3e} + {atol:.1e}"


def check_against_naive(fn, x, T, upstream, dtype=torch.float32, **kw):
    ref_in = leaves(upcast(x))
    l64, g64 = run_naive(ref_in, T, upstream)
    lt, gt = run_naive(leaves(x), T, upstream)
    chunk = kw.get("chunk_size")
    lc, gc = run_naive_rows(leaves(x), T, upstream, chunk) if chunk else (lt, gt)
    lo, go = run_op(fn, leaves(x), T, upstream, **kw)
    assert lo.dtype == torch.float32 and lo.dim() == 0
    assert torch.isfinite(lo) and l64.item() > 0.05  # a real KL, not a degenerate 0
    assert_tol(lo, [lt, lc], l64, "loss", dtype)
    for k in g64:
        assert go[k].dtype == x[k].dtype and go[k].shape == x[k].shape
        assert g64[k].abs().max() > 0
        assert_tol(go[k], [gt[k], gc[k]], g64[k], f"grad {k}", dtype)
    return lo, go


# --------------------------------------------------------------------------- #
# float32: values and gradients against the materialised KL
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_naive_fp32(impl, teacher, T, bias):
    # N=37 in chunks of 16 (the last one ragged); on Triton vocab blocks of 256 over V=1031
    # (the last one ragged): the chunking and the online log-sum-exp are both exercised
    x = make(37, 48, 1031, bias=bias, teacher=teacher, seed=int(T * 10) + 3 * bias)
    kw = {"chunk_size": 16}
    if impl == "triton":
        kw["block_v"] = 256
    check_against_naive(IMPLS[impl], x, T, upstream=3.7, **kw)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_default_chunking_and_one_vocab_block(impl):
    x = make(37, 48, 1031, teacher="hidden", d_t=64, seed=7)  # a teacher of another width
    check_against_naive(IMPLS[impl], x, 1.5, upstream=1.0)


@pytest.mark.parametrize("teacher,N,chunk", [("hidden", 12, 5), ("logits", 12, 5), ("hidden", 64, None)])
def test_odd_vocab_49153_torch_path(teacher, N, chunk):
    # 64 rows in one default chunk: 3.1M terms summed, where a flat float32 dot would drift
    x = make(N, 16, 49153, teacher=teacher, seed=11, device="cpu")
    check_against_naive(torch_linear_kl, x, 2.0, upstream=-0.6, chunk_size=chunk)
    assert default_chunk_size(4096, 49153) == 336  # 2^24 // 49153 = 341, rounded down to a multiple of 16


def test_odd_vocab_triton_path():
    # the odd vocabulary on the kernel, a size the interpreter handles: V = 4099 (prime), blocks of 1024
    x = make(9, 16, 4099, teacher="logits", seed=12)
    check_against_naive(triton_linear_kl, x, 2.0, upstream=3.7, chunk_size=4, block_v=1024)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_batched_shapes_and_upstream_gradient_scales(impl):
    """[B, S, d] inputs (as distill passes them); the gradient is linear in the upstream gradient."""
    x = make(30, 24, 300, teacher="logits", seed=5)
    xb = dict(x, h=x["h"].reshape(5, 6, 24), t_logits=x["t_logits"].reshape(5, 6, 300))
    ref = naive_kl(x["h"], x["W"], x["b"], t_logits=x["t_logits"], T=2.0)
    a = leaves(xb)
    la, ga = run_op(IMPLS[impl], a, 2.0, 1.0, chunk_size=7)
    b = leaves(xb)
    lb, gb = run_op(IMPLS[impl], b, 2.0, 3.7, chunk_size=7)
    torch.testing.assert_close(la, ref, rtol=1e-5, atol=1e-6)
    assert ga["h"].shape == (5, 6, 24)
    for k in ga:
        torch.testing.assert_close(gb[k], 3.7 * ga[k], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_teacher_is_constant_and_untouched(impl):
    """A teacher head that is the student's own tensor (tied, requires grad): only the student
    side is differentiated (as loss_terms with targets under no_grad); teacher logits given
    as a float32 tensor are not written to (T=1: no copy would be needed for the math)."""
    x = make(20, 16, 257, teacher="hidden", seed=3)
    s = leaves(x)
    loss = IMPLS[impl](s["h"], s["W"], s["b"], teacher_hidden=x["t_h"], teacher_weight=s["W"], teacher_bias=s["b"],
                       chunk_size=8)
    loss.backward()
    r = leaves(x)
    ref = naive_kl(r["h"], r["W"], r["b"], t_h=x["t_h"], t_w=r["W"], t_b=r["b"])
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    for k in ("h", "W", "b"):
        torch.testing.assert_close(s[k].grad, r[k].grad, rtol=1e-4, atol=1e-7)
    zt = (torch.randn(20, 257, generator=torch.Generator().manual_seed(1)) * 2).to(DEVICE)
    keep = zt.clone()
    t = leaves(x)
    IMPLS[impl](t["h"], t["W"], t["b"], teacher_logits=zt, chunk_size=8).backward()
    assert torch.equal(zt, keep)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_only_the_requested_gradients_and_no_grad_mode(impl):
    x = make(20, 16, 129, teacher="logits", seed=4)
    ref = float(naive_kl(x["h"], x["W"], x["b"], t_logits=x["t_logits"], T=2.0))
    s = leaves(x, names=("h",))  # frozen head, the hierarchical distillation's case
    loss = IMPLS[impl](s["h"], s["W"], s["b"], teacher_logits=x["t_logits"], temperature=2.0, chunk_size=6)
    loss.backward()
    assert s["h"].grad is not None and s["W"].grad is None and s["b"].grad is None
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5)
    w = leaves(x)
    with torch.no_grad():
        l2 = IMPLS[impl](w["h"], w["W"], w["b"], teacher_logits=x["t_logits"], temperature=2.0, chunk_size=6)
    assert not l2.requires_grad and float(l2) == pytest.approx(ref, rel=1e-5)


def test_identical_distributions_give_zero():
    x = make(10, 16, 300, teacher="hidden", seed=9)
    loss = torch_linear_kl(x["h"], x["W"], x["b"], teacher_hidden=x["h"], teacher_weight=x["W"],
                           teacher_bias=x["b"], temperature=3.0)
    assert abs(float(loss)) < 1e-5


class _MaxBytes(TorchDispatchMode):
    """Records the largest tensor (in bytes) any ATen op produces (the Triton interpreter's
    host copies of a kernel argument's storage are uint8 tensors of the storage's bytes)."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("impl", list(IMPLS))
def test_never_materialises_the_full_logits(impl):
    N, d, V, chunk = 64, 16, 1000, 8
    x = make(N, d, V, teacher="hidden", seed=6)
    s = leaves(x)
    with _MaxBytes() as m:
        loss = IMPLS[impl](s["h"], s["W"], s["b"], teacher_hidden=x["t_h"], teacher_weight=x["t_w"],
                           teacher_bias=x["t_b"], chunk_size=chunk)
        loss.backward()
    # one chunk of float32 logits (or the head's own gradient), never N x V
    assert m.max <= 4 * max(chunk * V, V * d)
    with _MaxBytes() as m2:
        naive_kl(x["h"], x["W"], x["b"], t_h=x["t_h"], t_w=x["t_w"], t_b=x["t_b"])
    assert m2.max >= 4 * N * V  # the detector sees the naive loss's [N, V] logits


def test_bad_input():
    x = make(6, 8, 50, teacher="hidden", device="cpu")
    h, W = x["h"], x["W"]
    with pytest.raises(ValueError, match="exactly one"):
        torch_linear_kl(h, W)
    with pytest.raises(ValueError, match="exactly one"):
        torch_linear_kl(h, W, teacher_hidden=x["t_h"], teacher_weight=x["t_w"], teacher_logits=torch.zeros(6, 50))
    with pytest.raises(ValueError, match="needs teacher_weight"):
        torch_linear_kl(h, W, teacher_hidden=x["t_h"])
    with pytest.raises(ValueError, match="vocabulary 49"):
        torch_linear_kl(h, W, teacher_logits=torch.zeros(6, 49))
    with pytest.raises(ValueError, match="5 teacher tokens for 6"):
        torch_linear_kl(h, W, teacher_logits=torch.zeros(5, 50))
    with pytest.raises(ValueError, match="hidden states end in 7"):
        torch_linear_kl(h[:, :7], W, teacher_logits=torch.zeros(6, 50))
    with pytest.raises(ValueError, match="temperature"):
        torch_linear_kl(h, W, teacher_logits=torch.zeros(6, 50), temperature=0)
    with pytest.raises(ValueError, match="no tokens"):
        torch_linear_kl(h[:0], W, teacher_logits=torch.zeros(0, 50))
    with pytest.raises(ValueError, match="chunk_size"):
        torch_linear_kl(h, W, teacher_logits=torch.zeros(6, 50), chunk_size=0)


# --------------------------------------------------------------------------- #
# dispatch and the distillation loss
# --------------------------------------------------------------------------- #
def test_dispatch_picks_the_path():
    assert dispatch.Ops("torch").linear_kl is torch_linear_kl
    assert dispatch.Ops("auto", "cpu").linear_kl is torch_linear_kl
    if _TRITON_SKIP is None:
        import come_fast.kernels as K

        assert dispatch.Ops("triton", DEVICE).linear_kl is K.linear_kl
        if CUDA:
            assert dispatch.Ops("auto", "cuda").linear_kl is K.linear_kl


@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_distill_loss_terms_fused_equals_materialised(teacher):
    """loss_terms with the head keys (the fused op) gives the same terms and gradients as with
    the materialised logits it replaces."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 16, generator=g)
    W = torch.randn(301, 16, generator=g) * 0.5
    b = torch.randn(301, generator=g) * 0.1
    t_h = torch.randn(2, 9, 16, generator=g)
    t_w = torch.randn(301, 16, generator=g) * 0.5
    labels = torch.randint(0, 301, (2, 9), generator=g)
    w = LossWeights(mse=0.0, kl=0.7, ce=0.3, temperature=2.0)

    def terms(fused):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        zt = F.linear(t_h, t_w)
        if fused:
            out = {"head_input": hh, "head_weight": WW, "head_bias": b, "labels": labels}
            out.update({"logits_target": zt} if teacher == "logits" else
                       {"head_input_target": t_h, "head_weight_target": t_w, "head_bias_target": None})
        else:
            out = {"logits": F.linear(hh, WW, b), "logits_target": zt, "labels": labels}
        t = loss_terms(out, w)
        sum(t.values()).backward()
        return {k: v.detach() for k, v in t.items()}, hh.grad, WW.grad

    tf, ghf, gwf = terms(True)
    tm, ghm, gwm = terms(False)
    assert set(tf) == set(tm) == {"kl", "ce"}
    for k in tm:
        torch.testing.assert_close(tf[k], tm[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ghf, ghm, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gwf, gwm, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- #
# bfloat16 (CUDA only)
# --------------------------------------------------------------------------- #
@pytest.mark.skipif(not CUDA or _INTERP,
                    reason="bfloat16 is checked on a CUDA device only (the Triton interpreter mishandles bf16, "
                           "and CPU bf16 matmuls are not the target); run benchmarks/gpu_check.sh on a GPU")
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_matches_naive_bf16_cuda(impl, teacher):
    x = make(1000, 576, 49153, dtype=torch.bfloat16, teacher=teacher, seed=21, device="cuda")
    check_against_naive(IMPLS[impl], x, 2.0, upstream=3.7, dtype=torch.bfloat16, chunk_size=256)
