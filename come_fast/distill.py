"""A small shared trainer: distillation of a part of a model on fixed tensors.

``distill(forward, params, n, ...)`` runs AdamW for ``steps`` steps; each step
draws ``batch_size`` of the ``n`` examples (seeded), calls ``forward(idx)`` and
minimises

    mse * MSE(hidden, hidden_target) + kl * T^2 KL(softmax(logits_target / T) || softmax(logits / T))
    + ce * CE(logits, labels)

over whichever of those keys ``forward`` returns (weights are explicit; a term
whose weight is 0 is not computed). Instead of ``logits``, ``forward`` may
return the head's input and the head (``head_input``, ``head_weight``,
``head_bias``) and the teacher as ``logits_target`` or as its own head input
and head (``head_input_target``, ``head_weight_target``, ``head_bias_target``):
then the KL term is the fused chunked linear + KL op
(``come_fast.dispatch.Ops.linear_kl``: the same value and gradients, without
ever holding the [tokens, vocab] logits of either model). It knows nothing
about layers: the caller decides what is trained (``params``) and what the student and teacher are.
Used by Reverse's recovery fine-tune and LLM-Streamline's replacement layer;
CoMe's hierarchical distillation can build on it (one call per layer group).

Long runs (come_fast.posttrain's distillation): ``validate`` (a callable
returning the held-apart loss) is run every ``eval_every`` steps and stops the
run after ``patience`` evaluations without a new best; ``checkpoint`` (a
``RunCheckpoint``) writes the trained tensors, the optimizer state, the step,
the data order and the random state every ``checkpoint.every`` steps,
atomically, and a run started again with the same checkpoint continues where
the last one stopped, to the same parameters as an uninterrupted run.

CPU budget: meant for tens to a few hundred steps on small batches.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .dispatch import Ops


@contextmanager
def training_only(model: torch.nn.Module, params: Iterable[torch.nn.Parameter]):
    """Within the block only ``params`` of ``model`` take gradients; the
    previous flags come back afterwards, also on error."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


@dataclass
class LossWeights:
    mse: float = 1.0
    kl: float = 0.0
    ce: float = 0.0
    temperature: float = 1.0


@dataclass
class DistillReport:
    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    history: list = field(default_factory=list)  # loss per step
    weights: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    validation: list = field(default_factory=list)  # [step, held-apart loss] per evaluation (step 0: before)
    stopped_early: bool = False  # ``patience`` evaluations without a new best ended the run
    resumed_from: Optional[int] = None  # the step a checkpoint continued from


class ResumeError(ValueError):
    pass


