"""Python side of the optional C++/CUDA extension ``come_fast._C``.

The extension defines one operator::

    come_fast::swiglu_mlp(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down) -> Tensor
        = (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T

x ``[..., d]``, w_gate/w_up ``[I, d]``, w_down ``[d_out, I]`` (``d_out == d``
in every SwiGLU decoder), any intermediate width ``I`` (merged layers have
odd ones, e.g. 1271); ``I == 0`` gives zeros (the empty sum: an MLP with every
channel removed adds nothing to the residual stream). float32, float64,
bfloat16, float16; CPU kernel always, CUDA kernel when the extension was built
against a CUDA torch. The silu*mul step is fused in place (one rounding for
bf16/fp16), so the MLP allocates two ``[N, I]`` buffers instead of four.

This module

* loads the extension when it was built (``pip install --no-build-isolation
  -e .``) unless ``COME_FAST_DISABLE_EXT=1`` is set (read at import time);
* registers the fake (meta) kernel, so the op works under FakeTensor /
  ``torch.compile`` / ``torch.export``, and an autograd formula (recomputing
  the two ``[N, I]`` GEMMs in backward instead of saving them);
* exposes :data:`EXTENSION_AVAILABLE`, :func:`swiglu_mlp` (op, or plain
  PyTorch when the extension, the device kernel or the dtype is missing, or
  autocast is on) and :func:`use_fused_mlp` / :func:`restore_mlp`, and
  :func:`optimize_for_inference` (public as ``come_fast.optimize_for_inference``:
  :func:`use_fused_mlp` where the op can run, else a warning and no change).

It imports cleanly without the extension.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import types
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "EXTENSION_AVAILABLE",
    "EXTENSION_ERROR",
    "OP_NAME",
    "extension_devices",
    "optimize_for_inference",
    "restore_mlp",
    "swiglu_mlp",
    "swiglu_mlp_reference",
    "use_fused_mlp",
]

OP_NAME = "come_fast::swiglu_mlp"
DISABLE_ENV = "COME_FAST_DISABLE_EXT"
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load_extension() -> tuple[bool, str | None]:
    """Import come_fast._C (its static initialisers register the op).

    Returns (available, reason_if_not)."""
    if _env_flag(DISABLE_ENV):
        return False, f"disabled by {DISABLE_ENV}=1"
    try:
        spec = importlib.util.find_spec("come_fast._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return False, "not built (pip install --no-build-isolation -e . with torch installed)"
    try:
        importlib.import_module("come_fast._C")  # static initialisers register torch.ops.come_fast.*
    except (ImportError, OSError) as exc:  # e.g. built against another torch
        reason = f"{type(exc).__name__}: {exc}"
    else:
        try:
            getattr(torch.ops.come_fast, "swiglu_mlp")
        except (AttributeError, RuntimeError) as exc:
            reason = f"come_fast._C loaded but {OP_NAME} is not registered ({exc})"
        else:
            return True, None
    warnings.warn(
        f"come_fast._C is present but unusable ({reason}); falling back to plain PyTorch. "
        "Rebuild it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False, reason


EXTENSION_AVAILABLE, EXTENSION_ERROR = _load_extension()


# ---------------------------------------------------------------------------
# Reference semantics (also the fallback): exactly HF's LlamaMLP.forward.
# ---------------------------------------------------------------------------
def swiglu_mlp_reference(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Plain PyTorch ``down(silu(gate(x)) * up(x))`` with bias-free linears."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


# ---------------------------------------------------------------------------
# Fake kernel + autograd (only when the op exists).
# ---------------------------------------------------------------------------
def _swiglu_fake(x, w_gate, w_up, w_down):
    torch._check(x.dim() >= 1, lambda: "swiglu_mlp: x must have at least 1 dim")
    torch._check(
        w_gate.dim() == 2 and w_up.dim() == 2 and w_down.dim() == 2,
        lambda: "swiglu_mlp: weights must be 2-D",
    )
    torch._check(w_gate.shape[1] == x.shape[-1], lambda: "swiglu_mlp: w_gate must be [I, d]")
    torch._check(
        w_up.shape[0] == w_gate.shape[0] and w_up.shape[1] == w_gate.shape[1],
        lambda: "swiglu_mlp: w_up must have the shape of w_gate",
    )
    torch._check(w_down.shape[1] == w_gate.shape[0], lambda: "swiglu_mlp: w_down must be [d_out, I]")
    torch._check(
        w_gate.dtype == x.dtype and w_up.dtype == x.dtype and w_down.dtype == x.dtype,
        lambda: "swiglu_mlp: all tensors must share x's dtype",
    )
    torch._check(x.dtype in _SUPPORTED_DTYPES, lambda: f"swiglu_mlp: unsupported dtype {x.dtype}")
    return x.new_empty((*x.shape[:-1], w_down.shape[0]))


def _swiglu_setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down = inputs
    # Save only the inputs; backward recomputes the two [N, I] GEMMs.
    ctx.save_for_backward(x, w_gate, w_up, w_down)


def _swiglu_backward(ctx, grad_out):
    x, w_gate, w_up, w_down = ctx.saved_tensors
    need_x, need_wg, need_wu, need_wd = ctx.needs_input_grad
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    go = grad_out.reshape(-1, w_down.shape[0])
    g = x2 @ w_gate.t()
    u = x2 @ w_up.t()
    sig = torch.sigmoid(g)
    s = g * sig  # silu(g)
    dh = go @ w_down  # [N, I]
    dx = dwg = dwu = dwd = None
    if need_wd:
        dwd = go.t() @ (s * u)
    du = dh * s
    dg = dh * u * (sig * (1 + g * (1 - sig)))  # silu'(g)
    if need_x:
        dx = (dg @ w_gate + du @ w_up).reshape(x.shape)
    if need_wg:
        dwg = dg.t() @ x2
    if need_wu:
        dwu = du.t() @ x2
    return dx, dwg, dwu, dwd


def _register_python_side() -> None:
    torch.library.register_fake(OP_NAME, _swiglu_fake)
    torch.library.register_autograd(OP_NAME, _swiglu_backward, setup_context=_swiglu_setup_context)


if EXTENSION_AVAILABLE:
    try:
        _register_python_side()
    except Exception as exc:  # pragma: no cover - torch API drift
        warnings.warn(
            f"could not register the fake/autograd kernels of {OP_NAME} ({exc}); "
            "falling back to plain PyTorch",
            RuntimeWarning,
        )
        EXTENSION_AVAILABLE, EXTENSION_ERROR = False, f"registration failed: {exc}"


_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _kernel_devices() -> frozenset:
    if not EXTENSION_AVAILABLE:
        return frozenset()
    found = set()
    for dev, key in _DEVICE_KEYS.items():
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key):
                found.add(dev)
        except Exception:  # pragma: no cover - private API drift
            if dev == "cpu":
                found.add(dev)
    return frozenset(found)


# Computed once at import (a plain frozenset keeps swiglu_mlp traceable by
# torch.compile without graph breaks).
_KERNEL_DEVICES = _kernel_devices()


def _has_kernel(device_type: str) -> bool:
    return EXTENSION_AVAILABLE and device_type in _KERNEL_DEVICES


def extension_devices() -> list[str]:
    """Device types with a compiled kernel (``[]`` without the extension)."""
    return [dev for dev in _DEVICE_KEYS if _has_kernel(dev)]


# ---------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------
def swiglu_mlp(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """``(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T`` via the extension when
    it can run these tensors, else via :func:`swiglu_mlp_reference`.

    Falls back when: the extension is absent/disabled; the device has no
    compiled kernel (e.g. CUDA tensors with a CPU-only build); the dtypes are
    mixed or unsupported; autocast is on for the device (the op has no
    autocast rule, the reference path casts like HF does)."""
    if EXTENSION_AVAILABLE:
        dev = x.device.type
        dt = x.dtype
        if (
            _has_kernel(dev)
            and dt in _SUPPORTED_DTYPES
            and w_gate.dtype == dt
            and w_up.dtype == dt
            and w_down.dtype == dt
            and not torch.is_autocast_enabled(dev)
        ):
            return torch.ops.come_fast.swiglu_mlp(x, w_gate, w_up, w_down)
    return swiglu_mlp_reference(x, w_gate, w_up, w_down)


# ---------------------------------------------------------------------------
# Model patching
# ---------------------------------------------------------------------------
_FUSED_FLAG = "_come_fast_fused_mlp"
_ORIG_FORWARD = "_come_fast_orig_forward"


def _is_silu(act) -> bool:
    if isinstance(act, nn.SiLU) or act is F.silu:
        return True
    # transformers' ACT2FN["silu"] is transformers.activations.SiLUActivation
    # (a plain F.silu module, kernel-hub decorated); "swish" is nn.SiLU.
    return type(act).__name__ == "SiLUActivation" and type(act).__module__.startswith("transformers")


def _plain_linear(m) -> bool:
    # Exact type: subclasses (bitsandbytes Linear4bit, LoRA wrappers, ...) have
    # other forward semantics and are left alone.
    return type(m) is nn.Linear and m.bias is None and m.weight.dtype in _SUPPORTED_DTYPES


def _is_fusable(mod: nn.Module) -> bool:
    g, u, d = (getattr(mod, a, None) for a in ("gate_proj", "up_proj", "down_proj"))
    if not (_plain_linear(g) and _plain_linear(u) and _plain_linear(d)):
        return False
    if not _is_silu(getattr(mod, "act_fn", None)):
        return False
    w = g.weight
    return (
        u.weight.shape == w.shape
        and d.weight.shape[1] == w.shape[0]
        and u.weight.dtype == w.dtype == d.weight.dtype
        and u.weight.device == w.device == d.weight.device
    )


_CHECKED = "_come_fast_checked_parts"


def _parts(mod: nn.Module):
    mods = mod.__dict__["_modules"]
    act = mods["act_fn"] if "act_fn" in mods else getattr(mod, "act_fn", None)
    return mods.get("gate_proj"), mods.get("up_proj"), mods.get("down_proj"), act


def _has_hooks(parts) -> bool:
    for m in parts:
        if isinstance(m, nn.Module) and (
            m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        ):
            return True
    from torch.nn.modules import module as _module

    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def _fused_forward(self, x, *args, **kwargs):
    # Anything unusual runs the module's original forward, so nothing is
    # bypassed: extra arguments, hooks on the projections (e.g. activation
    # capture during calibration), a projection replaced by a wrapper or a
    # quantised layer after fusing (re-validated whenever a submodule changes).
    parts = _parts(self)
    if args or kwargs:
        return self._come_fast_call_original(x, *args, **kwargs)
    if parts != self.__dict__.get(_CHECKED):
        if not _is_fusable(self):
            return self._come_fast_call_original(x)
        self.__dict__[_CHECKED] = parts
    if _has_hooks(parts):
        return self._come_fast_call_original(x)
    return swiglu_mlp(x, parts[0].weight, parts[1].weight, parts[2].weight)


def _call_original(self, *args, **kwargs):
    orig = self.__dict__.get(_ORIG_FORWARD)
    if orig is not None:
        return orig(*args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def use_fused_mlp(model: nn.Module) -> int:
    """Route every SwiGLU MLP of ``model`` through :func:`swiglu_mlp`.

    A module qualifies when it has ``gate_proj``, ``up_proj``, ``down_proj``
    (plain bias-free ``nn.Linear`` of one dtype/device, any intermediate width,
    so merged/pruned layers of different widths all qualify) and a SiLU
    ``act_fn`` (Llama, Mistral, Qwen2, Qwen3 MLPs; also MoE experts of that
    form). Others (GELU, ``mlp_bias=True``, quantised or LoRA-wrapped
    projections) are left unchanged. The patch is per instance (``forward``
    attribute), survives ``.to()``, and falls back to the original forward at
    call time when hooks are attached to the projections.

    Returns the number of modules patched by this call (modules patched by an
    earlier call are not counted again). Without the extension the patched
    forward computes the same plain PyTorch expression as HF. Undo with
    :func:`restore_mlp`.
    """
    n = 0
    for mod in model.modules():
        if getattr(mod, _FUSED_FLAG, False) or not _is_fusable(mod):
            continue
        # Keep an instance-level forward someone else installed (else None:
        # the class forward is used).
        mod.__dict__[_ORIG_FORWARD] = mod.__dict__.get("forward")
        mod._come_fast_call_original = types.MethodType(_call_original, mod)
        mod.forward = types.MethodType(_fused_forward, mod)
        mod.__dict__[_CHECKED] = _parts(mod)
        mod.__dict__[_FUSED_FLAG] = True
        n += 1
    return n


def restore_mlp(model: nn.Module) -> int:
    """Undo :func:`use_fused_mlp`; returns the number of modules restored."""
    n = 0
    for mod in model.modules():
        if not mod.__dict__.get(_FUSED_FLAG, False):
            continue
        orig = mod.__dict__.pop(_ORIG_FORWARD, None)
        del mod.__dict__["forward"]
        mod.__dict__.pop("_come_fast_call_original", None)
        mod.__dict__.pop(_CHECKED, None)
        if orig is not None:
            mod.forward = orig
        del mod.__dict__[_FUSED_FLAG]
        n += 1
    return n


def _unusable_reason(device_type: str) -> str:
    if not EXTENSION_AVAILABLE:
        return f"come_fast._C is not available: {EXTENSION_ERROR or 'not loaded'}"
    built = ", ".join(extension_devices()) or "no device"
    return f"come_fast._C has no {device_type} kernel (built for {built})"


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Route every SwiGLU MLP of ``model`` through the C++ extension op
    ``come_fast::swiglu_mlp``, whatever its intermediate width (merged and
    pruned layers of different widths included), and return ``model`` (patched
    in place: :func:`use_fused_mlp`; undo with :func:`restore_mlp`).

    Outputs are unchanged up to float rounding; what changes is speed (the
    silu*mul step fused in place, two ``[N, I]`` buffers fewer per MLP).
    Where the op cannot run on the model's device (extension not built,
    disabled by ``COME_FAST_DISABLE_EXT=1``, a CPU-only build with the model on
    CUDA) this is a no-op that warns (``RuntimeWarning``) and returns the model
    unchanged; it also warns when no MLP qualifies (GELU, biased or quantised
    projections: see :func:`use_fused_mlp`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects a torch.nn.Module, got {type(model).__name__}")
    devices = sorted({p.device.type for p in model.parameters()})
    usable = [d for d in devices if _has_kernel(d)]
    if not usable:
        why = "; ".join(_unusable_reason(d) for d in devices) or "the model has no parameters"
        fix = (f"unset {DISABLE_ENV}" if _env_flag(DISABLE_ENV) else
               "build the extension with `pip install --no-build-isolation -e .` (with CUDA torch and nvcc "
               "for a CUDA kernel)")
        warnings.warn(
            f"optimize_for_inference: {why}. The model is returned unchanged (plain PyTorch MLPs); {fix}.",
            RuntimeWarning,
            stacklevel=2,
        )
        return model
    for d in devices:
        if d not in usable:
            warnings.warn(
                f"optimize_for_inference: {_unusable_reason(d)}; the MLPs on {d} keep running plain PyTorch",
                RuntimeWarning,
                stacklevel=2,
            )
    use_fused_mlp(model)
    if not any(m.__dict__.get(_FUSED_FLAG, False) for m in model.modules()):
        warnings.warn(
            "optimize_for_inference: no MLP of this model qualifies (gate_proj/up_proj/down_proj as plain "
            "bias-free nn.Linear with a SiLU act_fn); the model is returned unchanged",
            RuntimeWarning,
            stacklevel=2,
        )
    return model
