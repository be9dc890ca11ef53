"""Re-measure the HellaSwag cells of the quality sweep with lm-eval's prompt.

The sweep's task cells (results/cells) were scored before HellaSwag's prompt got
lm-eval's ``ctx_b.capitalize()``; every other task's prompt is unchanged. This
recompresses each named cell (one run to the largest ratio gives the smaller
ones, as the sweep does), checks that the WikiText-2 perplexity equals the
cell's recorded one (the same model; within 1e-4, the re-made model's perplexity
is kept beside it), scores HellaSwag on the dev slice, and
writes it into the cell, keeping the old figure as ``hellaswag_old_prompt``.
Resumable: cells already carrying ``hellaswag_old_prompt`` are skipped.

    python benchmarks/remeasure_hellaswag.py --methods dense,come,shortgpt+ls --ratios 0.2,0.3
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from come_fast import api
from come_fast.bench import (DENSE, OLD_HELLASWAG_PROMPT, PREFIX_METHODS, Sweep, _atomic_json, _cell_name,
                             _method_call)
from come_fast.eval import default_data_dir, evaluate_task
from come_fast.models import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", required=True, help="comma-separated, in the order to run ('dense' included)")
    ap.add_argument("--ratios", default="0.2,0.3")
    ap.add_argument("--cells", default="results", help="the sweep folder whose cells are updated")
    ap.add_argument("--work", default="results/hs_remeasure", help="scratch sweep folder (models, perplexity)")
    ap.add_argument("--calib", default="../shared/fixtures/come_reference/calib_tokens.safetensors")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mark-rest", action="store_true",
                    help="re-measure nothing: mark every cell not re-measured here, in a folder whose task cells all "
                         f"predate the prompt change (hellaswag_prompt={OLD_HELLASWAG_PROMPT!r}; the summary table "
                         "flags its method)")
    args = ap.parse_args(argv)
    if args.mark_rest:
        n = 0
        for path in sorted((Path(args.cells) / "cells").glob("*.json")):
            rec = json.loads(path.read_text())
            if "hellaswag" in rec.get("tasks", {}) and "hellaswag_old_prompt" not in rec:
                if rec.get("hellaswag_prompt") != OLD_HELLASWAG_PROMPT:
                    rec["hellaswag_prompt"] = OLD_HELLASWAG_PROMPT
                    _atomic_json(rec, path)
                    n += 1
        print(f"marked {n} cells")
        return 0
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    cells = Path(args.cells) / "cells"
    for m in args.methods.split(","):
        rs = [0.0] if m == DENSE else ratios
        todo = []
        for r in rs:
            path = cells / f"{_cell_name(m, r)}.json"
            rec = json.loads(path.read_text())
            if "hellaswag_old_prompt" not in rec:
                todo.append((r, path, rec))
        if not todo:
            continue
        if m != DENSE:
            sw = Sweep(methods=[m], ratios=[r for r, _, _ in todo], out=args.work, calib=args.calib,
                       keep_models=True, progress=False)  # tasks at every ratio: the sweep keeps the models
            need = [r for r, _, _ in todo if sw.read(m, r) is None or not sw.model_dir(m, r).is_dir()]
            base, opts = _method_call(m, {})
            if need and base in PREFIX_METHODS and not opts.get("distill_steps"):
                sw.run_compress_ppl(m, max(need), also=tuple(r for r in need if r != max(need)))
            else:
                for r in need:
                    sw.run_compress_ppl(m, r)
            models = {r: sw.model_dir(m, r) for r, _, _ in todo}
        for r, path, rec in todo:
            if m == DENSE:
                model, tok = load_model("smollm2-135m")
            else:
                new = json.loads((Path(args.work) / "cells" / f"{_cell_name(m, r)}.json").read_text())
                # the same model up to float summation order (a refit's solve): 1e-4; beyond, another model
                if not math.isclose(new["ppl"], rec["ppl"], rel_tol=1e-4):
                    print(f"{_cell_name(m, r)}: perplexity {new['ppl']:.4f} differs from the cell's {rec['ppl']:.4f}:"
                          " not the same model, cell left alone", flush=True)
                    continue
                model, tok, _ = api.load(models[r])
            t0 = time.perf_counter()
            hs = evaluate_task(model, tok, "hellaswag", default_data_dir(), limit=args.limit, progress=False)
            rec = json.loads(path.read_text())  # re-read: another process may have written meanwhile
            rec["hellaswag_old_prompt"] = rec["tasks"]["hellaswag"]
            if m != DENSE and new["ppl"] != rec["ppl"]:
                rec["hellaswag_model_ppl"] = new["ppl"]  # the re-made model's perplexity, within 1e-4
            rec.pop("hellaswag_prompt", None)
            rec["tasks"]["hellaswag"] = hs
            rec["eval_seconds"] = rec.get("eval_seconds", 0.0) + hs["seconds"]
            _atomic_json(rec, path)
            print(f"{_cell_name(m, r)}: hellaswag acc_norm {rec['hellaswag_old_prompt']['acc_norm']:.3f} -> "
                  f"{hs['acc_norm']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
