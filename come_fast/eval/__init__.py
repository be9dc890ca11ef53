"""Evaluation harness: WikiText-2 perplexity and seven zero-shot tasks.

``evaluate(model, tokenizer, data_dir=...)`` runs everything and returns a
JSON-serialisable dict; ``to_markdown({"dense": r0, "pruned": r1})`` makes the
comparison table; ``above_chance_share(result, dense_result)`` gives the metric
docs/evaluation.md asks for beside the retained average accuracy.

The zero-shot tasks are scored by lm-evaluation-harness itself when it is
installed (``pip install -e ".[eval]"``): its stock task definitions on the
local files (``lm_eval_tasks/``) and its evaluator, with the model wrapped in
``lmeval.ComeFastLM`` (HFLM plus the shared-context fast path). Without it,
the built-in scorer (``tasks.py``, the same prompts and scoring written out)
runs instead, after a warning. WikiText-2 perplexity is always our own
GPTQ-style protocol (``perplexity.py``).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from .perplexity import (WIKITEXT2_TEST, check_batch_size, check_windows, wikitext2_perplexity,
                         wikitext2_perplexity_details)
from .tasks import TASKS, check_files, check_limit, check_start, get_task, load_examples
from .tasks import evaluate_task as builtin_evaluate_task

PERPLEXITY_TASK = "wikitext2"
ZERO_SHOT_TASKS = tuple(TASKS)  # piqa, hellaswag, winogrande, arc_easy, arc_challenge, boolq, openbookqa
ALL_TASKS = (PERPLEXITY_TASK,) + ZERO_SHOT_TASKS
KNOWN_TASKS = ALL_TASKS

__all__ = [
    "ALL_TASKS", "ZERO_SHOT_TASKS", "TASKS", "evaluate", "evaluate_task", "wikitext2_perplexity",
    "above_chance_share", "to_markdown", "write_json_atomic", "default_data_dir", "load_examples",
    "HARNESSES", "zero_shot_harness", "paired_difference",
]

HARNESSES = ("auto", "lm-eval", "builtin")
_WARNED_BUILTIN = False


def _check_task_batch_size(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"task_batch_size must be a positive integer (requests per forward pass), got {n!r}")


def _lm_eval_importable() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def zero_shot_harness(harness: str = "auto") -> str:
    """Which scorer the zero-shot tasks get: ``"lm-eval"`` or ``"builtin"``.

    ``harness="auto"`` takes lm-eval when it is installed and warns (once) when
    it falls back to the built-in scorer; ``"lm-eval"`` insists on it;
    ``"builtin"`` always takes the built-in one."""
    global _WARNED_BUILTIN
    if harness not in HARNESSES:
        raise ValueError(f"harness must be one of {', '.join(HARNESSES)}, got {harness!r}")
    if harness == "builtin":
        return "builtin"
    if _lm_eval_importable():
        return "lm-eval"
    if harness == "lm-eval":
        raise ImportError("harness='lm-eval' needs lm-evaluation-harness: pip install -e \".[eval]\" "
                          "(or pip install lm-eval==0.4.13)")
    if not _WARNED_BUILTIN:
        _WARNED_BUILTIN = True
        warnings.warn("lm-eval is not installed: the zero-shot tasks are scored by come_fast's built-in copy of "
                      "its task definitions (same prompts and scoring); pip install -e \".[eval]\" to score them "
                      "with lm-eval itself", stacklevel=3)
    return "builtin"


def _harness_label(which: str) -> str:
    if which == "builtin":
        return "builtin"
    from .lmeval import lm_eval_version

    return f"lm-eval {lm_eval_version()}"


def evaluate_task(model, tokenizer, name: str, data_dir, limit: Optional[int] = None, progress: bool = True,
                  max_length: Optional[int] = None, start: int = 0, harness: str = "auto",
                  task_batch_size: int = 16) -> dict:
    """Zero-shot accuracy of ``model`` on one task (lm-eval when installed, see
    ``zero_shot_harness``), examples ``start`` .. ``start + limit - 1``;
    ``task_batch_size`` requests (choices) per forward pass. Returns ``{"acc",
    "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n", "headline", "chance",
    "seconds", "correct"}`` (fractions; ``correct``: see ``evaluate``)."""
    check_limit(limit)
    check_start(start)
    _check_task_batch_size(task_batch_size)
    get_task(name)
    check_files(name, data_dir)
    if zero_shot_harness(harness) == "lm-eval":
        from .lmeval import evaluate_zero_shot

        return evaluate_zero_shot(model, tokenizer, [name], data_dir, limit=limit, start=start,
                                  batch_size=task_batch_size, progress=progress, max_length=max_length)[name]
    return builtin_evaluate_task(model, tokenizer, name, data_dir, limit=limit, progress=progress,
                                 max_length=max_length, start=start, batch_size=task_batch_size)


DATA_ENV = "COME_FAST_DATA_DIR"
OLD_DATA_ENV = "COME_FAST_DATA"  # the command line's old name: still read, with a DeprecationWarning, for one release


def default_data_dir() -> Path:
    """The evaluation data folder (wikitext2/, piqa/, ...): ``$COME_FAST_DATA_DIR``
    if set (``$COME_FAST_DATA``, its deprecated old name, is still read, with a
    DeprecationWarning, this release), else ``shared/data`` next to the
    repository, else ``../shared/data`` from the current folder where only that
    one exists. The one source of the default for the API and the command line."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    old = os.environ.get(OLD_DATA_ENV)
    if old:
        warnings.warn(f"${OLD_DATA_ENV} is deprecated and will not be read after this release: set "
                      f"${DATA_ENV} instead (read from {old})", DeprecationWarning, stacklevel=2)
        return Path(old)
    here = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not here.is_dir():
        try:
            beside_cwd = Path.cwd() / ".." / "shared" / "data"
        except OSError:  # the current folder is gone
            return here
        if beside_cwd.is_dir():
            return beside_cwd.resolve()
    return here


