"""``come-fast bench quality``: every method x ratio on one model, one table.

Each cell (method, ratio) loads a fresh model, compresses it with the method
(same calibration tokens for all), and evaluates WikiText-2 perplexity and,
at the ratios in ``tasks_at``, the seven zero-shot tasks (come_fast.eval). A
``dense`` row (ratio 0) is the reference for the above-chance share.

Resumable: each finished piece of a cell (its compression + perplexity, its
tasks) is written at once, atomically, to ``<out>/cells/<method>@<ratio>.json``
and never recomputed; a cell whose tasks are still to come keeps its
compressed model under ``<out>/models/`` until they are done. Work runs in two
phases: compression + perplexity for every cell, then the tasks; so an
interrupted sweep has its perplexity column first.

Outputs, rewritten after every piece: ``quality.csv`` (one row per cell),
``quality.md`` (tables per ratio, the wall time per method), ``quality.png``
(average accuracy and perplexity against the achieved parameter ratio, one
line per method).
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

# CoMe's default mode with every lever off: the release's rules with only the GQA grouping
# fixed (come_fast's default before the levers; its cells were "come")
LEGACY = {"norms": "mean", "split": "bi", "pair_select": "distance", "allow_repeat": False, "compensate": None,
          "keep_last": 0}
# Whole-layer methods: each also runs with the closed-form compensation ("<method>+ls")
LS_METHODS = ("magnitude+", "shortgpt", "replaceme", "reverse", "reverse-recover", "taylor+", "laco", "slm",
              "streamline", "ppl", "come-p", "sleb")
# The sweep's methods in roughly increasing cost; "all" runs them in this order.
ALL_METHODS = ("magnitude+", "shortgpt", "replaceme", "reverse", "reverse-recover", "taylor+", "laco", "slm",
               "streamline", "ppl", "come-legacy", "come-p", "come-faithful", "sleb", "finercut",
               *(m + "+ls" for m in LS_METHODS),
               "come-legacy+fold", "come-legacy+ls", "come-legacy+search", "come-score", "come+keep0", "come+keep6", "come")
# Named variants: a registered method with fixed options. "<method>+distill" (the
# method, then 100 steps of hierarchical distillation from the original along the
# provenance) is not in "all": post-training is not part of the no-training
# comparison, and it costs as much again as the compression. ShortGPT + distill is
# the fair comparison for CoMe + distill (same training, layers deleted, not merged).
VARIANTS = {"come-faithful": ("come", {"faithful": True}), "reverse-recover": ("reverse", {"recover": True}),
            "come-legacy": ("come", LEGACY),
            # the default before the MLP channels were chosen by the refit (its cells were "come" until 2026-12-01)
            "come-score": ("come", {"mlp_select": "score", "keep_last": 0}),
            # the default before the top eighth of the layers was kept out of the merges (its cells were
            # "come" until 2026-12-01, evening)
            "come+keep0": ("come", {"keep_last": 0}),
            # the default with the top fifth of SmolLM2's layers never merged
            "come+keep6": ("come", {"keep_last": 6}),
            # CoMe's levers one at a time on top of the legacy rules (README: the ablation)
            "come-legacy+fold": ("come", {**LEGACY, "norms": "fold"}),
            "come-legacy+ls": ("come", {**LEGACY, "compensate": "ls"}),
            "come-legacy+search": ("come", {**LEGACY, "split": "search", "pair_select": "bi", "allow_repeat": True}),
            "come+distill": ("come", {"distill_steps": 100}),
            "come-legacy+distill": ("come", {**LEGACY, "distill_steps": 100}),
            "shortgpt+distill": ("shortgpt", {"distill_steps": 100}),
            "come-p+distill": ("come-p", {"distill_steps": 100}), "sleb+distill": ("sleb", {"distill_steps": 100}),
            # ablations of the two release choices the legacy rules keep (see README, "Faithful mode and the default")
            "come-all-tokens": ("come", {**LEGACY, "pair_tokens": "all"}),
            "come-raw-last": ("come", {**LEGACY, "last_boundary": "raw"})}
VARIANTS.update({m + "+ls": (VARIANTS.get(m, (m, {}))[0], {**VARIANTS.get(m, (m, {}))[1], "compensate": "ls"})
                 for m in LS_METHODS})
ABLATIONS = ("come-all-tokens", "come-raw-last")  # in the tables, not in the plot (lines on top of CoMe's)
# Methods that re-run the model once per candidate (or backpropagate) score on
# the first calibration rows only, to fit a CPU budget; recorded per cell.
# CoMe-P's grid is coarsened from 21 to 5 splits (r = 0, 1/4, ..., 1) for the same reason (each split costs
# a forward pass from the merged layer up plus the output head on all calibration tokens).
DEFAULT_METHOD_OPTIONS = {"ppl": {"score_rows": 8}, "sleb": {"score_rows": 8}, "finercut": {"score_rows": 2},
                          "come-p": {"grid_steps": 4}}
DENSE = "dense"
# Progressive methods whose run to n removals passes through the exact result
# for every smaller n (same scores, same decisions): one run at the largest
# pending ratio yields the smaller ratios' cells through ``on_step`` snapshots.
# FinerCut's steps do not change the layer count: its smaller cells are
# rebuilt from the larger run's recorded choices (methods.finercut.replay).
PREFIX_METHODS = ("come", "come-p", "sleb", "finercut")


def _cell_name(method: str, ratio: float) -> str:
    return f"{method}@{ratio:g}"


def _atomic_json(obj, path: Path) -> None:
    from .eval import write_json_atomic

    write_json_atomic(obj, path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_methods(spec) -> list[str]:
    from . import methods

    names = list(ALL_METHODS) if spec in (None, "all") else (
        [m.strip() for m in spec.split(",") if m.strip()] if isinstance(spec, str) else list(spec))
    known = set(methods.available()) | set(VARIANTS)
    bad = [m for m in names if m not in known]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; available: {', '.join(sorted(known))}")
    return names


def _method_call(name: str, options: dict) -> tuple[str, dict]:
    base, opts = VARIANTS.get(name, (name, {}))
    return base, {**DEFAULT_METHOD_OPTIONS.get(base, {}), **opts, **options.get(name, {})}


class Sweep:
    def __init__(self, model: str = "smollm2-135m", methods="all", ratios=(0.1, 0.2, 0.3), limit: Optional[int] = 200,
                 tasks_at=None, out="results", calib=None, data_dir=None, options: Optional[dict] = None,
                 keep_models: bool = False, ppl_windows: Optional[int] = 40, progress: bool = True,
                 verbose: bool = False, start: int = 0, tasks=None):
        from .eval import ZERO_SHOT_TASKS, _check_task_names, check_start, default_data_dir

        self.model_name = model
        self.methods = resolve_methods(methods)
        self.ratios = [float(r) for r in ratios]
        for r in self.ratios:
            if not 0 < r < 1:
                raise ValueError(f"ratios must lie in (0, 1), got {r}")
        self.tasks_at = set(self.ratios if tasks_at is None else [float(r) for r in tasks_at])
        self.limit = limit
        check_start(start)
        self.start = int(start)  # 200 with limit=N: examples outside the dev slice, to report on
        self.out = Path(out)
        self.calib = None if calib is None else str(calib)
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.options = options or {}
        import inspect

        from .api import compress, split_options

        named = set(inspect.signature(compress).parameters)  # distill_steps, faithful, ...: compress's own
        for m in self.methods:  # a misspelt option fails now, not hours into the sweep
            base, opts = _method_call(m, self.options)
            split_options(base, {k: v for k, v in opts.items() if k not in named})
        unused = set(self.options) - set(self.methods)
        if unused:
            raise ValueError(f"options given for method(s) not in this sweep: {', '.join(sorted(unused))}")
        self.keep_models = keep_models
        self.ppl_windows = ppl_windows
        self.progress = progress
        self.verbose = verbose
        self.zero_shot = list(ZERO_SHOT_TASKS) if tasks is None else _check_task_names(tasks, known=ZERO_SHOT_TASKS)
        (self.out / "cells").mkdir(parents=True, exist_ok=True)

    # cells ----------------------------------------------------------------------------
    def cells(self) -> list[tuple[str, float]]:
        out = [(DENSE, 0.0)]
        out += [(m, r) for m in self.methods for r in self.ratios]
        return out

    def needs_tasks(self, method: str, ratio: float) -> bool:
        return bool(self.tasks_at) and (method == DENSE or ratio in self.tasks_at)

    def path(self, method: str, ratio: float) -> Path:
        return self.out / "cells" / f"{_cell_name(method, ratio)}.json"

    def model_dir(self, method: str, ratio: float) -> Path:
        return self.out / "models" / _cell_name(method, ratio)

    def read(self, method: str, ratio: float) -> Optional[dict]:
        p = self.path(method, ratio)
        if not p.is_file():
            return None
        with open(p) as f:
            return json.load(f)

    def write(self, rec: dict) -> None:
        _atomic_json(rec, self.path(rec["method"], rec["ratio_asked"]))

    def pending(self) -> list[tuple[str, float, str]]:
        work = []
        for m, r in self.cells():
            rec = self.read(m, r) or {}
            if "ppl" not in rec:
                work.append((m, r, "compress+ppl"))
        for m, r in self.cells():
            rec = self.read(m, r) or {}
            if self.needs_tasks(m, r) and not all(t in rec.get("tasks", {}) for t in self.zero_shot):
                work.append((m, r, "tasks"))
        return work

    # running ----------------------------------------------------------------------------
    def _load_dense(self):
        from .models import load_model

        return load_model(self.model_name)

    def _compress(self, method: str, ratio: float, on_step=None):
        from . import api

        model, tok = self._load_dense()
        if method == DENSE:
            from .adapters import adapter_for, count_parameters

            n = count_parameters(model)
            return model, tok, {"achieved_ratio": 0.0, "layers": len(adapter_for(model).layers), "params": n,
                                "params_before": n, "compress_seconds": 0.0, "provenance": None, "settings": {}}
        base, opts = _method_call(method, self.options)
        kw = {} if on_step is None else {"on_step": on_step}
        res = api.compress(model, ratio=ratio, method=base, calib=self.calib, tokenizer=tok,
                           progress=bool(self.verbose), **kw, **opts)
        return res.model, tok, _info(res, opts), res

    def _evaluate(self, model, tok, tasks: list[str]) -> dict:
        from .eval import evaluate

        return evaluate(model, tok, tasks=tasks, data_dir=self.data_dir, limit=self.limit,
                        ppl_windows=self.ppl_windows, progress=bool(self.verbose))

    def _ppl_record(self, method: str, ratio: float, model, tok, info: dict, t0: float, **extra) -> dict:
        ev = self._evaluate(model, tok, ["wikitext2"])
        return {"method": method, "ratio_asked": ratio, "model": self.model_name,
                "calib": self.calib, **info, "ppl": ev["tasks"]["wikitext2"]["ppl"],
                "ppl_detail": ev["tasks"]["wikitext2"], "tasks": {},
                "eval_seconds": ev["seconds"], "cell_seconds": time.perf_counter() - t0, **extra}

    def run_compress_ppl(self, method: str, ratio: float, also: tuple = ()) -> list[float]:
        """Compress at ``ratio`` and measure perplexity. ``also``: smaller
        ratios of a PREFIX_METHODS method, taken from this run's intermediate
        steps (their compression seconds are the time to reach that step).
        Returns the ratios whose cells were written."""
        from . import api

        t0 = time.perf_counter()
        snaps = {}
        hook = None
        base, opts = _method_call(method, self.options)
        if also and base != "finercut":
            dense, _ = self._load_dense()
            want = {}
            for r in also:
                want.setdefault(api.removals_for_ratio(dense, r), []).append(r)
            del dense

            def snapshot(partial):
                for r in want.get(partial.layers_before - partial.layers_after, []):
                    api.save(partial, self.model_dir(method, r), overwrite=True)
                    snaps[r] = _info(partial, opts)

            hook = snapshot
        hook_seconds = [0.0]
        fc_left = sorted(also) if base == "finercut" else []
        if fc_left:
            from .methods.finercut import accept

            def finercut_hook(partial):
                # a smaller target's run stops where the larger run takes a step it would not:
                # write that cell at once (replayed on a fresh model), so an interrupted run keeps it
                h0 = time.perf_counter()
                last = partial.report[-1]
                before_step = last["removed_total"] - last["parameters"]
                for r in list(fc_left):
                    if not accept(before_step, last["parameters"], int(round(r * partial.params_before)), "nearest"):
                        self._finercut_cell(method, r, ratio, partial.report, opts,
                                            partial.seconds - hook_seconds[0])
                        fc_left.remove(r)
                hook_seconds[0] += time.perf_counter() - h0

            hook = finercut_hook
        out = self._compress(method, ratio, on_step=hook)
        model, tok, info = out[0], out[1], out[2]
        info["compress_seconds"] -= hook_seconds[0]
        rec = self._ppl_record(method, ratio, model, tok, info, t0)
        if self.needs_tasks(method, ratio) and method != DENSE:
            api.save(out[3], self.model_dir(method, ratio), overwrite=True)
        self.write(rec)
        done = [ratio]
        res = out[3] if len(out) > 3 else None
        del model, out
        for r in fc_left:  # stopped together with the larger run
            self._finercut_cell(method, r, ratio, res.report, opts, res.seconds - hook_seconds[0])
        done += list(also) if base == "finercut" else []
        for r, sinfo in snaps.items():
            t1 = time.perf_counter()
            mdir = self.model_dir(method, r)
            m, tk, _ = api.load(mdir)
            self.write(self._ppl_record(method, r, m, tk if tk is not None else tok, sinfo, t1,
                                        snapshot_of_ratio=ratio))
            if not self.needs_tasks(method, r):
                shutil.rmtree(mdir, ignore_errors=True)
            done.append(r)
        return done

    def _finercut_cell(self, method: str, r: float, big_ratio: float, report: list, opts: dict,
                       seconds: float) -> None:
        """The FinerCut cell at ratio ``r`` rebuilt from the steps of a run at a larger ratio."""
        from . import api
        from .adapters import adapter_for, count_parameters
        from .methods.finercut import replay

        t1 = time.perf_counter()
        m, tk = self._load_dense()
        before = count_parameters(m)
        outcome, k = replay(m, report, int(round(r * before)), "nearest")
        after = count_parameters(m)
        part = api.CompressionResult(
            model=m, provenance=outcome.provenance, achieved_ratio=(before - after) / before, report=outcome.steps,
            tokenizer=tk, method="finercut", settings={**outcome.settings, "replayed_from_ratio": big_ratio},
            layers_before=len(outcome.provenance) + len(outcome.settings["deleted_layers"]),
            layers_after=len(adapter_for(m).layers), params_before=before, params_after=after, seconds=seconds)
        info = _info(part, opts)
        info["compress_seconds_note"] = "time the larger run took to reach this point (incl. scoring the step it stopped at)"
        self.write(self._ppl_record(method, r, m, tk, info, t1, snapshot_of_ratio=big_ratio))
        if self.needs_tasks(method, r):
            api.save(part, self.model_dir(method, r), overwrite=True)

    def _rebuild_finercut(self, rec: dict):
        """A FinerCut cell's model rebuilt from the sublayers it recorded (an
        hour of greedy search on this CPU is not repeated to get them back)."""
        from . import sublayers
        from .adapters import adapter_for
        from .methods.finercut import _finish

        model, tok = self._load_dense()
        a = adapter_for(model)
        st = rec["settings"]
        sublayers.apply_spec(a.layers, st["removed_sublayers_original"])
        out = _finish(a, [], st["target_parameters"], st["rounding"], 0, {})
        if out.provenance != rec.get("provenance"):
            raise RuntimeError(f"rebuilt FinerCut model of {_cell_name(rec['method'], rec['ratio_asked'])} "
                               f"differs from its record: {out.provenance} vs {rec.get('provenance')}")
        return model, tok

    def run_tasks(self, method: str, ratio: float) -> None:
        rec = self.read(method, ratio)
        if all(t in rec.get("tasks", {}) for t in self.zero_shot):
            return  # another sweep process writing to the same folder did it
        mdir = self.model_dir(method, ratio)
        extra = {}
        if method == DENSE:
            model, tok = self._load_dense()
        elif mdir.is_dir():
            from . import api

            model, tok, _ = api.load(mdir)
        elif _method_call(method, self.options)[0] == "finercut" and \
                (rec.get("settings") or {}).get("removed_sublayers_original") is not None:
            model, tok = self._rebuild_finercut(rec)
        else:  # the saved model is gone: compress again (same inputs, same result)
            out = self._compress(method, ratio)
            model, tok = out[0], out[1]
            if out[2]["provenance"] != rec.get("provenance"):
                extra["recompressed_provenance_differs"] = out[2]["provenance"]
        from .eval import evaluate_task

        for t in self.zero_shot:
            rec = self.read(method, ratio)  # re-read: another process may have added tasks meanwhile
            if t in rec.get("tasks", {}):
                continue
            r = evaluate_task(model, tok, t, self.data_dir, limit=self.limit, start=self.start,
                              progress=bool(self.verbose))
            r["start"] = self.start
            rec = {**self.read(method, ratio), **extra}
            rec.setdefault("tasks", {})[t] = r
            rec["eval_seconds"] = rec.get("eval_seconds", 0.0) + r["seconds"]
            self.write(rec)  # each task is kept as soon as it is done
        if not self.keep_models and mdir.is_dir():
            shutil.rmtree(mdir, ignore_errors=True)

    def run(self) -> list[dict]:
        from tqdm.auto import tqdm

        work = self.pending()
        bar = tqdm(total=len(work), desc="sweep", disable=not self.progress, unit="piece")
        finished = set()
        try:
            for method, ratio, stage in work:
                if (method, ratio, stage) in finished:
                    continue
                rec = self.read(method, ratio) or {}
                if stage == "compress+ppl" and "ppl" not in rec:
                    base, opts = _method_call(method, self.options) if method != DENSE else (DENSE, {})
                    group = [ratio]
                    # one run at the largest pending ratio gives the others (not when training follows)
                    if base in PREFIX_METHODS and not opts.get("distill_steps"):
                        group = sorted(r for m, r, s in work if m == method and s == stage
                                       and (m, r, s) not in finished)
                    bar.set_postfix_str(f"{_cell_name(method, group[-1])} {stage}"
                                        + (f" (+{len(group) - 1} on the way)" if len(group) > 1 else ""))
                    done = self.run_compress_ppl(method, group[-1], also=tuple(group[:-1]))
                    for r in done:
                        finished.add((method, r, stage))
                    bar.update(len(done))
                elif stage == "tasks":
                    bar.set_postfix_str(f"{_cell_name(method, ratio)} {stage}")
                    self.run_tasks(method, ratio)
                    bar.update(1)
                else:
                    bar.update(1)
                finished.add((method, ratio, stage))
                self.report()
        finally:
            bar.close()
        return self.report()

    # reporting --------------------------------------------------------------------------
    def records(self) -> list[dict]:
        """Every finished cell under <out>/cells (also those of other methods or
        of another sweep process writing to the same folder), dense first, then
        in this sweep's method order."""
        recs = []
        for p in sorted((self.out / "cells").glob("*.json")):
            try:
                with open(p) as f:
                    rec = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
            if "ppl" in rec:
                recs.append(rec)
        order = {m: i for i, m in enumerate([DENSE] + self.methods)}
        recs.sort(key=lambda r: (order.get(r["method"], len(order)), r["method"], r["ratio_asked"]))
        return recs

    def report(self) -> list[dict]:
        recs = self.records()
        write_csv(recs, self.out / "quality.csv", self.zero_shot)
        _atomic_text(to_markdown(recs, self), self.out / "quality.md")
        try:
            plot(recs, self.out / "quality.png", self.zero_shot)
            plot(recs, self.out / "quality_focus.png", self.zero_shot, only=FOCUS, acc_tasks=list(SIGNAL_TASKS))
        except Exception as e:  # a missing matplotlib must not lose the tables
            print(f"plot skipped: {e.__class__.__name__}: {e}")
        return recs


