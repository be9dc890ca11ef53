"""Evaluates the models behind the README table (run after readme_compress.sh):

    python benchmarks/readme_table.py --data-dir ../shared/data

WikiText-2 perplexity for every row; the seven tasks on the dev slice (first
200 examples) for the dense model and the rows named by --tasks-for. Each
model's result is cached in results/readme/ (atomically), so an interrupted
run resumes. Writes results/readme_table.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from pathlib import Path

import torch

from come_fast import load, load_model
from come_fast.eval import ALL_TASKS, above_chance_share, evaluate, write_json_atomic

ROWS = ["dense"] + [f"come-{m}-{r}" for r in ("0.1", "0.2", "0.3") for m in ("default", "faithful")]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--tasks-for", default="dense,come-default-0.3,come-faithful-0.3")
    p.add_argument("--cache", default="results/readme")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dense-json", default="results/dense_dev200.json",
                   help="an earlier dense evaluation with the same settings, used when present")
    args = p.parse_args()
    # one thread each when the machine is shared: oversubscribed OpenMP threads spin
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    full = set(args.tasks_for.split(","))
    results, meta = {}, {}
    def adopt_dense():
        src = Path(args.dense_json)
        if (cache / "dense.json").is_file() or not src.is_file():
            return
        d = json.loads(src.read_text())
        d = d if "tasks" in d else d.get("dense", {})
        if d.get("config", {}).get("limit") == args.limit and set(d.get("tasks", {})) >= set(ALL_TASKS):
            write_json_atomic(d, cache / "dense.json")

    # cheap rows first, the dense row last (it may arrive from --dense-json meanwhile)
    order = sorted(ROWS, key=lambda r: (r == "dense", r in full))
    for row in order:
        tasks = list(ALL_TASKS) if row in full else ["wikitext2"]
        if row == "dense":
            adopt_dense()
        f = cache / f"{row}.json"
        if f.is_file() and set(json.loads(f.read_text())["tasks"]) >= set(tasks):
            results[row] = json.loads(f.read_text())
        else:
            if row == "dense":
                model, tok = load_model("smollm2-135m")
            else:
                model, tok, _ = load(f"out/{row}")
            print(f"evaluating {row} on {tasks}", flush=True)
            results[row] = evaluate(model, tok, tasks=tasks, data_dir=args.data_dir, limit=args.limit, progress=False)
            write_json_atomic(results[row], f)
        if row != "dense":
            m = json.loads(Path(f"out/{row}/come_fast.json").read_text())
            meta[row] = m
    dense = results["dense"]
    lines = ["| model | layers | params removed | compress s | WikiText-2 ppl | " +
             " | ".join(t for t in ALL_TASKS if t != "wikitext2") + " | mean acc | above-chance share |",
             "|" + "---|" * (6 + len(ALL_TASKS)) ]
    for row in ROWS:
        r = results[row]
        t = r["tasks"]
        m = meta.get(row)
        cells = [row, str(m["layers_after"]) if m else "30", f"{100 * m['achieved_ratio']:.1f}%" if m else "0%",
                 f"{m['seconds']:.0f}" if m else "-", f"{t['wikitext2']['ppl']:.1f}"]
        for name in ALL_TASKS:
            if name == "wikitext2":
                continue
            x = t.get(name)
            cells.append(f"{100 * x[x['headline']]:.1f}" if x else "")
        if "average" in r and len(r["average"].get("tasks", [])) == 7:
            cells.append(f"{100 * r['average']['headline']:.1f}")
            share = above_chance_share(r, dense)["of_average"]
            cells.append(f"{share:.2f}" if share is not None else "")
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines.append("")
    lines.append(f"Run {datetime.date.today()} at commit {commit}; tasks: first {args.limit} examples each "
                 "(acc_norm for PIQA, HellaSwag, ARC-e, ARC-c, OpenBookQA; acc for WinoGrande, BoolQ).")
    out = Path("results/readme_table.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