def _check_task_names(tasks: Iterable[str], known: Sequence[str] = ALL_TASKS) -> list[str]:
    """The task names of a list or a comma-separated string, each one of ``known``."""
    if isinstance(tasks, str):  # "piqa" would iterate as letters
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    names = list(tasks)
    if not names:
        raise ValueError(f"no task given; known tasks: {', '.join(known)}")
    unknown = [t for t in names if t not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(known)}")
    return names


def _check_data(tasks: Iterable[str], data_dir: Path) -> None:
    # Fail before any model time is spent, naming the missing file.
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory not found: {data_dir}")
    for name in tasks:
        if name == PERPLEXITY_TASK:
            path = data_dir / WIKITEXT2_TEST
            if not path.is_file():
                raise FileNotFoundError(f"data file for task 'wikitext2' not found: {path}")
        else:
            check_files(name, data_dir)


def evaluate(model, tokenizer, tasks: Iterable[str] = ALL_TASKS, data_dir=None, limit: Optional[int] = None,
             ppl_windows: Optional[int] = 40, progress: bool = True, baseline: Optional[Mapping] = None,
             ppl_seq_len: int = 512, batch_size: int = 1, start: int = 0, harness: str = "auto",
             task_batch_size: int = 16) -> dict:
    """Evaluate ``model`` on ``tasks``.

    ``limit=N`` keeps the first N examples of each zero-shot task (the dev slice
    is 200), from index ``start`` (``start=200, limit=300``: the examples
    docs/evaluation.md's reference numbers were measured on); ``ppl_windows`` is
    the number of 512-token WikiText-2 windows (None: the whole test set),
    ``batch_size`` of them per forward pass. The zero-shot tasks run
    ``task_batch_size`` requests (choices) per forward pass, the choices of a
    question on the KV cache of their shared context (lm-eval's ``batch_size``).
    ``harness``: who scores the zero-shot tasks, "auto" (lm-eval when installed,
    else the built-in scorer with a warning), "lm-eval" or "builtin". With
    ``baseline`` (an earlier result of this function for the dense model) the
    result also carries the above-chance share. Each task's ``correct`` holds
    the headline metric per question ("1" right, "0" wrong, in example order):
    ``paired_difference`` compares two models on the same questions with it.

    Returns::

        {"tasks": {"wikitext2": {"ppl", "windows", "tokens", "seconds"},
                   "piqa": {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n",
                            "headline", "chance", "seconds", "correct"}, ...},
         "average": {"headline": mean headline metric, "chance": ..., "tasks": [...]},
         "above_chance": {...}            # only with baseline
         "config": {...}, "seconds": total}
    """
    names = _check_task_names(tasks)
    check_limit(limit)
    check_start(start)
    check_windows(ppl_windows)
    check_batch_size(batch_size)
    _check_task_batch_size(task_batch_size)
    if tokenizer is None:
        raise ValueError("evaluation needs the model's tokenizer, and none was found: the model folder holds no "
                         "tokenizer files (save one beside the checkpoint) and none was passed (tokenizer=)")
    data_dir = Path(default_data_dir() if data_dir is None else data_dir)
    _check_data(names, data_dir)
    t_start = time.perf_counter()
    zero_shot = [n for n in names if n != PERPLEXITY_TASK]
    which = zero_shot_harness(harness) if zero_shot else None
    lm_eval_results = {}
    if which == "lm-eval":
        from .lmeval import evaluate_zero_shot

        lm_eval_results = evaluate_zero_shot(model, tokenizer, zero_shot, data_dir, limit=limit, start=start,
                                             batch_size=task_batch_size, progress=progress)
    per_task = {}
    for name in names:
        if name in lm_eval_results:
            per_task[name] = lm_eval_results[name]
        elif name == PERPLEXITY_TASK:
            t0 = time.perf_counter()
            d = wikitext2_perplexity_details(model, tokenizer, data_dir, seq_len=ppl_seq_len, windows=ppl_windows,
                                             progress=progress, batch_size=batch_size)
            per_task[name] = {"ppl": d["ppl"], "windows": d["windows"], "tokens": d["tokens"],
                              "seconds": round(time.perf_counter() - t0, 3)}
        else:
            per_task[name] = builtin_evaluate_task(model, tokenizer, name, data_dir, limit=limit, progress=progress,
                                                   start=start, batch_size=task_batch_size)
    result = {"tasks": per_task}
    avg = average_accuracy(result)
    if avg is not None:
        result["average"] = avg
    if baseline is not None:
        result["above_chance"] = above_chance_share(result, baseline)
    result["config"] = {"limit": limit, "start": start, "ppl_windows": ppl_windows, "ppl_seq_len": ppl_seq_len,
                        "task_batch_size": task_batch_size, "data_dir": str(data_dir)}
    if which is not None:
        result["config"]["harness"] = _harness_label(which)
    result["seconds"] = round(time.perf_counter() - t_start, 3)
    return result


