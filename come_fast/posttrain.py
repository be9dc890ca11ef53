"""Hierarchical distillation along the layer provenance (CoMe's post-training).

The student is the compressed model, the teacher the original. Student layer
k came from the original layers in its provenance (``[2, 3]``, ``[[5, 6], 7]``,
or one number for a layer kept as is); its output is matched to the teacher's
hidden state after the LAST of those original layers, and the final
next-token distributions are matched with a KL loss:

    loss = mse * mean_k ||h_k - t_k||^2 / ||t_k||^2  +  kl * KL(p_teacher || p_student)
           [+ ce * CE(p_student, next token)]

``ce`` (default 0) adds the student's own next-token cross-entropy on the rows
(the KL then covers the positions that have a next token); ``mse=kl=0, ce=1``
is plain LM fine-tuning of the compressed model, the baseline distillation is
measured against (no teacher run per batch). ``temperature`` T (default 1)
softens both distributions in the KL term: T^2 KL(softmax(t/T) || softmax(s/T)),
the T^2 keeping its gradient's scale (Hinton et al.).

Each layer's term is divided by the teacher target's mean square (taken once,
before training, over the validation rows, or over the first 64 training rows
when there are none): hidden states grow with depth (and carry a few huge
activations), and without the scale the deepest layers alone would set the
gradient. Only the decoder layers train; embeddings, final norm and head stay
as they are (tied in SmolLM2), so the result is the same plain checkpoint.

Schedules (``schedule=``, compress's ``distill_schedule``):

- ``"joint"`` (default): one run that trains every student layer at once on
  the loss above. This is the paper's "single-process" schedule.
- ``"layerwise"``: each student layer (or group of ``group`` consecutive
  layers) is trained alone, from the teacher's hidden state at the start of
  its span to the teacher's state at the end of it (the span of
  ``come_fast.compensate.spans``: from its first original layer to the next
  student layer's first, so a gap of deleted layers belongs to the layer
  before it, and the boundaries chain: the first layer's input is the
  embeddings), MSE only, ``steps`` steps each (a layer that is the
  teacher's own, alone in its span, has nothing to learn and is skipped);
  then a short joint pass of
  ``joint_steps`` steps (default a tenth of ``steps``; 0: none) on the joint
  loss, which ties the layers back together and brings in the KL. The
  per-layer runs are the paper's "multi-process" schedule (independent
  per-layer or per-block runs on cached teacher inputs and outputs); they run
  here one after the other in one process, each on the teacher's boundary
  states of all rows cached for its span (two boundaries at a time: in memory
  up to ``cache_bytes``, beyond that in a memory-mapped temporary file). The
  trained state is one layer's (group's) parameters, gradients and AdamW
  moments and its activations, not the whole model's.

Data: the training rows (compress: the calibration rows, or ``distill_data``
tokenised into rows of ``seq_len``), and optional held-apart validation rows
whose loss is logged every ``eval_every`` steps and stops the run after
``patience`` evaluations without a new best. The teacher's targets are
produced per batch (a teacher forward under ``torch.inference_mode``), never
held for all rows; its head is applied chunk by chunk inside the fused linear
+ KL loss (``come_fast.linear_kl``), which never holds either model's
[tokens, vocab] logits whole.

Long runs: a tqdm bar per run with the running loss (and the last validation
loss); ``resume=FOLDER`` writes checkpoints there (every ``save_every`` steps
and after every phase, atomically: come_fast.distill.RunCheckpoint) and a call
with the same settings continues from the last one, to the same parameters
as an uninterrupted run; ``grad_checkpoint=True`` recomputes each layer's
inside in the backward pass instead of keeping it (the same gradients, less
memory, about one more forward).

This works after any whole-layer method (each keeps a provenance); CoMe is
the one whose paper prescribes it.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import methods as _m
from .adapters import Adapter
from .calibration import CalibrationError, calibration_tokens, run_layers
from .compensate import spans
from .distill import (AUTOCAST_DTYPES, LossWeights, ResumeError, RunCheckpoint, distill, evaluate_loss, fingerprint,
                      training_only)

SCHEDULES = ("joint", "layerwise")
SCALE_ROWS = 64  # training rows the target scales are taken over when there are no validation rows
DEFAULT_VAL_ROWS = 8  # held apart from distill_data by default
DEFAULT_SAVE_EVERY = 50


class DistillDataError(CalibrationError):
    """A distillation source that cannot give the rows asked for."""


# compress's distillation options beyond distill_lr/_mse/_kl/_batch (api.DISTILL_VALIDATORS)
_SOURCE = _m.Validator(lambda v: v is not None and not isinstance(v, (bool, int, float)),
                       "a distillation source: a token tensor, a .safetensors/.txt/.jsonl path, a list of strings, "
                       "a datasets Dataset, or a hub dataset id or spec")
OPTION_VALIDATORS: dict[str, _m.Validator] = {
    "distill_data": _SOURCE,
    "distill_tokens": _m.positive_int,
    "distill_val_rows": _m.non_negative_int,
    "distill_eval_every": _m.positive_int,
    "distill_patience": _m.positive_int,
    "distill_schedule": _m.one_of(*SCHEDULES),
    "distill_group": _m.positive_int,
    "distill_joint_steps": _m.non_negative_int,
    "distill_resume": _m.Validator(lambda v: isinstance(v, (str, os.PathLike)) and os.fspath(v) != "",
                                   "a folder path"),
    "distill_save_every": _m.positive_int,
    "distill_grad_checkpoint": _m.boolean,
    "distill_temperature": _m.number(0, lo_open=True),
    "distill_autocast": _m.one_of(*AUTOCAST_DTYPES),
}


def last_original(item) -> int:
    """The deepest original layer in a provenance entry."""
    if isinstance(item, (list, tuple)):
        return max(last_original(x) for x in item)
    return int(item)


def _run_layers(a: Adapter, x: torch.Tensor, pos: torch.Tensor, keep: Optional[set] = None):
    """The outputs of the layers in ``keep`` (all when None), in layer order, and the last output."""
    outs = []
    last = run_layers(a, a.layers, x, pos, on_output=lambda i, h: outs.append(h) if keep is None or i in keep else None)
    return outs, last


def _train_layers(a: Adapter, layers, x: torch.Tensor, pos: torch.Tensor, grad_checkpoint: bool = False):
    """``layers`` on ``x`` with autograd; every output. With ``grad_checkpoint``
    only each layer's input is kept for the backward pass (its inside is recomputed)."""
    p = pos.expand(x.shape[0], -1)
    pe = a.rotary(x, p)
    outs = []
    for layer in layers:
        if grad_checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            x = checkpoint(layer, x, attention_mask=None, position_ids=p, position_embeddings=pe, use_reentrant=False)
        else:
            x = layer(x, attention_mask=None, position_ids=p, position_embeddings=pe)
        outs.append(x)
    return outs


