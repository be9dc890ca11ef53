"""The public surface: compress, save, load, load_model, evaluate.

Validates input and raises clear errors; picks the method from the registry.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import methods
from .adapters import adapter_for, count_parameters, layer_parameters
from . import logs, posttrain, sublayers
from .calibration import calibration_tokens, check_calibration_sizes
from .checkpoint import read_meta, save_checkpoint
from .devicemap import Placement, home_device
from .dispatch import Ops
from .models import load_model

log = logs.get("compress")


@dataclass
class CompressionResult:
    model: Any
    provenance: list
    achieved_ratio: float
    report: list
    tokenizer: Any = None
    method: str = "come"
    settings: dict = field(default_factory=dict)
    layers_before: int = 0
    layers_after: int = 0
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    base_model: str | None = None  # the model compressed (hub id or folder), for the card and come_fast.json
    command: str | None = None     # the command line that made it (come-fast compress), for the card
    evaluation: dict | None = None  # an ``evaluate`` result (or several by name): the card shows it

    def summary(self) -> str:
        ex = (self.settings or {}).get("exact")
        removed = (f"{100 * self.achieved_ratio:.2f}% removed, target {100 * ex['ratio']:.2f}%, MLP widths "
                   f"{min(ex['widths'])}-{max(ex['widths'])}" if ex else f"{100 * self.achieved_ratio:.1f}% removed")
        return (f"{self.method}: {self.layers_before} -> {self.layers_after} layers, "
                f"{self.params_before / 1e6:.1f}M -> {self.params_after / 1e6:.1f}M parameters "
                f"({removed}) in {self.seconds:.1f} s")


class RatioError(ValueError):
    pass


ROUNDINGS = ("nearest", "down", "up")


def removals_for_ratio(model, ratio: float, rounding: str = "nearest") -> int:
    """Whole-layer steps that meet ``ratio`` (removed / total parameters,
    embeddings included). ``rounding``: "nearest" (default), "down" (remove at
    most ``ratio``) or "up" (at least ``ratio``). The achieved ratio is reported."""
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio < 1) or math.isnan(ratio):
        raise RatioError(f"ratio must be a number in (0, 1), got {ratio!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(map(repr, ROUNDINGS))}, got {rounding!r}")
    a = adapter_for(model)
    total = count_parameters(model)
    per_layer = layer_parameters(a.layers[0])
    exact = ratio * total / per_layer
    k = {"nearest": round(exact), "down": math.floor(exact), "up": math.ceil(exact)}[rounding]
    L = len(a.layers)
    if k < 1:
        raise RatioError(f"ratio {ratio} is less than one layer ({per_layer / total:.3%} of the parameters): nothing to remove")
    if k > L - 1:
        raise RatioError(f"ratio {ratio} would remove {k} of {L} layers: not reachable by depth compression")
    return k


def _find_tokenizer(model):
    try:
        from transformers import AutoTokenizer

        src = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        return AutoTokenizer.from_pretrained(src) if src else None
    except Exception:
        return None


DISTILL_VALIDATORS = {"distill_lr": methods.learning_rate, "distill_mse": methods.number(0),
                      "distill_kl": methods.number(0), "distill_ce": methods.number(0),
                      "distill_batch": methods.positive_int,
                      **posttrain.OPTION_VALIDATORS}  # data, budget, validation, schedule, resume
DISTILL_OPTIONS = frozenset(DISTILL_VALIDATORS)
LS_VALIDATORS = methods.LS_VALIDATORS
LS_OPTIONS = frozenset(LS_VALIDATORS)


def split_options(method: str, options: dict) -> tuple[dict, dict]:
    """``compress``'s ``**options`` as (the method's options with the ls_*
    compensation settings, the distillation options); one that neither the
    method, the compensation nor the distillation reads raises."""
    dopts = {k: v for k, v in options.items() if k.startswith("distill_")}
    bad = set(dopts) - DISTILL_OPTIONS
    if bad:
        raise ValueError(f"unknown distillation option(s) {', '.join(sorted(bad))}")
    for k, v in dopts.items():
        check = DISTILL_VALIDATORS[k]
        if not check(v):
            raise ValueError(f"option {k}={v!r}: expected {check.accepts}")
    bad = {k for k in options if k.startswith("ls_")} - LS_OPTIONS
    if bad:
        raise ValueError(f"unknown compensation option(s) {', '.join(sorted(bad))}; known: {', '.join(sorted(LS_OPTIONS))}")
    for k in LS_OPTIONS & set(options):
        if not LS_VALIDATORS[k](options[k]):
            raise ValueError(f"option {k}={options[k]!r}: expected {LS_VALIDATORS[k].accepts}")
    mopts = {k: v for k, v in options.items() if k not in dopts and k not in LS_OPTIONS}
    methods.check_options(method, mopts)
    return {**mopts, **{k: v for k, v in options.items() if k in LS_OPTIONS}}, dopts


def _check_finite(model, why: str = "refusing to compress", error: type = ValueError) -> None:
    for name, p in model.named_parameters():
        if p.is_meta:  # offload="disk": a layer not read yet (the loader checks it when it reads it)
            continue
        if not torch.isfinite(p).all():
            raise error(f"model parameter {name} holds NaN or Inf: {why}")


COMPENSATE = ("ls",)
# methods whose result is not whole layers: nothing to refit along a provenance
NO_PROVENANCE = ("finercut",)


def resolve_compensate(compensate, method: str, faithful: bool):
    """``compensate``: "ls" (closed-form refit, come_fast.compensate), None (off),
    or "auto": the method's own default (off everywhere for now)."""
    if compensate == "auto":
        return "ls" if method == "come" and not faithful else None
    if compensate is not None and compensate not in COMPENSATE:
        raise ValueError(f"compensate must be one of {COMPENSATE}, None or 'auto', got {compensate!r}")
    if compensate and method in NO_PROVENANCE:
        raise ValueError(f"compensate={compensate!r} needs whole layers and a provenance; {method} removes sublayers")
    if compensate and faithful:
        raise ValueError("faithful mode reproduces the release: it takes no compensation")
    return compensate


