"""Held-out cell come@0.3 from the model results/dev10/time_levers.py saved (same code, inputs and settings as the
sweep's come@0.3; its WikiText-2 perplexity below must equal the main table's 120.21)."""
import json, shutil, time
import torch
from come_fast import api, bench
torch.set_num_threads(1)
src = "/tmp/come30_default"
sw = bench.Sweep(methods="come", ratios=(0.3,), out="results/heldout", tasks="piqa,hellaswag,arc_easy", start=200,
                 limit=600, calib="../shared/fixtures/come_reference/calib_tokens.safetensors", progress=False)
model, tok, meta = api.load(src)
lev = json.load(open("results/dev10/time_levers.json"))["default"]
main = json.load(open("results/cells/come@0.3.json"))
assert lev["provenance"] == main["provenance"], "not the sweep's model"
info = {k: main[k] for k in ("achieved_ratio", "layers", "params", "params_before", "provenance", "settings", "options")}
info["compress_seconds"] = lev["wall_s"]
info["compress_seconds_note"] = "results/dev10/time_levers.py (2 threads, idle machine); its saved model evaluated here"
rec = sw._ppl_record("come", 0.3, model, tok, info, time.perf_counter())
print("ppl", rec["ppl"], "main", main["ppl"])
assert abs(rec["ppl"] - main["ppl"]) < 1e-6 * main["ppl"], "perplexity differs from the main table's cell"
mdir = sw.model_dir("come", 0.3)
shutil.copytree(src, mdir, dirs_exist_ok=True)
sw.write(rec)