class RunCheckpoint:
    """A training run's checkpoint in a folder (``distill_state.pt``): the
    tensors in ``params`` (name -> parameter; every tensor the run trains,
    across its phases), the current phase's optimizer state, step, data
    order and random state, and the reports of the phases already done.

    ``key``: what makes two runs the same run (settings, data, starting
    weights; JSON-able). ``load()`` reads the folder: a checkpoint of another
    key, or a non-empty folder that holds none, raises ``ResumeError`` before
    anything is trained or written. Writes go to a temporary file, fsynced,
    then renamed over the old one: an interruption leaves the previous
    checkpoint whole. ``every``: steps between checkpoints."""

    FILE = "distill_state.pt"
    FORMAT = 1

    def __init__(self, folder, key: dict, params: dict, every: int = 50):
        self.folder = Path(os.fspath(folder)).expanduser()
        self.key = json.loads(json.dumps(key))  # the form it is compared in after a reload
        self.params = dict(params)
        self.every = int(every)
        self.phase_state: Optional[dict] = None  # the interrupted phase's state, after load()
        self.done: dict = {}  # phase -> its report, after load() / finish()
        self.meta: dict = {}  # the caller's own (e.g. the loss before training)
        self.saves = 0

    @property
    def path(self) -> Path:
        return self.folder / self.FILE

    @classmethod
    def read_key(cls, folder) -> Optional[dict]:
        """The key of the checkpoint in ``folder``; None when there is none;
        ResumeError for a folder that is not a checkpoint folder."""
        folder = Path(os.fspath(folder)).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ResumeError(f"distill_resume={str(folder)!r} is a file, not a folder")
        path = folder / cls.FILE
        if not path.is_file():
            # a write cut off before the first checkpoint leaves only its temporary file
            others = [p.name for p in folder.iterdir() if p.name != cls.FILE + ".tmp"] if folder.is_dir() else []
            if others:
                raise ResumeError(f"distill_resume folder {folder} is not empty and holds no distillation checkpoint "
                                  f"({cls.FILE}; it holds {sorted(others)[:5]}): give an empty or new folder")
            return None
        try:
            st = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ResumeError(f"distill_resume: {path} is not readable ({e.__class__.__name__}: {str(e)[:200]})") from None
        if not isinstance(st, dict) or st.get("format") != cls.FORMAT or "key" not in st:
            raise ResumeError(f"distill_resume: {path} is not a come_fast distillation checkpoint")
        return json.loads(st["key"])

    @staticmethod
    def compare(saved: dict, key: dict, folder, fields: Optional[Iterable[str]] = None) -> None:
        """ResumeError naming the fields where ``saved`` and ``key`` differ (only ``fields`` when given)."""
        names = sorted(set(saved) | set(key)) if fields is None else sorted(fields)
        diff = [k for k in names if saved.get(k) != key.get(k)]
        if diff:
            show = "; ".join(f"{k}: {saved.get(k)!r:.60} there, {key.get(k)!r:.60} here" for k in diff)
            raise ResumeError(f"distill_resume folder {folder} holds a checkpoint of another run ({show}); "
                              "give another folder, or the settings of that run")

    def load(self) -> bool:
        """Read the folder; True when a checkpoint of this run was there (the
        parameters are then set from it). Nothing is written."""
        saved = self.read_key(self.folder)
        if saved is None:
            return False
        self.compare(saved, self.key, self.folder)
        st = torch.load(self.path, map_location="cpu", weights_only=True)
        missing = sorted(set(self.params) - set(st["params"]))
        if missing:
            raise ResumeError(f"distill_resume: {self.path} lacks parameters {missing[:5]}")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(st["params"][name])
        self.phase_state = st.get("phase_state")
        self.done = dict(st.get("done") or {})
        self.meta = dict(st.get("meta") or {})
        return True

    def state_of(self, phase: str) -> Optional[dict]:
        st = self.phase_state
        return st if st is not None and st.get("phase") == phase else None

    def save(self, phase_state: Optional[dict]) -> None:
        self.phase_state = phase_state
        self.folder.mkdir(parents=True, exist_ok=True)
        blob = {"format": self.FORMAT, "key": json.dumps(self.key, sort_keys=True),
                "params": {n: p.detach().cpu().clone() for n, p in self.params.items()},
                "phase_state": phase_state, "done": self.done, "meta": self.meta}
        tmp = self.folder / (self.FILE + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        try:  # the rename itself, durable
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        self.saves += 1

    def finish(self, phase: str, report: dict) -> None:
        """Record ``phase`` as done (its report) and write the checkpoint."""
        self.done[phase] = report
        self.save(None)


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]], extra: str = "") -> str:
    """A short hash of named tensors' names, shapes, dtypes and exact values."""
    h = hashlib.sha256(extra.encode())
    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def fused_kl(out: dict, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student), mean over tokens, from the head input and head
    (``head_input``/``head_weight``/``head_bias``) and the teacher's ``logits_target``
    or ``head_input_target``/``head_weight_target``/``head_bias_target``: the chunked
    linear + KL op of the tensors' device (Triton on CUDA, PyTorch otherwise)."""
    h = out["head_input"]
    if "logits_target" in out:
        teacher = {"teacher_logits": out["logits_target"]}
    else:
        teacher = {"teacher_hidden": out["head_input_target"], "teacher_weight": out["head_weight_target"],
                   "teacher_bias": out.get("head_bias_target")}
    return Ops("auto", h.device).linear_kl(h, out["head_weight"], out.get("head_bias"), temperature=temperature,
                                           **teacher)