def _check_refit_data(tokens: torch.Tensor, adapter) -> None:
    from .compensate import holdout_rows

    n, T = tokens.shape
    fit = (n - len(holdout_rows(n))) * T
    if not holdout_rows(n) or fit < adapter.intermediate_size:
        raise ValueError(f"compensation needs at least 4 calibration rows (one in four is held out to choose the "
                         f"ridge) and more fitting tokens than MLP channels ({adapter.intermediate_size}); "
                         f"got {n} rows x {T} tokens")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_dtype(model, dtype) -> torch.dtype:
    """``compress``'s ``dtype=``, checked before any work."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or the torch dtype), got {dtype!r}")
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError("dtype= sets the dtype a model is loaded in, for a name or folder; a loaded model "
                         "compresses in its own dtype (cast it first: model.to(torch.bfloat16))")
    return dtype


def compress(model, ratio: float | None = None, method: str = "come", calib=None, target_layers: int | None = None, *,
             tokenizer=None, faithful: bool = False, allow_repeat: bool | None = None, n_samples: int = 32,
             seq_len: int = 256, batch_size: int = 2, backend: str = "auto", rounding: str = "nearest",
             seed: int = 0, progress: bool | Any = None, on_step=None, distill_steps: int = 0, teacher=None,
             compensate="auto", text_column: str = "text", exact: bool = False, width_multiple: int | None = None,
             offload: str | None = None, dtype=None, **options) -> CompressionResult:
    """Compress ``model`` in place by depth and return a ``CompressionResult``.

    ``model``: a Hugging Face causal LM (Llama, Mistral, Qwen2, Qwen3) or a name
    for ``load_model``. ``ratio`` (share of all parameters to remove) and
    ``target_layers`` are alternatives. ``calib``: see ``calibration_tokens``
    (tokens, a file, a list of strings, a ``datasets`` Dataset or IterableDataset
    whose column ``text_column`` holds the text, a hub dataset, or None for
    sequences sampled from the model).
    ``faithful=True`` reproduces the authors' release decision for decision,
    quirks included; the default mode fixes its GQA head grouping and adds the
    levers of come_fast.methods.come (folded norms, the split searched with
    deletion inside it, BI-guided pair candidates, repeats), each an option.
    ``compensate``: "ls" refits the down_proj of every changed layer toward the
    original model's state after its span (come_fast.compensate; ``ls_*``
    options), None switches it off, "auto" (default) means "ls" for CoMe's
    default mode and None otherwise. ``allow_repeat``: None means the mode's own
    (repeats in CoMe's default mode, the release's --wo-repeat otherwise).
    If the call fails, the model is put back as it was given (the same layer
    objects and config); nothing is half compressed.
    ``on_step(partial_result)``: called after every step of a progressive
    method with the result so far (its model is the live model: save it, do
    not change it; with compensation, a refit copy), e.g. to keep the 10% and
    20% points of a 30% run.
    ``distill_steps=N``: after compressing, N steps of hierarchical distillation
    from the original model along the provenance (come_fast.posttrain; options
    ``distill_lr`` 1e-4, ``distill_mse`` 1.0, ``distill_kl`` 1.0, ``distill_ce`` 0.0
    (next-token cross-entropy on the rows; with ``distill_mse=0, distill_kl=0``
    it is plain LM fine-tuning, no teacher run), ``distill_temperature`` 1.0 (the
    KL term's T: T^2 KL of both distributions softened by T),
    ``distill_autocast`` None ("bfloat16": the training steps in mixed
    precision, the weights and optimizer state as they are),
    ``distill_batch`` = batch_size) on the calibration rows, or on
    ``distill_data`` (any ``calib`` source, cut into rows of ``seq_len``; its
    first ``distill_val_rows`` rows, default 8, held apart: their loss is
    logged every ``distill_eval_every`` steps and ``distill_patience``
    evaluations without a new best stop the run). ``distill_tokens=B``: a
    training-token budget (the steps it holds, or the fewer of those and N).
    ``distill_schedule``: "joint" (default) or "layerwise" (each layer, or
    ``distill_group`` layers, alone, then ``distill_joint_steps`` joint
    steps). ``distill_resume=DIR``: checkpoints there (every
    ``distill_save_every`` steps, default 50), and a run of the same settings
    continues from the last one. ``distill_grad_checkpoint=True``: recompute
    layer insides in the backward pass (less memory, the same gradients).
    The tokens seen are in the distillation report. The teacher is a
    copy of ``model`` taken before compression unless ``teacher=`` gives one
    (an uncompressed model of the same architecture). on_step snapshots are
    taken before the distillation.
    ``exact=True``: land within 0.5 percentage points of ``ratio``: the
    whole-layer steps go as far as they can without passing it, then the rest
    is taken as MLP channels of the changed layers, lowest channel scores
    first, in blocks of ``width_multiple`` (default 64) so every width stays a
    multiple of it, and the compensation (where on) is run again over the
    shrunk layers (come_fast/widths.py). The result's layers then have
    different MLP widths: ``save`` records them and ``load`` rebuilds them.
    on_step snapshots are taken before this step.
    ``**options``: the method's own settings (``come_fast.methods.OPTIONS``, listed
    in the README); one the method does not read is refused before any work.
    ``offload="disk"``: ``model`` is a local safetensors checkpoint folder,
    built on the meta device, its decoder layers read from disk a few at a time
    and the result written layer by layer by ``save`` (come_fast/offload.py;
    the methods in ``offload.SUPPORTED``, calibration data required).
    A model dispatched by accelerate (``from_pretrained(..., device_map=...)``,
    ``dispatch_model``: several GPUs, CPU or disk offload) is compressed where
    it lies: each layer scored and merged on its own execution device, an
    offloaded layer read through its hooks when used, and every new layer
    placed (device, hooks, offload) where the first layer of its span was,
    ``hf_device_map`` renumbered (come_fast/devicemap.py; with offloaded
    weights the restrictions of ``offload="disk"`` apply).
    ``dtype``: when ``model`` is a name or folder, the dtype it is loaded and
    compressed in (a ``torch.dtype`` or "float32", "bfloat16", "float16";
    default float32); with ``offload="disk"`` the dtype each layer is read
    into and computes in, so a bfloat16 checkpoint streamed in bfloat16 holds
    half the memory of the float32 default (the result is the in-memory run's
    in the same dtype, bit for bit). A loaded model keeps its own dtype.
    ``progress``: True for tqdm bars (merges, layers scored, calibration
    sampling), False for none, a callable ``(label, done, total)``, or None
    (default): bars when stderr is a terminal. Every long step is also logged
    at INFO on the ``come_fast`` logger (come_fast/logs.py).
    """
    from . import offload as _offload
    from .card import base_model_of

    if progress is None:
        progress = sys.stderr.isatty()
    base_model = base_model_of(model)  # before loading: a name or folder as given
    dtype = _load_dtype(model, dtype)
    if offload is not None:
        _offload.check_request(model, offload, method, calib=calib, distill_steps=distill_steps, teacher=teacher,
                               on_step=on_step, exact=exact)
        model, tok = _offload.lazy_model(model, dtype=dtype, capacity=_offload.capacity_for(method, options))
        tokenizer = tokenizer or tok
    if isinstance(model, (str, os.PathLike)):
        model, tok = load_model(model, dtype=dtype)
        tokenizer = tokenizer or tok
    a = adapter_for(model)
    if (ratio is None) == (target_layers is None):
        raise RatioError("give exactly one of ratio= and target_layers=")
    # a model dispatched by accelerate (device_map: several GPUs, CPU or disk offload; come_fast/devicemap.py):
    # a weight on the meta device that no offload hook loads, or a layer split over devices, refused here
    placement = None if _offload.is_lazy(model) else Placement.of(model, a)
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None and not _offload.is_lazy(model) and placement is None:
        raise ValueError(f"model parameter {meta} is on the meta device (no weights): load the weights first "
                         "(come_fast.load_model, or from_pretrained without device_map='meta')")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(map(repr, ROUNDINGS))}, got {rounding!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_calibration_sizes(n_samples, seq_len)
    from .widths import check_exact, check_uniform_widths

    check_uniform_widths(a)
    if not isinstance(exact, bool):
        raise ValueError(f"exact must be True or False, got {exact!r}")
    if width_multiple is not None and not exact:
        raise ValueError("width_multiple sets the MLP widths of exact=True; without exact it does nothing")
    if exact:
        width_multiple = check_exact(a, width_multiple, ratio, method=method, faithful=faithful,
                                     target_layers=target_layers, rounding=rounding, no_provenance=NO_PROVENANCE)
    spec = sublayers.spec_of(a.layers)
    if spec is not None and method != "finercut":
        raise ValueError(f"this model's layers miss sublayers (a FinerCut result: {spec}); "
                         f"{method!r} works on whole layers: only method='finercut' compresses it further")
    L = len(a.layers)
    if target_layers is not None:
        if not (isinstance(target_layers, int) and not isinstance(target_layers, bool) and 1 <= target_layers < L):
            raise RatioError(f"target_layers must be an integer in [1, {L - 1}] for a {L}-layer model, got {target_layers!r}")
        n_remove = L - target_layers
    else:  # exact: whole layers never pass the ratio; MLP channels make up the rest
        n_remove = removals_for_ratio(model, ratio, "down" if exact else rounding)
    if allow_repeat is None:  # CoMe's default mode merges merged layers again; the release (and CoMe-P) do not
        allow_repeat = method == "come" and not faithful
    if method in ("come", "come-p") and not allow_repeat and n_remove > L // 2:
        raise RatioError(f"{n_remove} merges of {L} layers need a layer to merge twice; "
                         "pass allow_repeat=True or ask for less")
    fn = methods.get(method)
    if placement is not None:
        placement.check_request(method, calib=calib, distill_steps=distill_steps, teacher=teacher, on_step=on_step,
                                exact=exact)
    _check_finite(model)
    options, dopts = split_options(method, options)
    comp = resolve_compensate(compensate, method, faithful)
    if not (isinstance(distill_steps, int) and not isinstance(distill_steps, bool) and distill_steps >= 0):
        raise ValueError(f"distill_steps must be a non-negative integer, got {distill_steps!r}")
    plan = posttrain.plan_distill(dopts, distill_steps, batch_size)  # None: no distillation
    if plan and method == "finercut":
        raise ValueError("distillation along the provenance needs whole layers; finercut removes sublayers")
    if plan and teacher is None:
        import copy

        teacher = copy.deepcopy(model)  # the original, before any layer is touched
    if teacher is not None:  # the same architecture, width, vocabulary and layer count
        posttrain.check_teacher(teacher, model)
    tokenizer = tokenizer if tokenizer is not None else _find_tokenizer(model)
    t0 = time.perf_counter()
    bar = _progress(progress)
    steplog = logs.StepLog(bar, log)  # the methods' progress: logged, and the bars where asked
    tokens = calibration_tokens(calib, model, tokenizer, n_samples, seq_len, seed, text_column=text_column,
                                progress=steplog)
    log.info("calibration: %d rows x %d tokens (%s) in %.1f s", tokens.shape[0], tokens.shape[1],
             "sampled from the model" if calib is None else "given", time.perf_counter() - t0)
    if plan:  # the distillation's rows and a resume folder checked before any compression
        plan.prepare(tokens, model, tokenizer, seq_len, seed, text_column)
        plan.precheck_resume(L, seed)
    if comp:
        _check_refit_data(tokens, a)
    device = home_device(model)  # where the embeddings run (a dispatched model's first weight may be offloaded)
    ops = Ops(backend, device)
    ctx = methods.Context(adapter=a, tokens=tokens, ops=ops, batch_size=batch_size,
                          options={"faithful": faithful, "allow_repeat": allow_repeat, "ratio": ratio,
                                   "rounding": rounding, "seed": seed, **options}, progress=steplog)
    params_before = count_parameters(model)

    def result(provenance, steps, settings, m=model):
        params_after = count_parameters(m)
        return CompressionResult(
            model=m, provenance=provenance, achieved_ratio=(params_before - params_after) / params_before,
            report=steps, tokenizer=tokenizer, method=method,
            settings={**settings, "method": method, "backend": ops.backend, "calibration": list(tokens.shape),
                      "batch_size": batch_size, "seed": seed,
                      "target": {"ratio": ratio, "target_layers": target_layers, "rounding": rounding}},
            layers_before=L, layers_after=len(adapter_for(m).layers), params_before=params_before,
            params_after=params_after, seconds=time.perf_counter() - t0, base_model=base_model)

    teacher_states = None
    if placement is not None:
        placement.begin()  # offloaded layers streamed by a LayerStore for the run; put back by end()
    try:
        if comp:
            from .calibration import LayerStream
            from .compensate import TeacherStates

            # the original model's boundaries, before any change: every refit's target
            log.info("compensation: caching the original model's layer boundaries (the refit's targets)")
            teacher_states = TeacherStates.from_stream(LayerStream(a, tokens, batch_size, ops),
                                                       options.get("max_cache_bytes"))
            ctx.teacher = teacher_states
    except BaseException:
        if placement is not None:
            placement.end()
        raise

    def compensated(m, provenance):
        """Refit ``m``'s changed layers toward the teacher (in place); the reports."""
        from .calibration import LayerStream
        from .compensate import compensate_model, refit_settings

        ma = adapter_for(m)
        layers = None if options.get("ls_layers", "changed") == "changed" else range(len(ma.layers))
        originals = snapshot.layers if ctx.reselect_mlp else None  # CoMe: merged layers choose their channels again
        return compensate_model(ma, LayerStream(ma, tokens, batch_size, ops), teacher_states, provenance, L,
                                layers=layers, originals=originals, **refit_settings(options))

    if on_step is not None:
        def partial(prov, steps):
            m = model
            steps = list(steps)
            if comp:  # a snapshot is what compress would return at that size: refit a copy
                import copy

                m = copy.deepcopy(model)
                steps.append({"compensation": compensated(m, prov)})
            on_step(result(prov, steps, {"faithful": faithful, "allow_repeat": allow_repeat, "partial": True,
                                         "compensate": comp}, m))

        ctx.on_step = partial
    model.eval()
    snapshot = _Snapshot(a)
    try:
        log.info("%s: scoring and removing %d of %d layers on %d x %d calibration tokens", method, n_remove, L,
                 tokens.shape[0], tokens.shape[1])
        m0 = time.perf_counter()
        outcome = fn(ctx, n_remove)
        steps, settings = outcome.steps, dict(outcome.settings)
        log.info("%s: %d -> %d layers in %.1f s; provenance %s", method, L, len(a.layers), time.perf_counter() - m0,
                 outcome.provenance)
        if comp:
            c0 = time.perf_counter()
            log.info("compensation (%s): refitting the changed layers toward the original model", comp)
            reps = compensated(model, outcome.provenance)
            log.info("compensation: %d layers refit in %.1f s", len(reps), time.perf_counter() - c0)
            steps = list(steps) + [{"compensation": reps, "seconds": time.perf_counter() - c0}]
            settings["compensate"] = {"mode": comp, "refit_layers": [r["layer"] for r in reps],
                                      "kept": [r["layer"] for r in reps if r["alpha"] is None]}
        if exact:
            from .widths import refit_layers, take_channels

            def refit(shrunk):  # the compensation again, over the layers it refits from the lowest shrunk one up
                from .calibration import LayerStream
                from .compensate import compensate_model, refit_settings

                todo = refit_layers(outcome.provenance, L, len(a.layers), shrunk, options.get("ls_layers", "changed"))
                return compensate_model(a, LayerStream(a, tokens, batch_size, ops), teacher_states,
                                        outcome.provenance, L, layers=todo, **refit_settings(options))

            c0 = time.perf_counter()
            log.info("exact: taking MLP channels of the changed layers up to ratio %s", ratio)
            rep = take_channels(a, tokens, batch_size, ops, outcome.provenance, L, ratio, params_before,
                                width_multiple, refit=refit if comp else None,
                                max_cache_bytes=options.get("max_cache_bytes"))
            steps = list(steps) + [{"exact": rep, "seconds": time.perf_counter() - c0}]
            settings["exact"] = {"ratio": ratio, "width_multiple": width_multiple, "widths": rep["widths"],
                                 "whole_layer_ratio": rep["whole_layer_ratio"]}
        if plan:
            snapshot.copy_on_write(a)  # training must not touch the caller's layer objects
            log.info("distillation: up to %d steps from the original model along the provenance", distill_steps)
            rep = plan.run(a, adapter_for(teacher), outcome.provenance, seed=seed,
                           progress=progress if progress is True or callable(progress) else False,
                           cache_bytes=options.get("max_cache_bytes"))
            steps = list(steps) + [{"distillation": rep}]
            settings["distill"] = plan.settings(rep)
            log.info("distillation: %d steps, loss %.4g -> %.4g", rep["steps"], rep["loss_before"], rep["loss_after"])
            _check_finite(model, f"distillation diverged (loss {rep['loss_before']:.4g} -> "
                                 f"{rep['loss_after']:.4g}); lower distill_lr", FloatingPointError)
    except BaseException:
        snapshot.restore(a)  # a failed call leaves the model as it was given
        if placement is not None:
            placement.end()  # the caller's layers with their own weights and hooks again
        raise
    finally:
        if teacher_states is not None:
            teacher_states.close()
    if placement is not None:
        try:  # new layers where their first source layer was, with hooks; hf_device_map renumbered
            placement.end(outcome.provenance)
        except BaseException:
            snapshot.restore(a)
            placement.end()
            raise
    if hasattr(bar, "close"):
        bar.close()
    res = result(outcome.provenance, steps, settings)
    log.info("done: %s", res.summary())
    return res