def _info(res, opts: dict) -> dict:
    info = {"achieved_ratio": res.achieved_ratio, "layers": res.layers_after, "params": res.params_after,
            "params_before": res.params_before, "compress_seconds": res.seconds, "provenance": res.provenance,
            "settings": _jsonable(res.settings), "options": _jsonable(opts)}
    sub = res.settings.get("sublayers")
    if sub:
        info["sublayers_removed"] = sub
    return info


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _avg(rec: dict, tasks: list[str]) -> Optional[float]:
    t = rec.get("tasks", {})
    if not all(k in t for k in tasks):
        return None
    return sum(t[k][t[k]["headline"]] for k in tasks) / len(tasks)


def _above_chance(rec: dict, dense: Optional[dict], tasks: list[str]) -> Optional[float]:
    if dense is None:
        return None
    a, d = _avg(rec, tasks), _avg(dense, tasks)
    if a is None or d is None:
        return None
    chance = sum(rec["tasks"][k]["chance"] for k in tasks) / len(tasks)
    return (a - chance) / (d - chance) if d > chance else None


def write_csv(recs: list[dict], path: Path, tasks: list[str]) -> None:
    dense = next((r for r in recs if r["method"] == DENSE), None)
    cols = (["method", "ratio_asked", "achieved_ratio", "layers", "params", "compress_seconds", "eval_seconds", "ppl"]
            + tasks + ["avg", "above_chance", "provenance", "sublayers_removed", "options"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in recs:
            t = r.get("tasks", {})
            avg = _avg(r, tasks)
            share = _above_chance(r, dense, tasks)
            w.writerow([r["method"], r["ratio_asked"], f"{r['achieved_ratio']:.4f}", r["layers"], r["params"],
                        f"{r['compress_seconds']:.1f}", f"{r.get('eval_seconds', 0):.1f}", f"{r['ppl']:.3f}"]
                       + [f"{t[k][t[k]['headline']]:.4f}" if k in t else "" for k in tasks]
                       + ["" if avg is None else f"{avg:.4f}", "" if share is None else f"{share:.4f}",
                          json.dumps(r.get("provenance")), json.dumps(r.get("sublayers_removed") or ""),
                          json.dumps(r.get("options") or {})])
    os.replace(tmp, path)


_SHORT = {"piqa": "PIQA", "hellaswag": "HellaS", "winogrande": "WinoG", "arc_easy": "ARC-e",
          "arc_challenge": "ARC-c", "boolq": "BoolQ", "openbookqa": "OBQA"}


def _fmt_ppl(x: float) -> str:
    return "inf" if not math.isfinite(x) else (f"{x:.2f}" if x < 1000 else f"{x:.0f}")


# The tasks that move on a 135M model (docs: BoolQ is no signal, WinoGrande, ARC-c
# and OpenBookQA sit at chance even dense): their mean is reported beside the average.
SIGNAL_TASKS = ("piqa", "hellaswag", "arc_easy")


# a cell whose HellaSwag was scored before the prompt got lm-eval's ctx_b.capitalize() carries this mark
OLD_HELLASWAG_PROMPT = "pre-lm-eval"


def summary_table(recs: list[dict], tasks: list[str]) -> list[str]:
    """One row per method: perplexity at every ratio, the 7-task average where
    measured, and the sweep's wall time for that method (compression + evaluation,
    all its cells; a prefix method's smaller cells come out of one run, so its
    compression time is that run's). Sorted by perplexity at the largest ratio."""
    ratios = sorted({r["ratio_asked"] for r in recs if r["method"] != DENSE})
    task_ratios = [x for x in ratios if any(_avg(r, tasks) is not None for r in recs if r["ratio_asked"] == x)]
    by: dict = {}
    for r in recs:
        by.setdefault(r["method"], {})[r["ratio_asked"]] = r
    sig = [t for t in SIGNAL_TASKS if t in tasks]
    head = (["method"] + [f"PPL {100 * x:g}%" for x in ratios] + [f"Avg {100 * x:g}%" for x in task_ratios]
            + ([f"PIQA/HS/ARC-e {100 * x:g}%" for x in task_ratios] if sig else [])
            + ["compress s", "eval s", "wall s"])
    out = ["## Summary", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def key(m):
        cells = by[m]
        last = cells.get(ratios[-1]) if ratios else None
        return (m != DENSE, last["ppl"] if last else math.inf, m)

    for m in sorted(by, key=key):
        cells = by[m]
        ppl = [_fmt_ppl(cells[x]["ppl"]) if x in cells else "-" for x in ratios]
        if m == DENSE:  # the reference, repeated under every ratio
            ppl = [_fmt_ppl(cells[0.0]["ppl"])] * len(ratios)
        avg = []
        for group in ([tasks, sig] if sig else [tasks]):
            for x in task_ratios:
                c = cells.get(0.0 if m == DENSE else x)
                a = _avg(c, group) if c else None
                avg.append("-" if a is None else f"{100 * a:.1f}")
        # a snapshot cell's seconds are part of the run it came from: count that run once
        comp = sum(c["compress_seconds"] for c in cells.values() if c.get("snapshot_of_ratio") is None)
        ev = sum(c.get("eval_seconds", 0.0) for c in cells.values())
        old = any(c.get("hellaswag_prompt") == OLD_HELLASWAG_PROMPT for c in cells.values())
        name = m + (" (reference)" if m == DENSE else "") + (" †" if old else "")
        out.append("| " + " | ".join([name] + ppl + avg + [f"{comp:.0f}", f"{ev:.0f}", f"{comp + ev:.0f}"]) + " |")
    if any(r.get("hellaswag_prompt") == OLD_HELLASWAG_PROMPT for r in recs):
        out += ["", "†: HellaSwag scored with the prompt before lm-eval's (no capitalisation of the second half of "
                    "the context); not re-measured yet (`benchmarks/remeasure_hellaswag.py`). Other rows: lm-eval's."]
    return out


def _slice_words(sweep: Sweep) -> str:
    if not sweep.start:
        return f"first {sweep.limit} examples each"
    if sweep.limit is None:
        return f"examples from {sweep.start} of each"
    return f"examples {sweep.start}..{sweep.start + sweep.limit - 1} of each (outside the dev slice)"


def to_markdown(recs: list[dict], sweep: Optional[Sweep] = None) -> str:
    tasks = sweep.zero_shot if sweep else list(_SHORT)
    dense = next((r for r in recs if r["method"] == DENSE), None)
    lines = [f"# Quality sweep: {recs[0]['model'] if recs else ''}", ""]
    if sweep is not None:
        lines += [f"Calibration: `{sweep.calib or 'default (sampled from the model)'}`. " +
                  (f"WikiText-2 perplexity: first {sweep.ppl_windows} windows of 512 tokens. " if sweep.ppl_windows
                   else "WikiText-2 perplexity: the whole test set, windows of 512 tokens. ") +
                  f"Zero-shot tasks ({', '.join(_SHORT[t] for t in sweep.zero_shot)}): {_slice_words(sweep)}, "
                  "at ratios "
                  f"{', '.join(f'{r:g}' for r in sorted(sweep.tasks_at)) or 'none'}. "
                  "Accuracies in % (acc_norm for PIQA, HellaSwag, ARC, OBQA; acc for WinoGrande, BoolQ); "
                  "`above` = (avg - chance) / (dense avg - chance).", ""]
    ratios = sorted({r["ratio_asked"] for r in recs if r["method"] != DENSE})
    head = ["method", "asked", "achieved", "layers", "compress s", "Wiki2 PPL"] + [_SHORT[t] for t in tasks] + ["Avg", "above"]

    def row(r):
        t = r.get("tasks", {})
        avg = _avg(r, tasks)
        share = _above_chance(r, dense, tasks)
        layers = str(r["layers"]) + ("*" if r.get("sublayers_removed") else "")
        return ([r["method"], f"{r['ratio_asked']:g}", f"{100 * r['achieved_ratio']:.1f}%", layers,
                 f"{r['compress_seconds']:.0f}", _fmt_ppl(r["ppl"])]
                + [f"{100 * t[k][t[k]['headline']]:.1f}" if k in t else "-" for k in tasks]
                + ["-" if avg is None else f"{100 * avg:.1f}", "-" if share is None else f"{100 * share:.0f}%"])

    def table(rows):
        out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        out += ["| " + " | ".join(row(r)) + " |" for r in rows]
        return out

    lines += summary_table(recs, tasks) + [""]
    if dense:
        lines += ["## Dense", ""] + table([dense]) + [""]
    for ratio in ratios:
        rows = [r for r in recs if r["ratio_asked"] == ratio and r["method"] != DENSE]
        rows.sort(key=lambda r: r["ppl"])
        lines += [f"## {100 * ratio:g}% of parameters asked (sorted by perplexity)", ""] + table(rows) + [""]
    n = sweep.limit if sweep is not None and sweep.limit else 200
    lines += ["`*`: layers with an attention or MLP sublayer removed (FinerCut); `achieved` counts all parameters, "
              "embeddings included.", "",
              f"With {n} examples per task the standard error is about {100 * (0.25 / n) ** 0.5:.1f} points: differences "
              f"under about {100 * (0.5 / n) ** 0.5:.0f} points are noise. BoolQ is no signal for this model (dense "
              "scores below always answering yes); WinoGrande, ARC-c and OpenBookQA sit at chance even dense. "
              "Perplexity, PIQA, HellaSwag and ARC-e are the signals that move.",
              ""]
    # wall time per method
    by = {}
    for r in recs:
        d = by.setdefault(r["method"], {"cells": 0, "compress": 0.0, "eval": 0.0})
        d["cells"] += 1
        d["compress"] += r["compress_seconds"]
        d["eval"] += r.get("eval_seconds", 0.0)
    lines += ["## Wall time per method", "",
              "| method | cells | compression s (sum) | evaluation s (sum) | options |", "|---|---:|---:|---:|---|"]
    for m, d in by.items():
        opts = next((r.get("options") for r in recs if r["method"] == m), None) or {}
        lines.append(f"| {m} | {d['cells']} | {d['compress']:.0f} | {d['eval']:.0f} | "
                     f"{', '.join(f'{k}={v}' for k, v in opts.items()) or '-'} |")
    lines += ["", "Wall times on a shared 2-core CPU; compare within this table only."]
    return "\n".join(lines) + "\n"


# Perplexities above this are drawn as triangles on the top edge: a destroyed
# model (10^9) would otherwise squash every usable line into the bottom tenth.
PPL_CEILING = 1e4
# a variant "<method><suffix>" is drawn in its method's colour and marker, with its own line style
VARIANT_STYLES = {"+ls": "--", "+distill": ":", "+fold": "-.", "+search": (0, (3, 1, 1, 1, 1, 1))}
# the plot the README shows: CoMe, its ablations and the strongest baselines, each with and without compensation
FOCUS = ("come", "come+keep0", "come-score", "come-legacy", "come-legacy+fold", "come-legacy+ls", "come-legacy+search",
         "shortgpt", "shortgpt+ls", "sleb", "sleb+ls", "replaceme", "replaceme+ls")


def _variant_of(m: str, methods: list[str]) -> Optional[tuple[str, str]]:
    for suffix in VARIANT_STYLES:
        if m.endswith(suffix) and m[:-len(suffix)] in methods:
            return m[:-len(suffix)], suffix
    return None


def plot(recs: list[dict], path: Path, tasks: list[str], only: Optional[tuple] = None,
         acc_tasks: Optional[list[str]] = None) -> None:
    """Average accuracy and perplexity against the parameters removed, one line
    per method starting from the dense model; one colour and marker per method
    in both panels, one legend below them. ``only``: these methods alone (in
    that order); ``acc_tasks``: the tasks averaged in the accuracy panel."""
    if only is not None:
        recs = [r for r in recs if r["method"] == DENSE or r["method"] in only]
    tasks = acc_tasks or tasks
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in recs if r["method"] == DENSE), None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.6))
    methods = [m for m in dict.fromkeys(r["method"] for r in recs) if m != DENSE and m not in ABLATIONS]
    if only is not None:
        methods = [m for m in only if m in methods]
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p8d"
    d_acc = _avg(dense, tasks) if dense is not None else None
    top = PPL_CEILING
    if dense is not None:
        top = max(PPL_CEILING, 10 * dense["ppl"])
    clipped = False
    variant = {m: _variant_of(m, methods) for m in methods}
    own = [m for m in methods if variant[m] is None]
    # a variant right after its method (variants of variants: after theirs)
    order = []
    for m in own:
        stack = [m]
        while stack:
            x = stack.pop(0)
            order.append(x)
            stack = [v for v in methods if variant[v] and variant[v][0] == x] + stack
    methods = order
    for m in methods:
        root, ls = m, "-"
        while variant.get(root):
            root, suffix = variant[root]
            ls = VARIANT_STYLES[suffix] if ls == "-" else ls
        k = own.index(root)
        style = dict(color=colours[(2 * k) % 20 if k < 10 else (2 * k + 1) % 20], marker=markers[k % len(markers)],
                     ms=5, lw=1.4, ls=ls)
        rs = sorted((r for r in recs if r["method"] == m), key=lambda r: r["achieved_ratio"])
        acc = [(100 * r["achieved_ratio"], 100 * _avg(r, tasks)) for r in rs if _avg(r, tasks) is not None]
        if acc and d_acc is not None:
            acc = [(0.0, 100 * d_acc)] + acc
        if acc:
            ax1.plot(*zip(*acc), label=m, **style)
        ppl = [(100 * r["achieved_ratio"], r["ppl"]) for r in rs if math.isfinite(r["ppl"])]
        if ppl and dense is not None:
            ppl = [(0.0, dense["ppl"])] + ppl
        if ppl:
            xs, ys = zip(*ppl)
            ax2.plot(xs, [min(y, top) for y in ys], label=m, **style)
            over = [(x, top) for x, y in ppl if y > top]
            if over:
                clipped = True
                ax2.plot(*zip(*over), ls="none", marker="^", ms=9, color=style["color"])
    if d_acc is not None:
        ax1.axhline(100 * d_acc, color="k", ls="--", lw=1, label="dense")
    if dense is not None:
        ax2.axhline(dense["ppl"], color="k", ls="--", lw=1)
    if dense is not None and all(k in (dense.get("tasks") or {}) for k in tasks):
        chance = sum(dense["tasks"][k]["chance"] for k in tasks) / len(tasks)
        ax1.axhline(100 * chance, color="gray", ls=":", lw=1, label="chance (task mean)")
    ax1.set_xlabel("parameters removed (%)")
    ax1.set_ylabel(f"average accuracy, {len(tasks)} tasks (%)" if acc_tasks is None else
                   f"mean accuracy, {'/'.join(_SHORT.get(t, t) for t in tasks)} (%)")
    ax1.set_title("zero-shot average (higher is better)")
    ax2.set_xlabel("parameters removed (%)")
    ax2.set_ylabel("WikiText-2 perplexity (log scale)")
    ax2.set_yscale("log")
    ax2.set_title("WikiText-2 perplexity (lower is better)"
                  + (f"\n\u25b2: above {top:.0e}, drawn at the edge" if clipped else ""))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if not any(ln.get_xydata().size for ln in ax1.lines if ln.get_label() in methods):
        ax1.text(0.5, 0.5, "no zero-shot results yet", ha="center", va="center", transform=ax1.transAxes)
    seen = {}
    for ax in (ax2, ax1):  # every method has a perplexity; dense and chance lines come from ax1
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    labels = [m for m in methods if m in seen] + [lab for lab in seen if lab not in methods]
    handles = [seen[lab] for lab in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(8, max(1, len(labels))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def quality(**kwargs) -> list[dict]:
    return Sweep(**kwargs).run()
