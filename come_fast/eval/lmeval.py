"""Evaluation through lm-evaluation-harness (the optional extra ``.[eval]``).

- ``ComeFastLM``, registered with lm-eval as the model ``come_fast``: lm-eval's
  ``HFLM`` whose ``loglikelihood`` runs the token prefix that the choices of a
  question share once and scores the choices on its KV cache, several
  questions per pair of forward passes (up to ``batch_size`` requests), the
  output head applied only at the scored positions (``tasks.score_groups``).
  Tokenization, truncation, the (log-prob, is-greedy) answers and everything
  else are HFLM's; documents with a single request (``loglikelihood`` tasks),
  rolling loglikelihoods and generation take HFLM's own path unchanged.
  ``pretrained`` may also be a come_fast name (``smollm2-135m``) or any folder
  ``come_fast.load_model`` reads (FinerCut sublayers, per-layer MLP widths).
- ``evaluate_zero_shot``: the zero-shot part of ``come_fast.evaluate``, run by
  lm-eval's evaluator on the tasks in ``lm_eval_tasks/`` (the stock task
  definitions reading the local files), returned in come_fast's structure.
- ``python -m come_fast.eval.lmeval ARGS`` (or ``come-fast-lm-eval ARGS``): the
  ``lm_eval`` command with the ``come_fast`` model registered and the local
  tasks (``come_fast_piqa`` ..., tag ``come_fast_zeroshot``) on the include path.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import sys
import time
from typing import Optional, Sequence

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .lm_eval_tasks import LM_EVAL_TASKS, TASKS_DIR
from .tasks import answers_string, get_task, score_groups

__all__ = ["ComeFastLM", "evaluate_zero_shot", "lm_eval_version", "main"]


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _dtype(dtype, source) -> torch.dtype:
    """lm-eval's ``dtype`` model argument for a come_fast load: a torch dtype
    or its name; ``auto`` is the folder's stored dtype (float32 where none)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        import json

        cfg = os.path.join(str(source), "config.json")
        stored = None
        if os.path.isfile(cfg):
            with open(cfg, encoding="utf-8") as f:
                c = json.load(f)
            stored = c.get("dtype") or c.get("torch_dtype")
        return getattr(torch, stored) if isinstance(stored, str) and hasattr(torch, stored) else torch.float32
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return value


def _device(device) -> torch.device:
    # HFLM's rule for a model it loads itself: a CUDA device that is not there
    # (the CLI's default is cuda:0) falls back to the CPU.
    if device in (None, "auto") or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@register_model("come_fast")