class _Snapshot:
    """What compress may change in the caller's model, to put back when it fails:
    the layer list and the config entries renumbering rewrites. Methods and
    refits never change an original layer object in place (they build new
    layers or copy one first), so the list of the original objects restores it."""

    def __init__(self, a):
        self.layers = list(a.layers)
        cfg = a.config
        self.config = {k: getattr(cfg, k) for k in ("num_hidden_layers", "layer_types") if hasattr(cfg, k)}
        self.config = {k: (list(v) if isinstance(v, list) else v) for k, v in self.config.items()}

    def copy_on_write(self, a) -> None:
        """Replace every layer of ``a`` that is one of the original objects by a copy."""
        import copy

        originals = {id(m) for m in self.layers}
        if any(id(m) in originals for m in a.layers):
            a.set_layers([copy.deepcopy(m) if id(m) in originals else m for m in a.layers])

    def restore(self, a) -> None:
        a.set_layers(self.layers)
        for k, v in self.config.items():
            setattr(a.config, k, v)


class _Bars:
    """One tqdm bar per label (merges, layers scored)."""

    def __init__(self):
        from tqdm.auto import tqdm

        self.tqdm = tqdm
        self.bars = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        from .calibration import SAMPLING_LABEL

        bar = self.bars.get(label)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            top = label in ("merges", SAMPLING_LABEL)  # the default calibration's sampling comes before the rest
            bar = self.bars[label] = self.tqdm(total=total, desc=label, leave=top, position=0 if top else 1)
        bar.update(done - bar.n)

    def close(self):
        for b in self.bars.values():
            b.close()