def _headline(task_result: Mapping) -> float:
    return task_result[task_result["headline"]]


def average_accuracy(result: Mapping) -> Optional[dict]:
    """Mean headline metric over the zero-shot tasks present (None if none)."""
    zs = [t for t in ZERO_SHOT_TASKS if t in result["tasks"]]
    if not zs:
        return None
    return {"headline": sum(_headline(result["tasks"][t]) for t in zs) / len(zs),
            "chance": sum(get_task(t).chance for t in zs) / len(zs), "tasks": zs}


def above_chance_share(result: Mapping, baseline: Mapping) -> dict:
    """(acc - chance) / (dense acc - chance) per task, on the headline metric.

    ``per_task[t]`` is None where the dense model is not above chance (the ratio
    means nothing there). ``mean`` averages the defined per-task shares;
    ``of_average`` is the same ratio on the task-averaged accuracies, which is
    steadier when a task's dense margin over chance is tiny (WinoGrande).
    ``retained`` is the papers' retained average accuracy (avg / dense avg).
    """
    per_task = {}
    tasks = [t for t in ZERO_SHOT_TASKS if t in result["tasks"] and t in baseline["tasks"]]
    for t in tasks:
        chance = get_task(t).chance
        margin = _headline(baseline["tasks"][t]) - chance
        per_task[t] = (_headline(result["tasks"][t]) - chance) / margin if margin > 0 else None
    defined = [v for v in per_task.values() if v is not None]
    out = {"per_task": per_task, "mean": sum(defined) / len(defined) if defined else None,
           "of_average": None, "retained": None}
    if tasks:
        acc = sum(_headline(result["tasks"][t]) for t in tasks) / len(tasks)
        dense = sum(_headline(baseline["tasks"][t]) for t in tasks) / len(tasks)
        chance = sum(get_task(t).chance for t in tasks) / len(tasks)
        out["of_average"] = (acc - chance) / (dense - chance) if dense > chance else None
        out["retained"] = acc / dense if dense > 0 else None
    return out


