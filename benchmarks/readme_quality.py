"""Copy the quality sweep's summary table (results/quality.md) into README.md
between the markers ``<!-- quality:start -->`` and ``<!-- quality:end -->``,
with the date and commit it is pasted at, so the README shows what the cells
hold. Run after ``come-fast bench quality``:

    python benchmarks/readme_quality.py [--results results] [--readme README.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
from pathlib import Path

START, END = "<!-- quality:start -->", "<!-- quality:end -->"


def summary_section(md: str) -> str:
    lines = md.splitlines()
    i = lines.index("## Summary")
    j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    return "\n".join(l for l in lines[i + 1:j]).strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default="results")
    p.add_argument("--readme", default="README.md")
    args = p.parse_args(argv)
    table = summary_section(Path(args.results, "quality.md").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    stamp = f"Cells as of {datetime.date.today().isoformat()}, code at commit {commit or 'unknown'}."
    readme = Path(args.readme)
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: markers {START} / {END} not found")
    a, rest = text.split(START, 1)
    _, b = rest.split(END, 1)
    new = f"{a}{START}\n{table}\n\n{stamp}\n{END}{b}"
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)
    print(f"updated {readme} ({table.count(chr(10)) - 1} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
