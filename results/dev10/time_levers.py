"""Compression time of CoMe's default (of the code it runs; mlp_select="final" when written) against every
lever off, SmolLM2-135M to 30%, the reference calibration, 2 threads, one run after the other in one process
on an otherwise idle machine (the protocol of benchmarks/bench_levers.py, which times the same two calls);
the default's model is saved for benchmarks/generate_samples.py.

    python results/dev10/time_levers.py OUT_MODEL_DIR [OUT_JSON]

(OUT_JSON defaults to time_levers.json beside this file; results/keep4/time_levers.json is the run of the
default with keep_last, 2026-12-01 evening.)
"""
import json
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import come_fast
from come_fast.bench import LEGACY

FIX = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "come_reference"
torch.set_num_threads(2)
ids = load_file(str(FIX / "calib_tokens.safetensors"))["input_ids"]
out = {}
for mode in ("legacy", "default"):
    model, tok = come_fast.load_model("smollm2-135m")
    c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    res = come_fast.compress(model, ratio=0.3, calib=ids, tokenizer=tok, backend="torch",
                             **(LEGACY if mode == "legacy" else {}))
    wall, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    steps = [st for st in res.report if "pair" in st]
    comp = [st for st in res.report if "compensation" in st]
    out[mode] = {"wall_s": wall, "process_cpu_s": (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime),
                 "step_seconds": [round(st["seconds"], 2) for st in steps],
                 "final_refit_s": round(comp[0]["seconds"], 2) if comp else 0.0,
                 "mlp_select": res.settings.get("mlp_select"),
                 "keep_last": res.settings.get("keep_last"), "provenance": res.provenance}
    print(mode, json.dumps(out[mode]), flush=True)
    if mode == "default":
        come_fast.save(res, sys.argv[1], overwrite=True)
Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).with_name("time_levers.json")).write_text(
    json.dumps(out, indent=1))
