"""come_fast.optimize_for_inference: every SwiGLU MLP, whatever its width,
through the extension op come_fast::swiglu_mlp; the same logits (to float
rounding); a warning and no change where the op cannot run."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import come_fast
from come_fast import runtime
from tiny import tiny_model, tokens

HAS_EXT = runtime.EXTENSION_AVAILABLE and "cpu" in runtime.extension_devices()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"come_fast._C not available: {runtime.EXTENSION_ERROR}")


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _op_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == runtime.OP_NAME)


def _patched(model) -> list[bool]:
    return [("forward" in layer.mlp.__dict__) for layer in model.model.layers]


def _assert_same_logits(model, ids, before):
    """Against a float64 copy: the optimized model's error at most 2x plain float32's (+ a small atol)."""
    import copy

    ref = copy.deepcopy(model)
    runtime.restore_mlp(ref)
    ref64 = _logits(ref.double(), ids)
    after = _logits(model, ids)
    err_after = (after.double() - ref64).abs().max().item()
    err_before = (before.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    assert err_after <= 2 * err_before + 1e-6 * scale, (err_after, err_before)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5 * scale)
    return after


def test_public_and_documented():
    assert "optimize_for_inference" in come_fast.__all__
    assert come_fast.optimize_for_inference is runtime.optimize_for_inference
    from come_fast import optimize_for_inference  # noqa: F401  (module __getattr__ serves from-imports too)

    assert "come_fast::swiglu_mlp" in come_fast.optimize_for_inference.__doc__
    with pytest.raises(AttributeError):
        come_fast.no_such_name  # noqa: B018
    with pytest.raises(TypeError, match="nn.Module"):
        come_fast.optimize_for_inference("smollm2-135m")


@needs_ext
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tiny_model_same_logits_through_the_op(family, one_thread):
    model = tiny_model(family)
    ids = tokens(n=3, T=17)
    before = _logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the extension is there: no warning
        out = come_fast.optimize_for_inference(model)
    assert out is model
    assert _patched(model) == [True] * 6
    _assert_same_logits(model, ids, before)
    assert _op_calls(lambda: _logits(model, ids)) == 6  # one op call per layer, none through plain PyTorch
    # twice is harmless: nothing patched twice, same outputs
    assert come_fast.optimize_for_inference(model) is model
    torch.testing.assert_close(_logits(model, ids), _logits(model, ids), rtol=0, atol=0)
    assert runtime.restore_mlp(model) == 6
    assert torch.equal(_logits(model, ids), before)


def _narrow_mlp(mlp, width: int, seed: int):
    """Keep ``width`` of the MLP's channels (what merging/pruning leaves): new projections."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(mlp.gate_proj.out_features, generator=g)[:width].sort().values
    d = mlp.gate_proj.in_features
    gate, up, down = nn.Linear(d, width, bias=False), nn.Linear(d, width, bias=False), nn.Linear(width, d, bias=False)
    with torch.no_grad():
        gate.weight.copy_(mlp.gate_proj.weight[keep])
        up.weight.copy_(mlp.up_proj.weight[keep])
        down.weight.copy_(mlp.down_proj.weight[:, keep])
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down


WIDTHS = [96, 64, 37, 1, 80, 17]  # per layer: the original, multiples of 16, odd widths, a single channel


@needs_ext
def test_mlps_of_different_widths_per_layer(one_thread):
    model = tiny_model("llama")
    for i, (layer, w) in enumerate(zip(model.model.layers, WIDTHS)):
        if w != layer.mlp.gate_proj.out_features:
            _narrow_mlp(layer.mlp, w, seed=i)
    assert [l.mlp.gate_proj.out_features for l in model.model.layers] == WIDTHS
    ids = tokens(n=2, T=19)
    before = _logits(model, ids)
    # greedy generation with the KV cache, before
    prompt = ids[:, :5]
    gen_before = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                min_new_tokens=6, do_sample=False, pad_token_id=0)

    assert come_fast.optimize_for_inference(model) is model
    assert _patched(model) == [True] * len(WIDTHS)
    _assert_same_logits(model, ids, before)
    assert _op_calls(lambda: _logits(model, ids)) == len(WIDTHS)
    gen_after = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                               min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen_after.shape == (2, 11)
    assert torch.equal(gen_after, gen_before)


def test_without_extension_warns_and_returns_model_unchanged(monkeypatch):
    # what runtime uses to decide whether the op exists
    monkeypatch.setattr(runtime, "EXTENSION_AVAILABLE", False)
    monkeypatch.setattr(runtime, "EXTENSION_ERROR", "disabled by COME_FAST_DISABLE_EXT=1")
    model = tiny_model("llama")
    ids = tokens(n=2, T=9)
    before = _logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"come_fast\._C is not available: disabled by COME_FAST_DISABLE_EXT=1"
                                            r".*returned unchanged"):
        out = come_fast.optimize_for_inference(model)
    assert out is model
    assert _patched(model) == [False] * 6  # no forward replaced
    assert not any(m.__dict__.get("_come_fast_fused_mlp") for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, ids), before)


def test_no_kernel_for_the_models_device_warns(monkeypatch):
    # an extension built for CUDA only, the model on the CPU
    monkeypatch.setattr(runtime, "EXTENSION_AVAILABLE", True)
    monkeypatch.setattr(runtime, "_KERNEL_DEVICES", frozenset({"cuda"}))
    model = tiny_model("llama")
    with pytest.warns(RuntimeWarning, match="has no cpu kernel .built for cuda."):
        assert come_fast.optimize_for_inference(model) is model
    assert _patched(model) == [False] * 6


@needs_ext
def test_no_swiglu_mlp_warns():
    model = tiny_model("llama", hidden_act="gelu")
    with pytest.warns(RuntimeWarning, match="no MLP of this model qualifies"):
        assert come_fast.optimize_for_inference(model) is model
    assert _patched(model) == [False] * 6


def test_import_does_not_load_the_extension():
    code = textwrap.dedent(
        """
        import sys
        import come_fast
        assert "come_fast.runtime" not in sys.modules and "come_fast._C" not in sys.modules
        f = come_fast.optimize_for_inference
        assert "come_fast.runtime" in sys.modules and f.__module__ == "come_fast.runtime"
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "COME_FAST_DISABLE_EXT"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
