"""Summarize fast_path.py outputs: per task and run, the metrics, CPU seconds,
and against the first run the examples whose answer (argmax of the
log-likelihoods, and of them divided by the choice's length: acc_norm's
answer) differs, and the largest log-likelihood difference.

    .venv/bin/python benchmarks/lmeval_check/summarize.py /tmp/lmcheck/dense_0_199.json ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from come_fast.eval import default_data_dir  # noqa: E402
from come_fast.eval import tasks as T  # noqa: E402


def argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def answers(run_task: dict, choices: list) -> tuple[list, list]:
    preds, preds_norm = [], []
    for ex, ch in zip(run_task["examples"], choices):
        preds.append(argmax(ex["lls"]))
        preds_norm.append(argmax([ll / len(c) for ll, c in zip(ex["lls"], ch)]))
    return preds, preds_norm


def summarize(path: str) -> str:
    r = json.loads(Path(path).read_text())
    runs = list(r["runs"])
    lines = [f"### {Path(path).name}: {r['model']}, examples {r['start']}-{r['start'] + r['limit'] - 1}", "",
             "| task | run | acc | acc_norm | CPU s | answers differing from " + runs[0] + " (acc / acc_norm) "
             "| max abs dLL |", "|---|---|---:|---:|---:|---:|---:|"]
    for task in r["tasks"]:
        if task not in r["runs"][runs[0]]:
            continue
        n = len(r["runs"][runs[0]][task]["examples"])
        choices = [ex.choices for ex in T.load_examples(task, default_data_dir(), limit=n, start=r["start"])]
        ref = r["runs"][runs[0]][task]
        ref_ans = answers(ref, choices)
        for run in runs:
            t = r["runs"][run].get(task)
            if t is None:
                continue
            ans = answers(t, choices)
            diff = [sum(a != b for a, b in zip(x, y)) for x, y in zip(ans, ref_ans)]
            dll = max(abs(a - b) for e, f in zip(t["examples"], ref["examples"]) for a, b in zip(e["lls"], f["lls"]))
            m = t["metrics"]
            lines.append(f"| {task} | {run} | {100 * m['acc']:.1f} | "
                         + (f"{100 * m['acc_norm']:.1f}" if "acc_norm" in m else "-")
                         + f" | {t['cpu_s']:.1f} | {diff[0]} / {diff[1]} | {dll:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(summarize(p) for p in sys.argv[1:]))
