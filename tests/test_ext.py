"""Tests of the optional C++/CUDA extension (come_fast::swiglu_mlp) and of
come_fast.runtime (fallback, fake/autograd registration, use_fused_mlp).

Extension-specific tests are skipped, with the reason, when come_fast._C was
not built (COME_FAST_SKIP_EXT=1, no torch at build time, failed compile) or is
disabled (COME_FAST_DISABLE_EXT=1). CUDA tests run only on a CUDA build.

Accuracy rule (flash-attention's): against a float64 reference, the op's
error must be at most 2x the error of the same computation done with plain
PyTorch in the op's dtype, plus a small atol.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from come_fast import runtime

HAS_EXT = runtime.EXTENSION_AVAILABLE
needs_ext = pytest.mark.skipif(
    not HAS_EXT, reason=f"come_fast._C extension not available: {runtime.EXTENSION_ERROR}"
)
needs_cuda_ext = pytest.mark.skipif(
    not (HAS_EXT and torch.cuda.is_available() and "cuda" in runtime.extension_devices()),
    reason="needs a CUDA device and come_fast._C built with its CUDA kernel",
)

ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def ref_mlp(x, w_gate, w_up, w_down):
    """The semantics, written independently of come_fast: HF LlamaMLP.forward."""
    gate = x @ w_gate.transpose(0, 1)
    up = x @ w_up.transpose(0, 1)
    return (gate * torch.sigmoid(gate) * up) @ w_down.transpose(0, 1)


def make_inputs(shape, inter, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    # Scales of a real MLP: unit-variance activations, Kaiming-like weights.
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    w_gate = torch.randn(inter, d, generator=gen, dtype=torch.float64) * (1.5 / max(d, 1) ** 0.5)
    w_up = torch.randn(inter, d, generator=gen, dtype=torch.float64) / max(d, 1) ** 0.5
    w_down = torch.randn(d, inter, generator=gen, dtype=torch.float64) / max(inter, 1) ** 0.5
    out = [t.to(dtype=dtype, device=device) for t in (x, w_gate, w_up, w_down)]
    if requires_grad:
        out = [t.requires_grad_() for t in out]
    return out


def assert_close_by_rule(op_out, args, dtype):
    """flash-attention rule: err(op) <= 2 * err(plain torch in dtype) + atol, both vs fp64."""
    ref64 = ref_mlp(*[a.detach().double() for a in args])
    plain = ref_mlp(*[a.detach() for a in args])
    err_op = (op_out.detach().double() - ref64).abs().max().item() if op_out.numel() else 0.0
    err_torch = (plain.double() - ref64).abs().max().item() if plain.numel() else 0.0
    assert err_op <= 2 * err_torch + ATOL[dtype], (
        f"{dtype}: op error {err_op:.3g} > 2 x torch error {err_torch:.3g} + {ATOL[dtype]}"
    )
    return err_op, err_torch


# (x shape, I): odd widths, d = 401, leading dims, I = 1, SmolLM2 width
SHAPES = [
    ((7, 64), 100),
    ((2, 41, 401), 1271),
    ((3, 576), 1536),
    ((1, 1, 33), 1),
    ((5, 16), 17),
]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-I{i}" for s, i in SHAPES]


# --------------------------------------------------------------------------
# The op itself (CPU)
# --------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("shape,inter", SHAPES, ids=SHAPE_IDS)
def test_opcheck_cpu(shape, inter):
    args = make_inputs(shape, inter, requires_grad=(inter != 1271))
    # test_schema, test_autograd_registration, test_faketensor, test_aot_dispatch_dynamic
    torch.library.opcheck(torch.ops.come_fast.swiglu_mlp.default, tuple(args))


@needs_ext
@pytest.mark.parametrize("shape,inter", SHAPES, ids=SHAPE_IDS)
def test_values_fp32(shape, inter):
    args = make_inputs(shape, inter)
    out = torch.ops.come_fast.swiglu_mlp(*args)
    assert out.shape == (*shape[:-1], shape[-1]) and out.dtype == torch.float32
    assert out.is_contiguous()
    assert_close_by_rule(out, args, torch.float32)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape,inter", [((2, 41, 401), 1271), ((7, 64), 100)], ids=["odd", "small"])
def test_values_other_dtypes(shape, inter, dtype):
    args = make_inputs(shape, inter, dtype=dtype)
    out = torch.ops.come_fast.swiglu_mlp(*args)
    assert out.dtype == dtype
    assert_close_by_rule(out, args, dtype)


@needs_ext
def test_silu_saturation_and_nan():
    # Large |gate| (exp clamping in the CPU kernel), both signs, and NaN propagation.
    d, inter = 4, 7
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    w_gate = torch.zeros(inter, d)
    w_gate[:, 0] = torch.tensor([0.0, 1e-3, 5.0, 20.0, 87.5, 90.0, 500.0])
    w_up = torch.ones(inter, d)
    w_down = torch.eye(d, inter) + 0.5
    args = (x, w_gate, w_up, w_down)
    assert_close_by_rule(torch.ops.come_fast.swiglu_mlp(*args), args, torch.float32)
    x_nan = torch.tensor([[float("nan"), 0.0, 0.0, 0.0]])
    assert torch.isnan(torch.ops.come_fast.swiglu_mlp(x_nan, w_gate, w_up, w_down)).all()


@needs_ext
def test_zero_width_and_empty_batch():
    x, w_gate, w_up, w_down = make_inputs((2, 3, 64), 0)
    out = torch.ops.come_fast.swiglu_mlp(x, w_gate, w_up, w_down)
    assert out.shape == (2, 3, 64) and torch.equal(out, torch.zeros(2, 3, 64))
    assert torch.equal(out, ref_mlp(x, w_gate, w_up, w_down))  # the empty sum
    x, w_gate, w_up, w_down = make_inputs((0, 64), 100)
    assert torch.ops.come_fast.swiglu_mlp(x, w_gate, w_up, w_down).shape == (0, 64)
    x, w_gate, w_up, w_down = make_inputs((2, 0, 64), 100)
    assert torch.ops.come_fast.swiglu_mlp(x, w_gate, w_up, w_down).shape == (2, 0, 64)


@needs_ext
def test_non_contiguous_and_d_out():
    x, w_gate, w_up, w_down = make_inputs((9, 48), 37)
    xt = x.t().contiguous().t()  # column-major x
    wg = torch.cat([w_gate, w_gate], dim=1)[:, ::2]  # strided weight view
    wg.copy_(w_gate)
    wd = w_down.t().contiguous().t()
    out = torch.ops.come_fast.swiglu_mlp(xt, wg, w_up, wd)
    assert_close_by_rule(out, (x, w_gate, w_up, w_down), torch.float32)
    # d_out != d is accepted: [d_out, I]
    w_down2 = torch.randn(20, 37) / 6
    out2 = torch.ops.come_fast.swiglu_mlp(x, w_gate, w_up, w_down2)
    assert out2.shape == (9, 20)
    assert_close_by_rule(out2, (x, w_gate, w_up, w_down2), torch.float32)


@needs_ext
def test_bad_inputs_raise():
    x, w_gate, w_up, w_down = make_inputs((4, 32), 10)
    op = torch.ops.come_fast.swiglu_mlp
    with pytest.raises(RuntimeError, match="w_gate"):
        op(x, w_gate[:, :31], w_up, w_down)
    with pytest.raises(RuntimeError, match="w_up"):
        op(x, w_gate, w_up[:9], w_down)
    with pytest.raises(RuntimeError, match="w_down"):
        op(x, w_gate, w_up, w_down[:, :9])
    with pytest.raises(RuntimeError, match="dtype"):
        op(x, w_gate.double(), w_up, w_down)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x.int(), w_gate.int(), w_up.int(), w_down.int())


@needs_ext
def test_gradcheck_float64():
    args = make_inputs((2, 3, 6), 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.come_fast.swiglu_mlp, tuple(args))
    # and against autograd through the reference, fp32, odd width
    a = make_inputs((2, 41, 401), 1271, requires_grad=True)
    b = [t.detach().clone().requires_grad_() for t in a]
    gout = torch.randn(2, 41, 401)
    torch.ops.come_fast.swiglu_mlp(*a).backward(gout)
    ref_mlp(*b).backward(gout)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta.grad, tb.grad, rtol=1e-4, atol=1e-5)


@needs_ext
def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 41, 401)
        out = torch.ops.come_fast.swiglu_mlp(x, torch.empty(1271, 401), torch.empty(1271, 401), torch.empty(401, 1271))
    assert out.shape == (2, 41, 401) and out.dtype == torch.float32


@needs_ext
def test_torch_compile_fullgraph():
    # fake kernel + traceable wrapper: no graph break, dynamic shapes
    fn = torch.compile(runtime.swiglu_mlp, backend="aot_eager", dynamic=True, fullgraph=True)
    for shape in [(2, 41, 401), (3, 7, 401)]:
        args = make_inputs(shape, 1271)
        assert_close_by_rule(fn(*args), args, torch.float32)


# --------------------------------------------------------------------------
# Python wrapper / fallback
# --------------------------------------------------------------------------
def test_runtime_wrapper_matches_reference():
    args = make_inputs((2, 41, 401), 1271)
    assert_close_by_rule(runtime.swiglu_mlp(*args), args, torch.float32)


def test_fallback_path_equals_reference(monkeypatch):
    monkeypatch.setattr(runtime, "EXTENSION_AVAILABLE", False)
    args = make_inputs((2, 41, 401), 1271)
    out = runtime.swiglu_mlp(*args)
    # the fallback is HF's expression, bit for bit
    assert torch.equal(out, F.linear(F.silu(F.linear(args[0], args[1])) * F.linear(args[0], args[2]), args[3]))
    assert_close_by_rule(out, args, torch.float32)


def test_autocast_uses_reference_path():
    args = make_inputs((3, 64), 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = runtime.swiglu_mlp(*args)
        ref = runtime.swiglu_mlp_reference(*args)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_env_switch_disables_extension_subprocess():
    code = textwrap.dedent(
        """
        import sys, torch, torch.nn.functional as F
        from come_fast import runtime
        assert not runtime.EXTENSION_AVAILABLE, runtime.EXTENSION_ERROR
        assert "COME_FAST_DISABLE_EXT" in runtime.EXTENSION_ERROR
        assert "come_fast._C" not in sys.modules
        assert runtime.extension_devices() == []
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 41, 401, generator=g)
        wg, wu = torch.randn(1271, 401, generator=g) / 20, torch.randn(1271, 401, generator=g) / 20
        wd = torch.randn(401, 1271, generator=g) / 35
        out = runtime.swiglu_mlp(x, wg, wu, wd)
        assert torch.equal(out, F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd))
        print("OK")
        """
    )
    env = dict(os.environ, COME_FAST_DISABLE_EXT="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


# --------------------------------------------------------------------------
# use_fused_mlp on a tiny Llama
# --------------------------------------------------------------------------
def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    # larger-than-init weights so that the MLP matters in the logits
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _profile_op_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == runtime.OP_NAME)


def test_use_fused_mlp_tiny_llama_logits():
    model = _tiny_llama()
    # merged layers have their own (odd) widths: shrink layer 1 to I = 37
    mlp1 = model.model.layers[1].mlp
    with torch.no_grad():
        mlp1.gate_proj = nn.Linear(64, 37, bias=False)
        mlp1.up_proj = nn.Linear(64, 37, bias=False)
        mlp1.down_proj = nn.Linear(37, 64, bias=False)
        for lin in (mlp1.gate_proj, mlp1.up_proj, mlp1.down_proj):
            lin.weight.normal_(0, 0.08)
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    ref64 = _logits(_tiny_llama_double(model), ids)
    plain = _logits(model, ids)

    assert runtime.use_fused_mlp(model) == 2
    assert runtime.use_fused_mlp(model) == 0  # idempotent
    fused = _logits(model, ids)
    err_fused = (fused.double() - ref64).abs().max().item()
    err_plain = (plain.double() - ref64).abs().max().item()
    assert err_fused <= 2 * err_plain + 1e-5, (err_fused, err_plain)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    if HAS_EXT:
        assert _profile_op_calls(lambda: _logits(model, ids)) == 2  # one call per layer

    # generate() goes through the patched forward too (KV cache, 1-token steps)
    out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)

    assert runtime.restore_mlp(model) == 2
    assert "forward" not in model.model.layers[0].mlp.__dict__
    assert torch.equal(_logits(model, ids), plain)


def _tiny_llama_double(model):
    import copy

    return copy.deepcopy(model).double()


def test_use_fused_mlp_skips_non_swiglu():
    assert runtime.use_fused_mlp(_tiny_llama(hidden_act="gelu")) == 0
    assert runtime.use_fused_mlp(_tiny_llama(mlp_bias=True)) == 0
    m = _tiny_llama()
    m.model.layers[0].mlp.act_fn = nn.GELU()
    assert runtime.use_fused_mlp(m) == 1


def test_fused_forward_respects_hooks():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(2))
    plain = _logits(model, ids)
    runtime.use_fused_mlp(model)
    seen = []
    h = model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = _logits(model, ids)
    h.remove()
    assert seen == [torch.Size([1, 11, 100])]  # hook ran: layer 0 used the original forward
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)
    if HAS_EXT:
        assert _profile_op_calls(lambda: _logits(model, ids)) == 2


class _ScaledLinear(nn.Linear):
    """A wrapper-like subclass with other forward semantics (think LoRA)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_fused_forward_revalidates_replaced_projection():
    import copy

    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(3))
    assert runtime.use_fused_mlp(model) == 2
    clone = copy.deepcopy(model)  # the per-instance patch survives deepcopy
    torch.testing.assert_close(_logits(clone, ids), _logits(model, ids), rtol=0, atol=0)
    mlp = model.model.layers[1].mlp
    old = mlp.up_proj
    mlp.up_proj = _ScaledLinear(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        mlp.up_proj.weight.copy_(old.weight)
    runtime.restore_mlp(clone)
    clone.model.layers[1].mlp.up_proj = copy.deepcopy(mlp.up_proj)
    # layer 1 must now use the original forward (with the doubling), layer 0 stays fused
    torch.testing.assert_close(_logits(model, ids), _logits(clone, ids), rtol=1e-4, atol=1e-4)
    if HAS_EXT:
        assert _profile_op_calls(lambda: _logits(model, ids)) == 1


# --------------------------------------------------------------------------
# CUDA (GPU machines with a CUDA build only)
# --------------------------------------------------------------------------
@needs_cuda_ext
@pytest.mark.parametrize("shape,inter", SHAPES, ids=SHAPE_IDS)
def test_opcheck_cuda(shape, inter):
    args = make_inputs(shape, inter, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.come_fast.swiglu_mlp.default, tuple(args))


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,inter", [((2, 41, 401), 1271), ((4, 128, 576), 1536), ((3, 7), 5)])
def test_values_cuda(shape, inter, dtype):
    args = make_inputs(shape, inter, dtype=dtype, device="cuda")
    out = torch.ops.come_fast.swiglu_mlp(*args)
    torch.cuda.synchronize()
    assert out.device.type == "cuda" and out.dtype == dtype
    assert_close_by_rule(out, args, dtype)


@needs_cuda_ext
def test_cuda_zero_width_and_fused_model():
    x, wg, wu, wd = make_inputs((2, 3, 64), 0, device="cuda")
    assert torch.equal(torch.ops.come_fast.swiglu_mlp(x, wg, wu, wd), torch.zeros(2, 3, 64, device="cuda"))
    model = _tiny_llama().cuda()
    ids = torch.randint(0, 128, (2, 23), device="cuda")
    plain = _logits(model, ids)
    assert runtime.use_fused_mlp(model) == 2
    torch.testing.assert_close(_logits(model, ids), plain, rtol=1e-3, atol=1e-3)
