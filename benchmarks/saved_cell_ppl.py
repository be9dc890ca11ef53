"""Whole-test-set WikiText-2 perplexity of a model the sweep saved, written as a cell of another sweep folder
(for results/full: a CoMe run to 30% takes an hour here, its saved models need only the evaluation):

    python benchmarks/saved_cell_ppl.py results/keep4/cells/come@0.3.json results/keep4/models/come@0.3 \
        come 0.3 [--out results/full]

The cell keeps the source cell's compression record (provenance, settings, seconds) and gets the perplexity
the sweep's own ``--ppl-windows all`` measures (Sweep._ppl_record), plus ``measured_from``.
"""
import argparse
import json
import time

import torch

from come_fast import api
from come_fast.bench import Sweep

CALIB = "../shared/fixtures/come_reference/calib_tokens.safetensors"
# what a sweep writes itself for the cell it evaluates; everything else is the compression's record
SWEEP_FIELDS = ("method", "ratio_asked", "model", "calib", "ppl", "ppl_detail", "tasks", "eval_seconds",
                "cell_seconds", "snapshot_of_ratio")

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("cell")
ap.add_argument("model_dir")
ap.add_argument("method")
ap.add_argument("ratio", type=float)
ap.add_argument("--out", default="results/full")
a = ap.parse_args()
torch.set_num_threads(1)
sweep = Sweep(methods=[a.method], ratios=(a.ratio,), out=a.out, ppl_windows=None, tasks_at=(), progress=False,
              calib=CALIB)
info = {k: v for k, v in json.loads(open(a.cell).read()).items() if k not in SWEEP_FIELDS}
t0 = time.perf_counter()
model, tok, _ = api.load(a.model_dir)
rec = sweep._ppl_record(a.method, a.ratio, model, tok, info, t0, measured_from=a.model_dir)
sweep.write(rec)
print(a.method, a.ratio, rec["ppl"], rec["ppl_detail"]["windows"])