@torch.no_grad()
def teacher_targets(teacher: Adapter, tokens: torch.Tensor, provenance: list, batch_size: int = 2):
    """The teacher's hidden state after the last original layer of each student
    layer ([n, T, d] per student layer), and its final-normed last hidden state,
    for all rows at once (small inputs and tests; training makes them per batch)."""
    want = [last_original(p) for p in provenance]
    L = len(teacher.layers)
    if max(want) >= L:
        raise ValueError(f"provenance names original layer {max(want)} but the teacher has {L} layers")
    device = next(teacher.model.parameters()).device
    pos = torch.arange(tokens.shape[1], device=device)[None]
    keep = sorted(set(want))
    at = {j: i for i, j in enumerate(keep)}
    per_layer = [[] for _ in keep]
    final = []
    for i in range(0, tokens.shape[0], batch_size):
        x = teacher.embed(tokens[i:i + batch_size].to(device))
        outs, last = _run_layers(teacher, x, pos, set(keep))
        for j, o in enumerate(outs):
            per_layer[j].append(o)
        final.append(teacher.final_norm(last))
    cat = [torch.cat(t) for t in per_layer]
    return [cat[at[j]] for j in want], torch.cat(final)


def check_teacher(teacher, model) -> None:
    """The teacher must be the uncompressed model's kind: the same architecture,
    width, vocabulary and layer count; a ValueError naming what differs."""
    from .adapters import adapter_for

    ta, a = adapter_for(teacher), adapter_for(model)
    tt, mt = getattr(teacher.config, "model_type", None), getattr(model.config, "model_type", None)
    if tt != mt:
        raise ValueError(f"teacher is a {tt} model, the model to compress a {mt}: pass the uncompressed model")
    tv, mv = ta.embed.weight.shape[0], a.embed.weight.shape[0]
    tvh, mvh = ta.lm_head.weight.shape[0], a.lm_head.weight.shape[0]
    if (tv, tvh) != (mv, mvh):
        raise ValueError(f"teacher's vocabulary has {tvh} tokens (embeddings {tv}), the model's {mvh} ({mv}): "
                         "pass the uncompressed model")
    td, md = ta.embed.weight.shape[1], a.embed.weight.shape[1]
    if td != md:
        raise ValueError(f"teacher's hidden size is {td}, the model's {md}: pass the uncompressed model")
    if len(ta.layers) != len(a.layers):
        raise ValueError(f"teacher has {len(ta.layers)} layers, the model to compress {len(a.layers)}: "
                         "pass the uncompressed model")


# -- data -------------------------------------------------------------------------------