class ComeFastLM(HFLM):
    """lm-eval's HFLM with the shared-context fast path for multiple-choice
    log-likelihoods (see the module docstring).

    ``batch_size`` (HFLM's, 1 by default on lm_eval's command line) is the
    number of requests per forward pass; 16 is a good value on a CPU (see
    benchmarks/lmeval_check/README.md). Extra arguments: ``share_prefix``
    (default True; False gives HFLM's own path for every request) and
    ``progress`` (a bar per loglikelihood call).
    """

    def __init__(self, pretrained, tokenizer=None, share_prefix: bool = True, progress: bool = True,
                 dtype="auto", device=None, **kwargs):
        self.source = pretrained if isinstance(pretrained, (str, os.PathLike)) else None
        if self.source is not None:
            from ..models import load_model

            model, tok = load_model(str(pretrained), dtype=_dtype(dtype, pretrained), device=_device(device))
            pretrained, tokenizer = model, (tok if tokenizer is None else tokenizer)
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        self.share_prefix = share_prefix
        self.progress = progress

    def get_model_info(self) -> dict:
        # HFLM asks the hub for the sha of `pretrained` (a model object here, or a
        # come_fast name): nothing to ask.
        info = {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": getattr(self.model, "dtype", ""), "model_revision": self.revision, "model_sha": ""}
        if self.source is not None:
            info["come_fast_source"] = str(self.source)
        return info

    def _requests_per_pass(self) -> int:
        # HFLM's batch_size (requests per forward pass); "auto" is not probed here.
        bs = self.batch_size
        return int(bs) if str(bs).isdigit() else min(int(self.max_batch_size or 32), 32)

    def _fast_path_applies(self) -> bool:
        m = self.model
        return (self.share_prefix and self.backend == "causal" and self.world_size == 1
                and hasattr(m, "get_decoder") and hasattr(m, "get_output_embeddings")
                and m.get_output_embeddings() is not None
                # the fast path applies the output head itself: no model-specific logit post-processing
                and getattr(self.config, "final_logit_softcapping", None) is None)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if not self._fast_path_applies() or self.enable_thinking:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        # Tokenized as TemplateLM.loglikelihood does (an empty context conditions on the prefix token).
        encoded = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                pair = ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
            else:
                pair = self._encode_pair(context, continuation)
            encoded.append(((context, continuation), *pair))
        # The requests of one document (the choices of one question) share their context.
        groups: dict = {}
        for i, req in enumerate(requests):
            key = (req.task_name, req.doc_id) if req.doc_id is not None else ("", -1 - i)
            groups.setdefault(key, []).append(i)
        results: list = [None] * len(requests)
        singles = [g[0] for g in groups.values() if len(g) == 1]
        if singles:  # nothing to share: HFLM's batched path
            for i, answer in zip(singles, self._loglikelihood_tokens([encoded[i] for i in singles],
                                                                    disable_tqdm=True)):
                results[i] = answer
        shared = [g for g in groups.values() if len(g) > 1]
        # Longest documents first (as HFLM sorts), packed up to batch_size requests per pass.
        shared.sort(key=lambda g: -max(len(encoded[i][1]) + len(encoded[i][2]) for i in g))
        chunks, chunk = [], []
        for g in shared:
            if chunk and sum(map(len, chunk)) + len(g) > self._requests_per_pass():
                chunks.append(chunk)
                chunk = []
            chunk.append(g)
        if chunk:
            chunks.append(chunk)
        from tqdm.auto import tqdm

        autocast = torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                  enabled=self.mixed_precision_dtype is not None)
        bar = tqdm(total=len(shared), desc="loglikelihood (shared context)", unit="doc",
                   disable=disable_tqdm or not self.progress or self.rank != 0)
        with torch.inference_mode(), autocast:
            for chunk in chunks:
                scores = score_groups(self.model, [[encoded[i][1:] for i in g] for g in chunk], self.max_length,
                                      share_prefix=True, softmax_dtype=self.softmax_dtype)
                for g, group_scores in zip(chunk, scores):
                    for i, answer in zip(g, group_scores):
                        results[i] = answer
                        self.cache_hook.add_partial("loglikelihood", encoded[i][0], answer)
                bar.update(len(chunk))
        bar.close()
        return results


# ---------------------------------------------------------------------------
# come_fast.evaluate's zero-shot tasks through lm-eval's evaluator
# ---------------------------------------------------------------------------

_NOISE = ("`pretrained` model kwarg is not of type `str`", "Custom kwargs can be passed to `--metadata`",
          "model.chat_template was called", "appears to be an")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _NOISE)


@contextlib.contextmanager
def _quiet_lm_eval(progress: bool):
    """lm-eval's known-harmless warnings out (its INFO lines too unless
    ``progress``), datasets' map bars off; restored afterwards."""
    import datasets

    log = logging.getLogger("lm_eval")
    flt, level = _DropNoise(), log.level
    handlers = [log] + list(log.handlers) + list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(flt)
    import lm_eval.api.task as task_module

    task_tqdm = task_module.tqdm
    if not progress:
        log.setLevel(logging.ERROR)
        task_module.tqdm = functools.partial(task_tqdm, disable=True)  # "building contexts" bars
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(flt)
        log.setLevel(level)
        task_module.tqdm = task_tqdm
        if bars_were_on:
            datasets.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def _keep_rng():
    # simple_evaluate seeds python, numpy and torch (1234): a sweep that
    # evaluates between compressions must not have its random streams reset.
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _keep_tokenizer_and_mode(model, tokenizer):
    # HFLM sets a missing pad token on the tokenizer and puts the model in eval mode.
    pad = getattr(tokenizer, "pad_token", None)
    was_training = model.training
    try:
        yield
    finally:
        if getattr(tokenizer, "pad_token", None) != pad:
            tokenizer.pad_token = pad
        model.train(was_training)


