"""CoMe against each contender on the same questions: paired differences of the PIQA / HellaSwag / ARC-e mean.

Reads a sweep folder whose cells carry per-question answers (`correct`, written since 2026-12-01), made by

    come-fast bench quality --model smollm2-135m --methods METHODS --ratios 0.2,0.3 --tasks-at 0.2,0.3 \
        --tasks piqa,hellaswag,arc_easy --start 0 --limit 800 \
        --calib ../shared/fixtures/come_reference/calib_tokens.safetensors --out results/paired --threads 1

and prints, per ratio and per slice of the questions (the dev slice 0-199, the held-out 200-799, all 800), each
method's three-task mean and its difference from CoMe's (come_fast.eval.paired_difference: the paired standard
error, the unpaired one beside it, a two-sided p). The dev-slice column also checks that the models are the
README table's: each model's dev-slice mean equals its cell in --dev (results/cells) to the question.

    python benchmarks/paired_table.py [--cells results/paired/cells results/keep4/q800/cells ...] [--dev results/cells]
        [--against come]
"""
import argparse
import json
from pathlib import Path

from come_fast.eval import paired_difference

TASKS = ("piqa", "hellaswag", "arc_easy")
SLICES = (("dev slice (0-199)", 0, 200), ("held out (200-799)", 200, 800), ("all (0-799)", 0, 800))


def _cells(folder: Path) -> dict:
    """Every cell of ``folder`` by (method, ratio)."""
    return {(rec["method"], rec["ratio_asked"]): rec
            for rec in (json.loads(p.read_text()) for p in sorted(folder.glob("*.json")))}


def _answered(cells: dict) -> dict:
    """The cells with per-question answers for every task."""
    return {k: rec for k, rec in cells.items()
            if all("correct" in rec.get("tasks", {}).get(t, {}) for t in TASKS)}


def _slice(rec: dict, lo: int, hi: int) -> dict:
    out = {}
    for t in TASKS:
        r = rec["tasks"][t]
        if r.get("start", 0) != 0 or len(r["correct"]) < hi:
            raise ValueError(f"{rec['method']}@{rec['ratio_asked']:g} {t}: needs questions 0-{hi - 1} "
                             f"(has {len(r['correct'])} from {r.get('start', 0)})")
        out[t] = {"correct": r["correct"][lo:hi], "start": lo}
    return out


def _mean(tasks: dict) -> float:
    return 100 * sum(r["correct"].count("1") / len(r["correct"]) for r in tasks.values()) / len(tasks)


def check_dev(cells: dict, dev: dict) -> list:
    """Methods whose dev-slice mean differs from the README table's cell (a different model)."""
    bad = []
    for (m, r), rec in cells.items():
        ref = dev.get((m, r))
        if ref is None or not all(t in ref.get("tasks", {}) for t in TASKS):
            continue
        mine = _mean(_slice(rec, 0, 200))
        theirs = 100 * sum(ref["tasks"][t][ref["tasks"][t]["headline"]] for t in TASKS) / len(TASKS)
        if abs(mine - theirs) > 1e-9:
            bad.append(f"{m}@{r:g}: {mine:.2f} here, {theirs:.2f} in the table")
    return bad


def table(cells: dict, against: str) -> str:
    lines = []
    for ratio in sorted({r for (_, r) in cells if r > 0}):
        ref = cells.get((against, ratio))
        if ref is None:
            continue
        others = sorted(m for (m, r) in cells if r == ratio and m != against)
        lines += [f"## {100 * ratio:g}% of parameters asked: {against} minus each method", "",
                  "| method | " + " | ".join(f"{name}: mean, {against} minus it (paired ± / unpaired ±, p)"
                                           for name, *_ in SLICES) + " |",
                  "|---|" + "---:|" * len(SLICES)]
        rows = [(against, [f"**{_mean(_slice(ref, lo, hi)):.1f}**" for _, lo, hi in SLICES])]
        whole = {}  # each method's difference on all the questions, for the per-task table
        for m in others:
            row = []
            for _, lo, hi in SLICES:
                a, b = _slice(ref, lo, hi), _slice(cells[(m, ratio)], lo, hi)
                d = whole[m] = paired_difference(a, b)  # SLICES ends with all the questions
                row.append(f"{_mean(b):.1f}: {round(100 * d['diff'], 1) + 0.0:+.1f} (± {100 * d['se']:.1f} / "
                           f"± {100 * d['se_unpaired']:.1f}, p {d['p']:.2f})")
            rows.append((m, row))
        lines += [f"| {m} | " + " | ".join(row) + " |" for m, row in rows] + [""]
        # where the difference comes from: each task on all 800 questions
        lines += [f"Per task, all 800 questions ({against} minus it, paired ±; questions only {against} / only "
                  "it got right):", "", "| method | " + " | ".join(TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
        for m in others:
            d = whole[m]["tasks"]
            lines.append(f"| {m} | " + " | ".join(
                f"{100 * d[t]['diff']:+.1f} ± {100 * d[t]['se']:.1f} ({d[t]['only_a']} / {d[t]['only_b']})"
                for t in TASKS) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the default's cells since keep_last (results/keep4) beside the contenders' (results/paired)
    ap.add_argument("--cells", nargs="+", default=["results/paired/cells", "results/keep4/q800/cells",
                                                   "results/keep6/cells"], help="one or more folders of cells")
    ap.add_argument("--dev", default="results/cells")
    ap.add_argument("--against", default="come")
    a = ap.parse_args()
    cells = _answered({k: rec for folder in a.cells for k, rec in _cells(Path(folder)).items()})
    bad = check_dev(cells, _cells(Path(a.dev)))
    print(table(cells, a.against))
    print("dev-slice check against " + a.dev + ": " + ("every model matches its table cell" if not bad
                                                         else "DIFFERENT MODELS: " + "; ".join(bad)))


if __name__ == "__main__":
    main()