def distill_rows(source, model, tokenizer, *, rows: int, seq_len: int, seed: int = 0,
                 text_column: str = "text") -> torch.Tensor:
    """``rows`` rows of ``seq_len`` tokens from ``source``: any source
    ``come_fast.calibration.calibration_tokens`` reads (a token tensor or
    .safetensors file is taken as it is, whatever its size). The errors are
    calibration's, said of the distillation data."""
    if source is None:
        raise DistillDataError("distill_data is None: leave it out to train on the calibration rows")
    try:
        return calibration_tokens(source, model, tokenizer, rows, seq_len, seed, text_column=text_column)
    except CalibrationError as e:
        msg = str(e).replace("pass fewer or shorter sequences (n_samples, seq_len) or more text",
                             f"lower distill_steps or distill_tokens (the training rows), or distill_val_rows, "
                             f"or give more text")
        msg = msg.replace("calibration data", "data").replace("calibration file", "file").replace("calibration ", "")
        raise DistillDataError(f"distill_data: {msg}") from None


@dataclass
class DistillPlan:
    """compress's distillation settings, checked before any work; ``prepare``
    then fixes the rows and the number of steps."""

    steps: int = 0                 # distill_steps (0: from the token budget)
    batch: int = 2
    lr: float = 1e-4
    mse: float = 1.0
    kl: float = 1.0
    ce: float = 0.0
    data: Any = None
    tokens: Optional[int] = None   # the training-token budget
    val_rows: Optional[int] = None
    eval_every: Optional[int] = None
    patience: Optional[int] = None
    schedule: str = "joint"
    group: int = 1
    joint_steps: Optional[int] = None
    resume: Optional[str] = None
    save_every: int = DEFAULT_SAVE_EVERY
    grad_checkpoint: bool = False
    temperature: float = 1.0
    autocast: Optional[str] = None
    # after prepare()
    train: Optional[torch.Tensor] = field(default=None, repr=False)
    val: Optional[torch.Tensor] = field(default=None, repr=False)
    run_steps: int = 0

    def resolve_steps(self, T: int) -> int:
        per = self.batch * T
        if self.tokens is None:
            return self.steps
        budget = self.tokens // per
        if budget < 1:
            raise ValueError(f"distill_tokens={self.tokens} is less than one batch ({self.batch} rows x {T} tokens "
                             f"= {per}): give at least {per}")
        return min(self.steps, budget) if self.steps else budget

    def prepare(self, calib: torch.Tensor, model, tokenizer, seq_len: int, seed: int = 0,
                text_column: str = "text") -> None:
        """The validation and training rows (first the validation rows, then the
        training rows, of the calibration or of ``data``) and the step count."""
        v = self.val_rows
        if self.data is None:
            rows = calib
            if v >= rows.shape[0]:
                raise ValueError(f"distill_val_rows={v} leaves no training rows: the calibration has "
                                 f"{rows.shape[0]} rows (n_samples)")
        else:
            need = self.resolve_steps(seq_len) * self.batch
            rows = distill_rows(self.data, model, tokenizer, rows=v + need, seq_len=seq_len, seed=seed,
                                text_column=text_column)
            if rows.shape[0] <= v:
                raise DistillDataError(f"distill_val_rows={v} leaves no training rows: the distillation data has "
                                       f"{rows.shape[0]} rows")
        self.run_steps = self.resolve_steps(int(rows.shape[1]))
        self.val, self.train = rows[:v], rows[v:]
        if self.eval_every is None and (v or self.patience):
            self.eval_every = max(1, self.run_steps // 10) if v else None

    def key(self, teacher_layers: int, seed: int) -> dict:
        """The settings that make two runs the same (RunCheckpoint's key), less the
        provenance and the student's weights (known after compression)."""
        return run_settings(schedule=self.schedule, group=self.group, steps=self.run_steps,
                            joint_steps=self.joint_steps, lr=self.lr, mse=self.mse, kl=self.kl, ce=self.ce,
                            batch=self.batch, temperature=self.temperature, autocast=self.autocast,
                            seed=seed, eval_every=self.eval_every, patience=self.patience, train=self.train,
                            val=self.val, teacher_layers=teacher_layers)

    def precheck_resume(self, teacher_layers: int, seed: int) -> None:
        """Before compressing: a resume folder of another run is refused now, not after the compression."""
        if self.resume is None:
            return
        saved = RunCheckpoint.read_key(self.resume)
        if saved is not None:
            mine = self.key(teacher_layers, seed)
            RunCheckpoint.compare(saved, mine, self.resume, fields=mine)

    def run(self, student: Adapter, teacher: Adapter, provenance: list, *, seed: int = 0, progress=False,
            cache_bytes: Optional[int] = None) -> dict:
        return hierarchical_distill(
            student, teacher, self.train, provenance, steps=self.run_steps, lr=self.lr, mse=self.mse, kl=self.kl, ce=self.ce,
            batch_size=self.batch, seed=seed, progress=progress, val_tokens=self.val, eval_every=self.eval_every or 0,
            patience=self.patience, schedule=self.schedule, group=self.group, joint_steps=self.joint_steps,
            resume=self.resume, save_every=self.save_every, grad_checkpoint=self.grad_checkpoint,
            cache_bytes=cache_bytes, token_budget=self.tokens, temperature=self.temperature,
            autocast=self.autocast)

    def settings(self, rep: dict) -> dict:
        """What compress records under ``settings["distill"]``."""
        return {"steps": rep["steps"], "lr": self.lr, "mse": self.mse, "kl": self.kl, "ce": self.ce,
                "temperature": self.temperature, "autocast": self.autocast, "batch": self.batch,
                "schedule": self.schedule, "data": _describe_source(self.data), "tokens": rep["tokens"],
                "val_rows": int(self.val.shape[0]), "eval_every": self.eval_every, "patience": self.patience,
                "grad_checkpoint": self.grad_checkpoint, "resume": self.resume,
                **({"group": self.group, "joint_steps": rep["joint_steps"]} if self.schedule == "layerwise" else {}),
                "loss_before": rep["loss_before"], "loss_after": rep["loss_after"],
                "stopped_early": rep["stopped_early"]}


def _describe_source(data) -> Optional[str]:
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    if isinstance(data, torch.Tensor):
        return f"tensor {list(data.shape)}"
    if isinstance(data, (list, tuple)):
        return f"{len(data)} strings"
    return type(data).__name__


def plan_distill(dopts: dict, steps: int, batch_size: int) -> Optional[DistillPlan]:
    """compress's distillation options (``distill_*``, values already checked
    one by one) as a plan; None when distillation is off (``steps`` 0 and no
    ``distill_tokens``). Combinations that cannot work raise here, before any work."""
    o = {k[len("distill_"):]: v for k, v in dopts.items()}
    on = bool(steps) or "tokens" in o
    if not on:
        extra = sorted(k for k in dopts if k in OPTION_VALIDATORS)
        if extra:
            raise ValueError(f"{', '.join(extra)} given but distillation is off: pass distill_steps=N "
                             "(CLI --distill-steps) or distill_tokens=B")
        return None
    plan = DistillPlan(steps=steps, batch=int(o.get("batch", batch_size)), lr=float(o.get("lr", 1e-4)),
                       mse=float(o.get("mse", 1.0)), kl=float(o.get("kl", 1.0)), ce=float(o.get("ce", 0.0)),
                       data=o.get("data"),
                       tokens=o.get("tokens"), eval_every=o.get("eval_every"), patience=o.get("patience"),
                       schedule=o.get("schedule", "joint"), group=o.get("group", 1),
                       joint_steps=o.get("joint_steps"), save_every=o.get("save_every", DEFAULT_SAVE_EVERY),
                       grad_checkpoint=o.get("grad_checkpoint", False), temperature=float(o.get("temperature", 1.0)),
                       autocast=o.get("autocast"))
    plan.val_rows = o.get("val_rows", DEFAULT_VAL_ROWS if plan.data is not None else 0)
    plan.resume = os.fspath(o["resume"]) if "resume" in o else None
    if plan.mse == 0 and plan.kl == 0 and plan.ce == 0:
        raise ValueError("distill_mse, distill_kl and distill_ce are all 0: no loss to train on")
    if plan.temperature != 1.0 and plan.kl == 0:
        raise ValueError("distill_temperature softens the KL term only, and distill_kl is 0")
    if (plan.eval_every or plan.patience) and not plan.val_rows:
        raise ValueError("distill_eval_every and distill_patience need held-apart rows: distill_val_rows >= 1 "
                         "(default 8 with distill_data, 0 on the calibration rows)")
    if plan.schedule != "layerwise":
        bad = [k for k in ("joint_steps", "group") if k in o]
        if bad:
            raise ValueError(f"{', '.join('distill_' + k for k in bad)} set(s) the layerwise schedule: "
                             "pass distill_schedule='layerwise'")
    elif plan.mse == 0:
        raise ValueError("the layerwise schedule trains each layer on its hidden-state MSE: distill_mse must be > 0")
    if plan.save_every != DEFAULT_SAVE_EVERY and plan.resume is None:
        raise ValueError("distill_save_every sets how often distill_resume's folder is written: give distill_resume")
    return plan


# -- the runs ---------------------------------------------------------------------------

class _Rows:
    """Hidden states of all rows at one boundary, [n, T, d]: in memory up to
    ``max_bytes`` (None: no limit), beyond that a memory-mapped temporary file."""

    def __init__(self, n: int, T: int, d: int, dtype: torch.dtype, max_bytes: Optional[int]):
        size = n * T * d
        nbytes = size * torch.empty((), dtype=dtype).element_size()
        self.dir = None
        if max_bytes is None or nbytes <= max_bytes:
            self.t = torch.empty(n, T, d, dtype=dtype)
        else:
            self.dir = tempfile.mkdtemp(prefix="come_fast-distill-")
            self.t = torch.from_file(os.path.join(self.dir, "rows.bin"), shared=True, size=size,
                                     dtype=dtype).view(n, T, d)
        self.sumsq = 0.0  # over the rows counted by scale()

    def close(self) -> None:
        self.t = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _scales(sumsq: list, count: int) -> list[float]:
    return [math.sqrt(s / count) if s > 0 else 1.0 for s in sumsq]


def _teacher_batch(teacher: Adapter, ids: torch.Tensor, keep: list, need_final: bool, pos: torch.Tensor):
    """The teacher's hidden states after the original layers in ``keep`` and
    (``need_final``) its final-normed last state, for one batch: a forward
    under inference mode, the results copied out as ordinary tensors."""
    stop = len(teacher.layers) if need_final else max(keep) + 1
    want = set(keep)
    with torch.inference_mode():
        outs = {}
        x = run_layers(teacher, teacher.layers[:stop], teacher.embed(ids), pos,
                       on_output=lambda i, h: outs.__setitem__(i, h) if i in want else None)
        final = teacher.final_norm(x) if need_final else None
    return {j: outs[j].clone() for j in keep}, (final.clone() if final is not None else None)


class _Joint:
    """The joint loss on rows of tokens, the teacher run per batch."""

    def __init__(self, student: Adapter, teacher: Adapter, provenance: list, mse: float, kl: float,
                 grad_checkpoint: bool, scale_rows: torch.Tensor, batch_size: int, ce: float = 0.0,
                 temperature: float = 1.0):
        self.s, self.t = student, teacher
        self.want = [last_original(p) for p in provenance]
        L = len(teacher.layers)
        if max(self.want) >= L:
            raise ValueError(f"provenance names original layer {max(self.want)} but the teacher has {L} layers")
        self.keep = sorted(set(self.want))
        self.mse, self.kl, self.ce, self.gc = mse, kl, ce, grad_checkpoint
        self.device = next(student.model.parameters()).device
        self.weights = LossWeights(mse=mse, kl=kl, ce=ce, temperature=temperature)
        # per student layer: the root mean square of its target over the scale rows
        T = scale_rows.shape[1]
        self.pos = torch.arange(T, device=self.device)[None]
        sums = {j: 0.0 for j in self.keep}
        count = 0
        for i in range(0, scale_rows.shape[0], batch_size):
            tg, _ = _teacher_batch(teacher, scale_rows[i:i + batch_size].to(self.device), self.keep, False, self.pos)
            for j in self.keep:
                sums[j] += float(tg[j].double().pow(2).sum())
            count += tg[self.keep[0]].numel()
        self.scale = _scales([sums[j] for j in self.want], count)

    def forward_on(self, rows: torch.Tensor):
        a, w_head = self.s, self.t.lm_head.weight
        b_head = getattr(self.t.lm_head, "bias", None)

        def forward(idx):
            ids = rows[idx].to(self.device)
            tg, t_final = (_teacher_batch(self.t, ids, self.keep, bool(self.kl), self.pos)
                           if self.mse or self.kl else ({}, None))  # plain fine-tuning: no teacher run
            outs = _train_layers(a, a.layers, a.embed(ids), self.pos, self.gc)
            out = {}
            if self.mse:  # the mean over the concatenation is the mean of the per-layer scaled MSEs (same width)
                out["hidden"] = torch.cat([o / s for o, s in zip(outs, self.scale)], -1)
                out["hidden_target"] = torch.cat([tg[j] / s for j, s in zip(self.want, self.scale)], -1)
            if self.kl or self.ce:
                head, h_last = a.lm_head, a.final_norm(outs[-1])
                if self.ce:  # next-token targets: the last position has none (the KL then leaves it out too)
                    h_last, out["labels"] = h_last[:, :-1], ids[:, 1:]
                    t_final = None if t_final is None else t_final[:, :-1]
                if type(head).forward is torch.nn.Linear.forward:
                    # the fused chunked linear + KL (distill.fused_kl): neither model's
                    # [tokens, vocab] logits are ever held whole (the cross-entropy still makes the student's)
                    out.update(head_input=h_last, head_weight=head.weight, head_bias=head.bias)
                    if self.kl:
                        out.update(head_input_target=t_final, head_weight_target=w_head, head_bias_target=b_head)
                else:
                    out["logits"] = head(h_last)
                    if self.kl:
                        out["logits_target"] = torch.nn.functional.linear(t_final, w_head, b_head)
            return out

        return forward


def joint_steps_of(schedule: str, steps: int, joint_steps: Optional[int]) -> int:
    """The joint pass's steps: all of them for "joint"; for "layerwise" ``joint_steps``, by default a tenth."""
    if schedule == "joint":
        return steps
    return math.ceil(steps / 10) if joint_steps is None else joint_steps


def run_settings(*, schedule, group, steps, joint_steps, lr, mse, kl, batch, seed, eval_every, patience, ce=0.0,
                 train: torch.Tensor, val: Optional[torch.Tensor], teacher_layers: int, layers: str = "all",
                 temperature: float = 1.0, autocast: Optional[str] = None) -> dict:
    """What makes two distillation runs the same run, less the provenance and the starting weights."""
    layerwise = schedule == "layerwise"
    only = {"layers": layers} if layers != "all" else {}  # earlier runs' keys stay as they were
    if temperature != 1.0:
        only["temperature"] = float(temperature)
    if autocast is not None:
        only["autocast"] = autocast
    return {**only, "schedule": schedule, "group": group if layerwise else None, "steps": steps,
            "joint_steps": joint_steps_of(schedule, steps, joint_steps) if layerwise else None,
            "lr": float(lr), "mse": float(mse), "kl": float(kl), "ce": float(ce), "batch": batch, "seed": seed,
            "eval_every": eval_every or None, "patience": patience,
            "data": fingerprint([("val", val if val is not None else train[:0]), ("train", train)]),
            "seq_len": int(train.shape[1]), "teacher_layers": teacher_layers}


def run_key(settings: dict, provenance: list, student: Adapter) -> dict:
    params = [(f"layers.{k}.{n}", p) for k, layer in enumerate(student.layers) for n, p in layer.named_parameters()]
    return {**settings, "provenance": provenance, "student": fingerprint(params)}


def hierarchical_distill(student: Adapter, teacher: Adapter, tokens: torch.Tensor, provenance: list, *,
                         steps: int = 100, lr: float = 1e-4, mse: float = 1.0, kl: float = 1.0, ce: float = 0.0,
                         batch_size: int = 2, seed: int = 0, progress=False, val_tokens: Optional[torch.Tensor] = None,
                         eval_every: int = 0, patience: Optional[int] = None, schedule: str = "joint",
                         group: int = 1, joint_steps: Optional[int] = None, resume=None,
                         save_every: int = DEFAULT_SAVE_EVERY, grad_checkpoint: bool = False,
                         cache_bytes: Optional[int] = None, token_budget: Optional[int] = None,
                         layers: str = "all", temperature: float = 1.0, autocast: Optional[str] = None) -> dict:
    """Train the student's decoder layers in place on the rows ``tokens`` [n, T];
    returns a report: the loss before and after (on ``val_tokens`` when given,
    else on the training rows), the validation losses, the tokens seen, seconds,
    settings. See the module docstring for the schedules and options.
    ``layers``: "all" trains every decoder layer; "changed" only those that are
    not the teacher's own layer alone in its span (merged or compensated ones),
    the others stay as the teacher has them. ``temperature`` T: the KL term is
    T^2 KL(teacher/T || student/T) (1: the plain KL). ``autocast="bfloat16"``:
    the training steps' forward passes (teacher and student) and losses run in
    mixed precision (``come_fast.distill.distill``'s ``autocast``); the
    held-apart and before/after losses stay in the model's dtype."""
    t0 = time.perf_counter()
    if len(provenance) != len(student.layers):
        raise ValueError(f"provenance has {len(provenance)} entries for {len(student.layers)} student layers")
    if steps < 1:
        raise ValueError(f"distill_steps must be at least 1, got {steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not OPTION_VALIDATORS["distill_temperature"](temperature):
        raise ValueError(f"temperature must be {OPTION_VALIDATORS['distill_temperature'].accepts}, got {temperature!r}")
    if layers not in ("all", "changed"):
        raise ValueError(f"layers must be 'all' or 'changed', got {layers!r}")
    if autocast is not None and not OPTION_VALIDATORS["distill_autocast"](autocast):
        raise ValueError(f"autocast must be {OPTION_VALIDATORS['distill_autocast'].accepts} or None, got {autocast!r}")
    amp = AUTOCAST_DTYPES[autocast] if autocast is not None else None
    if (eval_every or patience) and (val_tokens is None or val_tokens.shape[0] == 0):
        raise ValueError("eval_every and patience need validation rows (val_tokens)")
    val = val_tokens if val_tokens is not None and val_tokens.shape[0] else None
    T = int(tokens.shape[1])
    jsteps = joint_steps_of(schedule, steps, joint_steps)
    n = int(tokens.shape[0])
    scale_rows = val if val is not None else tokens[:SCALE_ROWS]
    joint = _Joint(student, teacher, provenance, mse, kl, grad_checkpoint, scale_rows, batch_size, ce=ce,
                   temperature=temperature)
    model = student.model
    own = teachers_own_layers(student, teacher, provenance) if schedule == "layerwise" or layers == "changed" else set()
    trained = [k for k in range(len(student.layers)) if layers == "all" or k not in own]
    named = {f"layers.{k}.{nm}": p for k in trained for nm, p in student.layers[k].named_parameters()}
    if not named:
        raise ValueError("layers='changed': every student layer is the teacher's own, nothing to train")
    ck = None
    if resume is not None:
        settings = run_settings(schedule=schedule, group=group, steps=steps, joint_steps=joint_steps, lr=lr, mse=mse,
                                kl=kl, ce=ce, batch=batch_size, seed=seed, eval_every=eval_every, patience=patience,
                                train=tokens, val=val, teacher_layers=len(teacher.layers), layers=layers,
                                temperature=temperature, autocast=autocast)
        ck = RunCheckpoint(resume, run_key(settings, provenance, student), named, every=save_every)
        resumed = ck.load()  # another run's folder raises here: nothing trained, nothing written
    else:
        resumed = False
    if torch.cuda.is_available() and joint.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(joint.device)
    eval_rows = val if val is not None else tokens
    full = joint.forward_on(tokens)
    on_eval = joint.forward_on(eval_rows)
    validate = (lambda: evaluate_loss(on_eval, eval_rows.shape[0], joint.weights, batch_size)) if val is not None else None
    phases = []
    try:
        with training_only(model, list(named.values())):
            if ck is not None and "loss_before" in ck.meta:
                before = ck.meta["loss_before"]
            else:
                before = evaluate_loss(on_eval, eval_rows.shape[0], joint.weights, batch_size)
                if ck is not None:
                    ck.meta["loss_before"] = before
            if schedule == "layerwise":
                phases = _layerwise(student, teacher, provenance, tokens, val, steps=steps, lr=lr,
                                    batch_size=batch_size, seed=seed, progress=progress, eval_every=eval_every,
                                    patience=patience, group=group, ck=ck, grad_checkpoint=grad_checkpoint,
                                    cache_bytes=cache_bytes, teachers_own=own, autocast=amp)
            main = None
            if jsteps:
                if ck is not None and "joint" in ck.done:
                    main = ck.done["joint"]
                else:
                    params = list(named.values())
                    rep = distill(full, params, n, steps=jsteps, lr=lr, batch_size=batch_size, weights=joint.weights,
                                  seed=seed, progress=progress, label="distillation steps" if schedule == "joint"
                                  else "joint pass", validate=validate, eval_every=eval_every, patience=patience,
                                  checkpoint=ck, phase="joint", autocast=amp)
                    main = _phase_report(rep, batch_size * T)
                    if ck is not None:
                        ck.finish("joint", main)
            after = evaluate_loss(on_eval, eval_rows.shape[0], joint.weights, batch_size)
    finally:
        model.eval()
    peak = None
    if torch.cuda.is_available() and joint.device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(joint.device))
    seen = sum(p["tokens_seen"] for p in phases) + (main["tokens_seen"] if main else 0)
    last = main or (phases[-1] if phases else None)
    first = phases[0] if phases else main
    return {"loss_before": before, "loss_after": after, "loss_first_step": first["loss_first"] if first else None,
            "loss_last_step": last["loss_last"] if last else None,
            "steps": main["steps"] if schedule == "joint" else steps,
            "seconds": time.perf_counter() - t0, "schedule": schedule,
            "loss_on": "validation rows" if val is not None else "training rows",
            "matched_teacher_layers": [last_original(p) for p in provenance],
            "validation": (main or {}).get("validation", []), "stopped_early": bool(main and main["stopped_early"]),
            "tokens": {"budget": token_budget, "seen": seen, "per_step": batch_size * T, "train_rows": n,
                       "val_rows": 0 if val is None else int(val.shape[0]), "seq_len": T},
            "joint_steps": jsteps, "layers": phases, "resumed": resumed,
            "checkpoints_written": ck.saves if ck is not None else 0, "peak_memory_bytes": peak,
            "settings": {"lr": lr, "batch_size": batch_size, "seed": seed,
                         "weights": asdict(joint.weights),
                         "layers": layers, "trained_layers": trained,
                         "rows": n, "seq_len": T, "grad_checkpoint": grad_checkpoint, "eval_every": eval_every,
                         "patience": patience, "autocast": autocast}}


def _phase_report(rep, tokens_per_step: int) -> dict:
    """A DistillReport as a plain dict (JSON-able, kept in the checkpoint), validation steps with their tokens."""
    return {"steps": rep.steps, "loss_first": rep.loss_first, "loss_last": rep.loss_last,
            "tokens_seen": rep.steps * tokens_per_step, "stopped_early": rep.stopped_early,
            "resumed_from": rep.resumed_from, "seconds": rep.seconds,
            "validation": [{"step": s, "tokens": s * tokens_per_step, "loss": v} for s, v in rep.validation]}


def layer_spans(provenance: list, n_original: int) -> list[tuple[int, int]]:
    """The layer-wise schedule's [start, end) per student layer: compensate.spans,
    the first from 0 (its input is the embeddings, whatever was deleted before it)."""
    sp = spans(provenance, n_original)
    sp[0] = (0, sp[0][1])
    return sp


def teachers_own_layers(student: Adapter, teacher: Adapter, provenance: list) -> set:
    """Student layers equal to the teacher's layer that is alone in their span: nothing to learn."""
    sp = layer_spans(provenance, len(teacher.layers))
    return {k for k, (s, e) in enumerate(sp) if e - s == 1 and _same_layer(student.layers[k], teacher.layers[s])}


def _same_layer(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """The same parameters (names, shapes, values) in both layers."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(pa[k].shape == pb[k].shape and torch.equal(pa[k], pb[k]) for k in pa)


def _layerwise(student: Adapter, teacher: Adapter, provenance: list, tokens: torch.Tensor,
               val: Optional[torch.Tensor], *, steps: int, lr: float, batch_size: int, seed: int, progress,
               eval_every: int, patience: Optional[int], group: int, ck: Optional[RunCheckpoint],
               grad_checkpoint: bool, cache_bytes: Optional[int], teachers_own: set,
               autocast: Optional[torch.dtype] = None) -> list:
    """Each group of student layers trained alone from the teacher's state at
    the start of its span to the teacher's states at the end of each of its
    layers' spans; the teacher's states of all rows (validation first) are
    cached one boundary ahead. ``teachers_own``: the student layers that are
    the teacher's layer alone in its span (as they were before any training):
    skipped."""
    L, K = len(teacher.layers), len(student.layers)
    sp = layer_spans(provenance, L)
    rows = tokens if val is None else torch.cat([val, tokens])
    nv, n, T = (0 if val is None else int(val.shape[0])), int(tokens.shape[0]), int(tokens.shape[1])
    device = next(student.model.parameters()).device
    pos = torch.arange(T, device=device)[None]
    dtype = next(teacher.model.parameters()).dtype
    d = teacher.embed.weight.shape[1]
    scale_lo, scale_hi = (0, nv) if nv else (0, min(SCALE_ROWS, n))
    weights = LossWeights(mse=1.0, kl=0.0, ce=0.0)

    def advance(x_in: _Rows, start: int, stop: int) -> _Rows:
        """The teacher's layers start..stop-1 on every row of ``x_in`` (None: the embeddings)."""
        out = _Rows(rows.shape[0], T, d, dtype, cache_bytes)
        sumsq = 0.0
        with torch.inference_mode():
            for i in range(0, rows.shape[0], batch_size):
                x = (teacher.embed(rows[i:i + batch_size].to(device)) if x_in is None
                     else x_in.t[i:i + batch_size].to(device))
                y = run_layers(teacher, teacher.layers[start:stop], x, pos)
                out.t[i:i + y.shape[0]] = y.to("cpu", dtype)
                lo, hi = max(i, scale_lo), min(i + y.shape[0], scale_hi)
                if hi > lo:
                    sumsq += float(y[lo - i:hi - i].double().pow(2).sum())
        out.sumsq = sumsq
        return out

    reports = []
    x_in = advance(None, 0, 0)  # the embeddings
    count = (scale_hi - scale_lo) * T * d
    try:
        for g0 in range(0, K, group):
            members = list(range(g0, min(g0 + group, K)))
            outs = []
            cur = x_in
            for k in members:
                s, e = sp[k]
                nxt = advance(cur, s, e)
                outs.append(nxt)
                cur = nxt
            scale = _scales([o.sumsq for o in outs], count)
            phase = f"layers {members[0]}-{members[-1]}" if len(members) > 1 else f"layer {members[0]}"
            layers = [student.layers[k] for k in members]
            info = {"layers": members, "spans": [list(sp[k]) for k in members]}
            if all(k in teachers_own for k in members):
                # the teacher's own layer standing for itself alone: its target is its output, nothing to learn
                reports.append({"steps": 0, "loss_first": 0.0, "loss_last": 0.0, "tokens_seen": 0,
                                "stopped_early": False, "resumed_from": None, "seconds": 0.0, "validation": [],
                                "skipped": "the teacher's layer, alone in its span", **info})
            elif ck is not None and phase in ck.done:
                reports.append({**ck.done[phase], **info})
            else:
                def on(base):
                    def forward(idx):
                        at = idx + base
                        x = x_in.t[at].to(device)
                        ys = _train_layers(student, layers, x, pos, grad_checkpoint)
                        return {"hidden": torch.cat([y / c for y, c in zip(ys, scale)], -1),
                                "hidden_target": torch.cat([o.t[at].to(device) / c for o, c in zip(outs, scale)], -1)}
                    return forward

                params = [p for layer in layers for p in layer.parameters()]
                validate = None
                if nv:
                    on_val = on(0)
                    validate = lambda: evaluate_loss(on_val, nv, weights, batch_size)  # noqa: E731
                with training_only(student.model, params):
                    rep = distill(on(nv), params, n, steps=steps, lr=lr, batch_size=batch_size, weights=weights,
                                  seed=seed, progress=progress, label=f"{phase} of {K}", validate=validate,
                                  eval_every=eval_every, patience=patience, checkpoint=ck, phase=phase,
                                  autocast=autocast)
                r = _phase_report(rep, batch_size * T)
                if ck is not None:
                    ck.finish(phase, r)
                reports.append({**r, **info})
            x_in.close()
            for o in outs[:-1]:
                o.close()
            x_in = outs[-1]
    finally:
        x_in.close()
    return reports
