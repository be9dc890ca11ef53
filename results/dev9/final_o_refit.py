"""Refit a saved compressed model's changed layers once more with ``ls_parts`` (e.g. "down+o")
and measure C4-dev / WikiText-2-validation perplexity (20 windows each); "none" measures it as saved.

    OMP_NUM_THREADS=1 .venv/bin/python results/dev9/final_o_refit.py results/models/come@0.3 down+o
"""
import sys, json, time, torch
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT))
from safetensors.torch import load_file
import come_fast
from come_fast.adapters import adapter_for
from come_fast.calibration import LayerStream
from come_fast.compensate import TeacherStates, compensate_model
from come_fast.cli import _default_data_dir
from come_fast.eval.perplexity import perplexity_of_ids
from dev_ppl import c4_dev_ids, wiki_valid_ids, CALIB
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
src, parts = sys.argv[1], sys.argv[2]
dense, tok = come_fast.load_model("smollm2-135m")
tokens = load_file(str(CALIB))["input_ids"]
cfg = json.load(open(f"{src}/config.json"))["come_fast"]
prov = cfg["provenance"]
model = come_fast.load(src)[0]
ids = c4_dev_ids(tok, _default_data_dir()); wids = wiki_valid_ids(tok, _default_data_dir())
out = {"src": src, "parts": parts}
if parts == "none":
    out["c4"] = perplexity_of_ids(model, ids, windows=20)["ppl"]; out["wiki"] = perplexity_of_ids(model, wids, windows=20)["ppl"]
    print(json.dumps(out)); sys.exit()
t0 = time.time()
ts = TeacherStates.from_stream(LayerStream(adapter_for(dense), tokens, 2))
ma = adapter_for(model)
reps = compensate_model(ma, LayerStream(ma, tokens, 2), ts, prov, 30, parts=parts)
out["secs"] = time.time() - t0
out["reps"] = [(r["layer"], r["part"], r["alpha"], round(r["residual_after"], 4), [(e["part"], e["alpha"], round(e["residual_before"],4), round(e["residual_after"],4)) for e in r["earlier"]]) for r in reps]
out["c4"] = perplexity_of_ids(model, ids, windows=20)["ppl"]; out["wiki"] = perplexity_of_ids(model, wids, windows=20)["ppl"]
print(json.dumps(out))