def evaluate_zero_shot(model, tokenizer, names: Sequence[str], data_dir, limit: Optional[int] = None,
                       start: int = 0, batch_size: int = 16, progress: bool = True,
                       max_length: Optional[int] = None, share_prefix: bool = True) -> dict:
    """``{task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n",
    "headline", "chance", "seconds", "correct"}}`` for come_fast's task names, each scored
    by lm-eval's evaluator (``simple_evaluate``) on the local files: examples
    ``start`` .. ``start + limit - 1`` in file order (all from ``start`` when
    ``limit`` is None). ``batch_size``: requests per forward pass (the choices
    of a question always run together). The tasks' documents are built once
    for all ``names``; ``seconds`` is each task's evaluation (requests, model,
    metrics)."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    out = {}
    with _quiet_lm_eval(progress), _keep_rng(), _keep_tokenizer_and_mode(model, tokenizer):
        lm = ComeFastLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                        share_prefix=share_prefix, progress=progress)
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                              metadata={"data_dir": str(data_dir)})
        loaded = manager.load([LM_EVAL_TASKS[name][0] for name in names])["tasks"]
        for name in names:
            spec = get_task(name)
            task = LM_EVAL_TASKS[name][0]
            task_obj = loaded[task]
            # what simple_evaluate does to a task before evaluating it (zero-shot, its default seed)
            if task_obj.get_config("num_fewshot") is None:
                task_obj.set_config(key="num_fewshot", value=0)
            task_obj.set_fewshot_seed(seed=1234)
            if start:
                n_docs = len(task_obj.eval_docs)
                stop = n_docs if limit is None else min(n_docs, start + limit)
                if start >= stop:
                    raise ValueError(f"{name}: start={start} is past the task's {n_docs} examples")
                which = {"samples": {task: list(range(start, stop))}}
            else:
                which = {"limit": limit}
            t0 = time.perf_counter()
            # lm-eval's evaluator itself (simple_evaluate minus model loading and environment logging)
            res = evaluate(lm=lm, task_dict={"tasks": {task: task_obj}, "groups": {}}, log_samples=True, **which)
            metrics = res["results"][task]
            r = {}
            for m in spec.metrics:
                r[m] = float(metrics[f"{m},none"])
                se = metrics.get(f"{m}_stderr,none")
                r[f"{m}_stderr"] = float(se) if isinstance(se, (int, float)) else None
            r["n"] = int(res["n-samples"][task]["effective"])
            samples = sorted(res["samples"][task], key=lambda e: e["doc_id"])
            r["correct"] = answers_string([e[spec.headline] for e in samples])
            r.update(headline=spec.headline, chance=spec.chance, seconds=round(time.perf_counter() - t0, 3))
            out[name] = r
    return out


# ---------------------------------------------------------------------------
# python -m come_fast.eval.lmeval: lm_eval with our model and tasks
# ---------------------------------------------------------------------------


def _include_our_tasks() -> None:
    """Every TaskManager the lm_eval command makes also indexes lm_eval_tasks/."""
    import lm_eval.tasks as lt

    cls = lt.TaskManager
    if getattr(cls, "_come_fast_tasks", False):
        return
    original = cls.__init__

    def __init__(self, *args, include_path=None, **kwargs):
        paths = [] if include_path is None else (
            list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
        if str(TASKS_DIR) not in {str(p) for p in paths}:
            paths.append(str(TASKS_DIR))
        original(self, *args, include_path=paths, **kwargs)

    cls.__init__ = __init__
    cls._come_fast_tasks = True


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``lm_eval`` (its whole command line) with ``--model come_fast``
    registered and the ``come_fast_*`` local tasks included."""
    from lm_eval.__main__ import cli_evaluate

    _include_our_tasks()
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
