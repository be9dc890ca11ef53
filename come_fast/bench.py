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

# The sweep's methods in roughly increasing cost; "all" runs them in this order.
ALL_METHODS = ("magnitude+", "shortgpt", "reverse", "taylor+", "laco", "slm", "streamline", "ppl", "come",
               "come-faithful", "sleb", "finercut")
# Named variants: a registered method with fixed options.
VARIANTS = {"come-faithful": ("come", {"faithful": True}), "reverse-recover": ("reverse", {"recover": True})}
# Methods that re-run the model once per candidate (or backpropagate) score on
# the first calibration rows only, to fit a CPU budget; recorded per cell.
DEFAULT_METHOD_OPTIONS = {"ppl": {"score_rows": 8}, "sleb": {"score_rows": 8}, "finercut": {"score_rows": 2}}
DENSE = "dense"
# Progressive methods whose run to n removals passes through the exact result
# for every smaller n (same scores, same decisions): one run at the largest
# pending ratio yields the smaller ratios' cells through ``on_step`` snapshots.
# FinerCut's steps do not change the layer count: its smaller cells are
# rebuilt from the larger run's recorded choices (methods.finercut.replay).
PREFIX_METHODS = ("come", "sleb", "finercut")


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
                 verbose: bool = False):
        from .eval import ZERO_SHOT_TASKS, default_data_dir

        self.model_name = model
        self.methods = resolve_methods(methods)
        self.ratios = [float(r) for r in ratios]
        for r in self.ratios:
            if not 0 < r < 1:
                raise ValueError(f"ratios must lie in (0, 1), got {r}")
        self.tasks_at = set(self.ratios if tasks_at is None else [float(r) for r in tasks_at])
        self.limit = limit
        self.out = Path(out)
        self.calib = None if calib is None else str(calib)
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.options = options or {}
        self.keep_models = keep_models
        self.ppl_windows = ppl_windows
        self.progress = progress
        self.verbose = verbose
        self.zero_shot = list(ZERO_SHOT_TASKS)
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

    def run_tasks(self, method: str, ratio: float) -> None:
        rec = self.read(method, ratio)
        mdir = self.model_dir(method, ratio)
        if method == DENSE:
            model, tok = self._load_dense()
        elif mdir.is_dir():
            from . import api

            model, tok, _ = api.load(mdir)
        else:  # the saved model is gone: compress again (same inputs, same result)
            out = self._compress(method, ratio)
            model, tok = out[0], out[1]
            if out[2]["provenance"] != rec.get("provenance"):
                rec["recompressed_provenance_differs"] = out[2]["provenance"]
        todo = [t for t in self.zero_shot if t not in rec.get("tasks", {})]
        from .eval import evaluate_task

        for t in todo:
            r = evaluate_task(model, tok, t, self.data_dir, limit=self.limit, progress=bool(self.verbose))
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
                    base = _method_call(method, self.options)[0] if method != DENSE else DENSE
                    group = [ratio]
                    if base in PREFIX_METHODS:  # one run at the largest pending ratio gives the others
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


def to_markdown(recs: list[dict], sweep: Optional[Sweep] = None) -> str:
    tasks = sweep.zero_shot if sweep else list(_SHORT)
    dense = next((r for r in recs if r["method"] == DENSE), None)
    lines = [f"# Quality sweep: {recs[0]['model'] if recs else ''}", ""]
    if sweep is not None:
        lines += [f"Calibration: `{sweep.calib or 'default (sampled from the model)'}`. "
                  f"WikiText-2 perplexity: first {sweep.ppl_windows} windows of 512 tokens. "
                  f"Zero-shot tasks: first {sweep.limit} examples each, at ratios "
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

    if dense:
        lines += ["## Dense", ""] + table([dense]) + [""]
    for ratio in ratios:
        rows = [r for r in recs if r["ratio_asked"] == ratio and r["method"] != DENSE]
        rows.sort(key=lambda r: r["ppl"])
        lines += [f"## {100 * ratio:g}% of parameters asked (sorted by perplexity)", ""] + table(rows) + [""]
    lines += ["`*`: layers with an attention or MLP sublayer removed (FinerCut); `achieved` counts all parameters, "
              "embeddings included.", "",
              "With 200 examples per task the standard error is about 3 points: differences under about 5 points "
              "are noise. BoolQ is no signal for this model (see docs/evaluation.md); WinoGrande, ARC-c and "
              "OpenBookQA sit at chance even dense. Perplexity, PIQA, HellaSwag and ARC-e are the signals that move.",
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


def plot(recs: list[dict], path: Path, tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in recs if r["method"] == DENSE), None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    methods = [m for m in dict.fromkeys(r["method"] for r in recs) if m != DENSE]
    for m in methods:
        rs = sorted((r for r in recs if r["method"] == m), key=lambda r: r["achieved_ratio"])
        acc = [(100 * r["achieved_ratio"], 100 * _avg(r, tasks)) for r in rs if _avg(r, tasks) is not None]
        if acc:
            ax1.plot(*zip(*acc), marker="o", label=m)
        ppl = [(100 * r["achieved_ratio"], r["ppl"]) for r in rs if math.isfinite(r["ppl"])]
        if ppl:
            ax2.plot(*zip(*ppl), marker="o", label=m)
    if dense is not None:
        if _avg(dense, tasks) is not None:
            ax1.axhline(100 * _avg(dense, tasks), color="k", ls="--", lw=1, label="dense")
        ax2.axhline(dense["ppl"], color="k", ls="--", lw=1, label="dense")
    if recs and all(k in (recs[0].get("tasks") or {}) for k in tasks):
        chance = sum(recs[0]["tasks"][k]["chance"] for k in tasks) / len(tasks)
        ax1.axhline(100 * chance, color="gray", ls=":", lw=1, label="chance")
    ax1.set_xlabel("parameters removed (%)")
    ax1.set_ylabel("average accuracy, 7 tasks (%)")
    ax1.set_title("zero-shot average")
    ax2.set_xlabel("parameters removed (%)")
    ax2.set_ylabel("WikiText-2 perplexity (log)")
    ax2.set_yscale("log")
    ax2.set_title("WikiText-2 perplexity")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    if ax1.lines:
        ax1.legend(fontsize=7, ncol=2)
    else:
        ax1.text(0.5, 0.5, "no zero-shot results yet", ha="center", va="center", transform=ax1.transAxes)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def quality(**kwargs) -> list[dict]:
    return Sweep(**kwargs).run()
