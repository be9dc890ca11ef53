import json, glob
ours = json.load(open("/tmp/lmcheck/ours.json"))
for t in ["piqa", "hellaswag", "openbookqa"]:
    f = glob.glob(f"/tmp/lmcheck/out/*/samples_{t}_local_*.jsonl")[0]
    ls = sorted((json.loads(l) for l in open(f)), key=lambda s: s["doc_id"])
    assert len(ls) == 300 and [s["doc_id"] for s in ls] == list(range(300))
    nreq = npred = npred_n = ngold = 0; maxdiff = 0.0
    for s, o in zip(ls, ours[t]):
        req = [tuple(a["arguments"]["gen_args_0"]["arg_0"] if isinstance(a["arguments"], dict) else a["arguments"][:2]) for a in s["arguments"]] if False else None
        args = s["arguments"]
        pairs = [(a["arg_0"], a["arg_1"]) for a in args.values()] if isinstance(args, dict) else [tuple(a[:2]) for a in args]
        if pairs != [tuple(r) for r in o["requests"]]: nreq += 1
        lle = [float(r[0][0]) for r in s["resps"]]
        maxdiff = max(maxdiff, max(abs(a - b) for a, b in zip(lle, o["lls"])))
        if s["acc"] != o["acc"]: npred += 1
        if s["acc_norm"] != o["acc_norm"]: npred_n += 1
        if int(s["target"]) != o["gold"]: ngold += 1
    print(t, "lm-eval acc %.4f acc_norm %.4f" % (sum(s["acc"] for s in ls)/300, sum(s["acc_norm"] for s in ls)/300),
          "| ours acc %.4f acc_norm %.4f" % (sum(r["acc"] for r in ours[t])/300, sum(r["acc_norm"] for r in ours[t])/300),
          "| request-string mismatches", nreq, "gold mismatches", ngold, "acc diffs", npred, "acc_norm diffs", npred_n, "max |dLL| %.2e" % maxdiff)