def _progress(progress):
    if progress is True:
        return _Bars()
    if callable(progress):
        return progress
    return None


def result_meta(result: CompressionResult) -> dict:
    """What a checkpoint records about the compression (``come_fast`` in config.json, come_fast.json)."""
    return {"method": result.method, "provenance": result.provenance, "achieved_ratio": result.achieved_ratio,
            "layers_before": result.layers_before, "layers_after": result.layers_after,
            "params_before": result.params_before, "params_after": result.params_after,
            "settings": result.settings, "seconds": result.seconds, "base_model": result.base_model,
            **({"command": result.command} if result.command else {}),
            **({"evaluation": result.evaluation} if result.evaluation else {})}


def save(result: CompressionResult, out_dir, overwrite: bool = False, tokenizer=None):
    """Write a standard Hugging Face checkpoint (atomically), with
    ``come_fast.json`` (what ``result_meta`` records, the per-step report) and
    a model card ``README.md`` (come_fast/card.py: base model, method, ratios,
    provenance, the command line and evaluation where the result carries
    them), all in the same atomic write. Layers of
    different MLP widths (``exact=True``) are recorded in the config
    (``come_fast_mlp_widths``): ``load`` reads them (come_fast/checkpoint.py);
    ``export(..., format="decilm")`` writes the DeciLM form."""
    meta = result_meta(result)
    return save_checkpoint(result.model, tokenizer or result.tokenizer, out_dir, meta, result.report, overwrite)