def loss_terms(out: dict, w: LossWeights) -> dict:
    """The weighted terms of one batch (only those with a weight and their inputs present)."""
    terms = {}
    if w.mse and "hidden" in out:
        terms["mse"] = w.mse * F.mse_loss(out["hidden"].float(), out["hidden_target"].float())
    if w.kl and "head_input" in out and "logits" not in out:
        terms["kl"] = w.kl * fused_kl(out, w.temperature)
    if w.ce and "head_input" in out and "logits" not in out:  # cross-entropy still needs the logits
        out = {**out, "logits": F.linear(out["head_input"], out["head_weight"], out.get("head_bias"))}
    if (w.kl or w.ce) and "logits" in out:
        logits = out["logits"].float()
        logits = logits.reshape(-1, logits.shape[-1])
        if w.kl and "kl" not in terms:
            T = w.temperature
            tgt = out["logits_target"].float().reshape(-1, logits.shape[-1])
            terms["kl"] = w.kl * T * T * F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(tgt / T, -1),
                                                  log_target=True, reduction="batchmean")
        if w.ce:
            terms["ce"] = w.ce * F.cross_entropy(logits, out["labels"].reshape(-1))
    if not terms:
        raise ValueError("distill: no loss term has both a non-zero weight and its tensors in forward()'s output")
    return terms


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}  # float16 would need loss scaling, which distill() has not


