"""PIQA / HellaSwag / ARC-e beyond the dev slice: the sweep's cells on examples 0-199 (results/cells, the dev
slice the defaults were tuned on) beside a held-out sweep's cells on later examples (results/heldout/cells,
written by `come-fast bench quality ... --tasks piqa,hellaswag,arc_easy --start 200 --limit 600`), and the
two pooled (each example counted once). Prints a markdown table per ratio, best pooled mean first.

    python benchmarks/heldout_table.py [--dev results/cells] [--heldout results/heldout/cells]
"""
import argparse
import json
import math
from pathlib import Path

TASKS = ("piqa", "hellaswag", "arc_easy")


def _cells(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.glob("*.json")):
        rec = json.loads(p.read_text())
        if all(t in rec.get("tasks", {}) for t in TASKS):
            out[(rec["method"], rec["ratio_asked"])] = rec
    return out


def _mean(recs: list) -> tuple:
    """Mean headline accuracy over the three tasks, each task's examples of every record pooled; its standard
    error (binomial per task, tasks independent)."""
    accs, var = [], 0.0
    for t in TASKS:
        n = sum(r["tasks"][t]["n"] for r in recs)
        p = sum(r["tasks"][t][r["tasks"][t]["headline"]] * r["tasks"][t]["n"] for r in recs) / n
        accs.append(p)
        var += p * (1 - p) / n
    return 100 * sum(accs) / len(TASKS), 100 * math.sqrt(var) / len(TASKS), accs


def table(dev: dict, held: dict) -> str:
    lines = []
    for ratio in sorted({r for (_, r) in held if r > 0}) + [0.0]:  # dense last
        rows = []
        for (m, r), h in held.items():
            if r != ratio or (m, r) not in dev:
                continue
            starts = {h["tasks"][t].get("start") for t in TASKS}
            if starts != {200}:
                raise ValueError(f"{m}@{ratio:g}: held-out cell not scored from example 200 ({starts})")
            rows.append((_mean([dev[(m, r)], h]), m, _mean([dev[(m, r)]]), _mean([h]), h))
        if not rows:
            continue
        rows.sort(key=lambda x: -x[0][0])
        n_held = sorted({h["tasks"][t]["n"] for *_, h in rows for t in TASKS})
        lines += [f"## {'dense' if ratio == 0 else f'{100 * ratio:g}% of parameters asked'}", "",
                  f"| method | dev slice (0-199) | held out ({', '.join(map(str, n_held))} from 200) "
                  "| PIQA / HS / ARC-e held out | pooled | WikiText-2 PPL (40 windows) |",
                  "|---|---:|---:|---|---:|---:|"]
        for (pm, ps, _), m, (dm, ds, _), (hm, hs, hacc), h in rows:
            lines.append(f"| {m} | {dm:.1f} ± {ds:.1f} | {hm:.1f} ± {hs:.1f} | "
                         f"{' / '.join(f'{100 * a:.1f}' for a in hacc)} | **{pm:.1f}** ± {ps:.1f} | {h['ppl']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", default="results/cells")
    ap.add_argument("--heldout", default="results/heldout/cells")
    a = ap.parse_args()
    print(table(_cells(Path(a.dev)), _cells(Path(a.heldout))))


if __name__ == "__main__":
    main()