def paired_difference(a: Mapping, b: Mapping, tasks: Optional[Sequence[str]] = None) -> dict:
    """Model a minus model b on the same questions: the task-mean headline
    accuracy difference and its paired standard error.

    ``a``, ``b``: ``{task: task result}`` (``result["tasks"]`` of ``evaluate``,
    or a sweep cell's ``tasks``) whose results carry ``correct``, over the same
    examples; ``tasks``: the zero-shot tasks both have when None. Each task
    counts equally, as in the tables' means. Two models scored on the same
    questions err on many of the same ones, so the difference's error comes
    from the questions they answer differently: ``se`` is the standard error of
    the per-question differences (per task, then combined as a mean of
    independent tasks), usually well below the unpaired one (``se_unpaired``).
    ``p``: two-sided, normal approximation. Per task: ``diff``, ``se``, ``n``,
    ``only_a`` / ``only_b`` (questions only that model got right)."""
    tasks = [t for t in ZERO_SHOT_TASKS if t in a and t in b] if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("no zero-shot task scored for both models")
    per, var, var_unpaired = {}, 0.0, 0.0
    for t in tasks:
        ra, rb = a[t], b[t]
        if "correct" not in ra or "correct" not in rb:
            raise ValueError(f"{t}: a result without per-question answers ('correct'); score it again")
        ca, cb = ra["correct"], rb["correct"]
        if len(ca) != len(cb) or ra.get("start", 0) != rb.get("start", 0):
            raise ValueError(f"{t}: the two results are not on the same questions "
                             f"({len(ca)} from {ra.get('start', 0)} vs {len(cb)} from {rb.get('start', 0)})")
        n = len(ca)
        d = [int(x) - int(y) for x, y in zip(ca, cb)]
        mean = sum(d) / n
        v = sum((x - mean) ** 2 for x in d) / (n - 1) / n if n > 1 else math.nan
        pa, pb = ca.count("1") / n, cb.count("1") / n
        var += v
        var_unpaired += (pa * (1 - pa) + pb * (1 - pb)) / max(n - 1, 1)
        per[t] = {"diff": mean, "se": math.sqrt(v), "n": n,
                  "only_a": sum(x == 1 for x in d), "only_b": sum(x == -1 for x in d)}
    k = len(tasks)
    diff = sum(p["diff"] for p in per.values()) / k
    se = math.sqrt(var) / k
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.inf)
    return {"diff": diff, "se": se, "se_unpaired": math.sqrt(var_unpaired) / k,
            "p": math.erfc(abs(z) / math.sqrt(2)), "tasks": per}


_SHORT = {"wikitext2": "Wiki2 PPL", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoG",
          "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "boolq": "BoolQ", "openbookqa": "OBQA"}


def _fmt_ppl(x: float) -> str:
    return "inf" if not math.isfinite(x) else (f"{x:.2f}" if x < 1000 else f"{x:.1f}")


def to_markdown(results_by_model: Mapping[str, Mapping]) -> str:
    """One table: rows = models, columns = WikiText-2 perplexity, each task's
    headline metric (in %), their average, and the above-chance share when a
    result carries one. A note under the table gives the noise level."""
    present = [t for t in ALL_TASKS if any(t in r["tasks"] for r in results_by_model.values())]
    zs = [t for t in present if t != PERPLEXITY_TASK]
    has_share = any("above_chance" in r for r in results_by_model.values())
    header = ["model"] + [_SHORT[t] + (f" ({get_task(t).headline})" if t != PERPLEXITY_TASK else "")
                         for t in present]
    if zs:
        header.append("Avg")
    if has_share:
        header.append("above-chance")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    stderrs, ns = [], set()
    for model_name, r in results_by_model.items():
        cells = [str(model_name)]
        for t in present:
            tr = r["tasks"].get(t)
            if tr is None:
                cells.append("-")
            elif t == PERPLEXITY_TASK:
                cells.append(_fmt_ppl(tr["ppl"]))
            else:
                cells.append(f"{100 * _headline(tr):.1f}")
                se = tr.get(f"{tr['headline']}_stderr")
                if se is not None:
                    stderrs.append(se)
                ns.add(tr["n"])
        if zs:
            avg = [_headline(r["tasks"][t]) for t in zs if t in r["tasks"]]
            cells.append(f"{100 * sum(avg) / len(avg):.1f}" if len(avg) == len(zs) else "-")
        if has_share:
            share = (r.get("above_chance") or {}).get("of_average")
            cells.append("-" if share is None else f"{100 * share:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    if stderrs:
        n_text = ", ".join(str(n) for n in sorted(ns))
        lines.append("")
        lines.append(f"Accuracies in %, n = {n_text} examples per task; standard error about "
                     f"{100 * sum(stderrs) / len(stderrs):.1f} points, so differences under about "
                     f"{200 * max(stderrs):.0f} points are noise.")
    return "\n".join(lines) + "\n"


def write_json_atomic(obj, path) -> None:
    """Write JSON through a temporary file in the same folder and os.replace it
    into place, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the usual umask-based mode so a
        # result file is as readable as one written by open().
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