def export(source, format: str = "decilm", out=None, overwrite: bool = False):
    """Write a compression result (a ``CompressionResult``, or a folder written
    by ``save``) in another checkpoint format; returns the folder.
    ``format="decilm"``: the DeciLM / nemotron-nas ``block_configs`` form
    (per-layer MLP width and attention kept or removed; come_fast/decilm.py)."""
    from .decilm import export as _export

    return _export(source, format=format, out=out, overwrite=overwrite)


def load(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load a checkpoint written by ``save`` (or any supported HF folder):
    returns ``(model, tokenizer, meta)``; meta is None for a foreign folder.
    A folder whose layers miss sublayers (FinerCut; ``come_fast_sublayers`` in
    its config) is rebuilt with those sublayers removed (see come_fast.sublayers);
    one with per-layer MLP widths (``come_fast_mlp_widths``) with those widths
    (built on the meta device, the tensors assigned); a DeciLM / nemotron-nas
    folder (``export(..., format="decilm")``) as the family it came from."""
    model, tok = load_model(path, dtype=dtype, device=device)  # FinerCut's sublayer checkpoints included
    return model, tok, read_meta(path) if os.path.isdir(str(path)) else None


def evaluate(model, tasks=None, data_dir=None, limit: int | None = None, tokenizer=None, **kwargs) -> dict:
    """WikiText-2 perplexity and the seven zero-shot tasks (see come_fast.eval)."""
    from . import eval as ev

    if isinstance(model, (str, os.PathLike)):
        model, tok = load_model(model)
        tokenizer = tokenizer or tok
    if tokenizer is None:
        tokenizer = _find_tokenizer(model)
    if data_dir is None:
        raise ValueError("evaluate needs data_dir=, the folder holding wikitext2/, piqa/, ... (see README)")
    kw = dict(kwargs)
    if tasks is not None:
        kw["tasks"] = tasks
    return ev.evaluate(model, tokenizer, data_dir=data_dir, limit=limit, **kw)
