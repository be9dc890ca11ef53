"""What lm-eval's capitalisation of HellaSwag's ctx_b changes on the local file.

The local file joins ctx_a and ctx_b (``... roof. he``); lm-eval scores
``... roof. He`` (``ctx_b.capitalize()``). come_fast splits the context back
(``tasks.split_hellaswag_context``) and scores lm-eval's query. This scores
both queries for the same examples with the built-in scorer (the same
log-likelihoods as lm-eval, see fast_path.py) and counts changed answers.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lmeval_check/hellaswag_case.py --model smollm2-135m \
        --ranges 0:300,200:500 --out /tmp/lmcheck/hellaswag_case.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from come_fast.eval import default_data_dir  # noqa: E402
from come_fast.eval import tasks as T  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ranges", default="0:300,200:500", help="comma list of start:stop example ranges")
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from come_fast.models import load_model

    model, tok = load_model(args.model)
    ranges = [tuple(map(int, r.split(":"))) for r in args.ranges.split(",")]
    docs = T.get_task("hellaswag").load(Path(args.data_dir))
    wanted = sorted({i for a, b in ranges for i in range(a, b)})
    max_length = T.model_max_length(model, tok)
    per = {}
    with torch.inference_mode():
        for chunk_start in range(0, len(wanted), 4):
            chunk = wanted[chunk_start:chunk_start + 4]
            groups, meta = [], []
            for i in chunk:
                d = docs[i]
                endings = [T.hellaswag_preprocess(e) for e in d["endings"]]
                for variant, query in (("lm-eval", T.hellaswag_query(d)),
                                       ("file", T.hellaswag_preprocess(d["activity_label"] + ": " + d["ctx"]))):
                    groups.append([T.encode_pair(tok, query, " " + e) for e in endings])
                    meta.append((i, variant, query, endings, int(d["label"])))
            for (i, variant, query, endings, gold), scores in zip(meta, T.score_groups(model, groups, max_length)):
                lls = [ll for ll, _ in scores]
                s = T.score_choices(lls, endings, gold)
                pred = T._argmax(lls)
                pred_norm = T._argmax([ll / len(e) for ll, e in zip(lls, endings)])
                per.setdefault(i, {})[variant] = {"query": query, "pred": pred, "pred_norm": pred_norm, **s}
            print(f"{chunk[-1] + 1}/{len(wanted)}", end="\r", flush=True)
    out = {"model": args.model, "ranges": {}}
    for a, b in ranges:
        idx = range(a, b)
        r = {"n": len(idx), "queries_that_differ": sum(per[i]["lm-eval"]["query"] != per[i]["file"]["query"]
                                                       for i in idx)}
        for m in ("acc", "acc_norm"):
            for v in ("lm-eval", "file"):
                r[f"{m} {v}"] = round(100 * sum(per[i][v][m] for i in idx) / len(idx), 2)
            key = "pred" if m == "acc" else "pred_norm"
            r[f"{m}: answers changed"] = sum(per[i]["lm-eval"][key] != per[i]["file"][key] for i in idx)
            r[f"{m}: right/wrong changed"] = sum(per[i]["lm-eval"][m] != per[i]["file"][m] for i in idx)
        out["ranges"][f"{a}-{b - 1}"] = r
    out["examples"] = {i: {v: {k: per[i][v][k] for k in ("pred", "pred_norm", "acc", "acc_norm")} for v in per[i]}
                       for i in wanted}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["ranges"], indent=1))


if __name__ == "__main__":
    main()