def mixed_precision(dtype: Optional[torch.dtype], device: torch.device):
    """``torch.autocast`` on ``device`` in ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def distill(forward: Callable[[torch.Tensor], dict], params: Iterable[torch.nn.Parameter], n: int, *,
            steps: int = 100, lr: float = 1e-4, weight_decay: float = 0.0, batch_size: int = 2,
            weights: Optional[LossWeights] = None, schedule: str = "cosine", warmup: int = 0,
            grad_clip: Optional[float] = 1.0, seed: int = 0, progress: bool | Callable = False,
            label: str = "distill", validate: Optional[Callable[[], float]] = None, eval_every: int = 0,
            patience: Optional[int] = None, checkpoint: Optional[RunCheckpoint] = None,
            phase: Optional[str] = None, autocast: Optional[torch.dtype] = None) -> DistillReport:
    """Train ``params`` for ``steps`` AdamW steps on batches of the ``n`` examples.

    ``forward(idx)`` (idx: LongTensor of example indices) returns a dict with
    some of ``hidden``/``hidden_target``, ``logits``/``logits_target`` (or the
    ``head_*`` keys of the fused KL, see the module docstring), ``labels``;
    targets must not require grad. ``schedule``: "cosine" (to 0)
    or "constant", after ``warmup`` linear steps. ``progress``: True for a
    tqdm bar (its postfix: the mean loss of the last 20 steps and the last
    held-apart loss), or a callable ``(label, done, total)``.

    ``validate()``: the held-apart loss, taken before the first step and
    every ``eval_every`` steps (and after the last); with ``patience`` P the
    run stops after P evaluations in a row without a new best (the
    parameters are those of the step it stopped at). ``checkpoint``: a
    ``RunCheckpoint`` to write every ``checkpoint.every`` steps and to
    continue from when it holds this ``phase`` (default ``label``) of the run.
    ``autocast`` (e.g. ``torch.bfloat16``): each step's forward and loss run
    under ``torch.autocast`` in that dtype (mixed precision: the parameters,
    their gradients and the AdamW state stay as they are; on this project's
    CPU, bfloat16 makes a SmolLM2 step about twice as fast:
    benchmarks/bench_distill_step.py); ``validate`` is not affected.
    """
    w = weights or LossWeights()
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("distill: nothing to train (no parameter requires grad)")
    if n < 1 or steps < 0 or batch_size < 1:
        raise ValueError(f"distill: need n >= 1, steps >= 0, batch_size >= 1 (got {n}, {steps}, {batch_size})")
    if (eval_every or patience) and validate is None:
        raise ValueError("distill: eval_every and patience need validate= (a held-apart loss)")
    phase = phase or label
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if warmup and step < warmup:
            return lr * (step + 1) / warmup
        if schedule == "constant":
            return lr
        t = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    g = torch.Generator().manual_seed(seed)
    history: list = []
    validation: list = []
    best, bad, stopped = math.inf, 0, False
    perm = torch.randperm(n, generator=g)
    pos, start = 0, 0
    saved = checkpoint.state_of(phase) if checkpoint is not None else None
    if saved is not None:  # continue the interrupted phase exactly where its last checkpoint stood
        opt.load_state_dict(saved["optimizer"])
        g.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        perm, pos, start = saved["perm"], int(saved["pos"]), int(saved["step"])
        history, validation = list(saved["history"]), [list(v) for v in saved["validation"]]
        best, bad = float(saved["best"]), int(saved["bad"])

    def evaluate(step: int) -> None:
        nonlocal best, bad, stopped
        loss = float(validate())
        validation.append([step, loss])
        if loss < best:
            best, bad = loss, 0
        else:
            bad += 1
            if patience and bad >= patience:
                stopped = True

    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=label, leave=False)
    t0 = time.perf_counter()
    if validate is not None and start == 0 and saved is None:
        evaluate(0)
    step = start
    with torch.enable_grad():
        while step < steps and not stopped:
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos:pos + batch_size] if batch_size <= n else torch.randint(0, n, (batch_size,), generator=g)
            pos += batch_size
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with mixed_precision(autocast, params[0].device):
                terms = loss_terms(forward(idx), w)
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            history.append(float(loss.detach()))
            step += 1
            if validate is not None and ((eval_every and step % eval_every == 0) or step == steps):
                evaluate(step)
            if checkpoint is not None and checkpoint.every and step % checkpoint.every == 0 and step < steps \
                    and not stopped:
                checkpoint.save({"phase": phase, "step": step, "optimizer": opt.state_dict(),
                                 "generator": g.get_state(), "torch_rng": torch.get_rng_state(), "perm": perm,
                                 "pos": pos, "history": history, "validation": validation, "best": best, "bad": bad})
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{sum(history[-20:]) / len(history[-20:]):.4g}"}
                if validation:
                    post["val"] = f"{validation[-1][1]:.4g}"
                bar.set_postfix(post)
            elif callable(progress):
                progress(label, step, steps)
    if bar is not None:
        bar.close()
    opt.zero_grad(set_to_none=True)
    return DistillReport(steps=step, seconds=time.perf_counter() - t0,
                         loss_first=history[0] if history else float("nan"),
                         loss_last=history[-1] if history else float("nan"), history=history,
                         weights=asdict(w), settings={"lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                                                      "schedule": schedule, "warmup": warmup, "grad_clip": grad_clip,
                                                      "seed": seed,
                                                      **({"autocast": str(autocast).replace("torch.", "")}
                                                         if autocast is not None else {})},
                         validation=validation, stopped_early=stopped, resumed_from=start if saved is not None else None)


@torch.no_grad()
def evaluate_loss(forward: Callable[[torch.Tensor], dict], n: int, weights: Optional[LossWeights] = None,
                  batch_size: int = 2) -> float:
    """The weighted loss over all ``n`` examples (mean of per-batch losses, weighted by batch size)."""
    w = weights or LossWeights()
    total = 0.0
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(i + batch_size, n))
        total += float(sum(loss_terms(forward(idx), w).values())) * len(idx)
    return total / n
