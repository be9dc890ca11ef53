import json, os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from come_fast.models import load_model
from come_fast.eval.tasks import load_examples, choice_loglikelihoods, score_choices, encode_pair
import os
model, tok = load_model(os.path.expanduser("~/.cache/come_fast/smollm2-135m"))
out = {}
with torch.inference_mode():
    for t in ["piqa", "hellaswag", "openbookqa"]:
        exs = load_examples(t, os.environ.get("DATA", "../shared/data"), 300)
        rows = []
        for ex in exs:
            lls = choice_loglikelihoods(model, tok, ex)
            s = score_choices(lls, ex.choices, ex.gold)
            rows.append({"requests": ex.requests, "choices": ex.choices, "gold": ex.gold, "lls": lls, **s,
                         "tok": [encode_pair(tok, c, x) for c, x in ex.requests]})
        out[t] = rows
        print(t, "acc", sum(r["acc"] for r in rows) / len(rows), "acc_norm", sum(r["acc_norm"] for r in rows) / len(rows), flush=True)
json.dump(out, open("/tmp/lmcheck/ours.json", "w"))
