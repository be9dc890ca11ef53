"""Which calibration loss ranks candidate merges better: KL to the original
model's next-token distributions, or the LM loss (next-token cross-entropy)?

One CoMe step on SmolLM2-135M from the full model: every adjacent pair at the
splits 0, 1/2 and 1 (a split of 0 or 1 deletes one layer), each merged with
folded norms and refit (compensation), scored on the held-out calibration rows
by both losses; the truth is the perplexity of each candidate model on held-out
C4 text (documents 500-999, never calibration). Spearman rank correlation of
each loss with the truth, and the truth-rank of each loss's pick.

    python benchmarks/judge_ranking.py [--windows 10] [--out results/judge_ranking.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import come_fast  # noqa: E402
from come_fast.adapters import adapter_for  # noqa: E402
from come_fast.calibration import LayerStream  # noqa: E402
from come_fast.cli import _default_data_dir  # noqa: E402
from come_fast.compensate import TeacherStates, holdout_rows, refit_down  # noqa: E402
from come_fast.dispatch import Ops  # noqa: E402
from come_fast.merge import concat_merge, replace_pair  # noqa: E402
from come_fast.methods import Context  # noqa: E402
from come_fast.methods.come import _select  # noqa: E402
from come_fast.eval.perplexity import perplexity_of_ids  # noqa: E402
from dev_ppl import CALIB, c4_dev_ids  # noqa: E402


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    rx, ry = torch.tensor(ranks(x)), torch.tensor(ranks(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--splits", default="0,0.5,1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/judge_ranking.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    model, tok = come_fast.load_model("smollm2-135m")
    a = adapter_for(model)
    ids = load_file(str(CALIB))["input_ids"]
    dev = c4_dev_ids(tok, _default_data_dir())
    stream = LayerStream(a, ids, 2, Ops("torch"))
    teacher = TeacherStates.from_stream(stream)
    stream.run(0)
    L = len(a.layers)
    rows = holdout_rows(ids.shape[0])
    with torch.inference_mode():
        h = a.final_norm(teacher[L][rows])
        t_lp = [F.log_softmax(a.lm_head(h[i:i + 2]).float(), -1) for i in range(0, len(rows), 2)]
    ctx = Context(a, ids, Ops("torch"))
    out = []
    layers = list(a.layers)
    t0 = time.perf_counter()
    for idx in range(L - 1):
        for r in [float(s) for s in args.splits.split(",")]:
            sel, *_ = _select(ctx, stream, idx, (r, 1 - r), "contiguous")
            cand = concat_merge(a, layers[idx], layers[idx + 1], sel, r, ctx.ops, norms="fold")
            refit_down(a, stream, cand, stream.input_of(idx), teacher[idx + 2])
            x = stream.input_of(idx)[rows]
            for layer in [cand] + layers[idx + 2:]:
                x = stream.forward_layer(layer, x)
            kl = lm = 0.0
            n = 0
            with torch.inference_mode():
                for k, i in enumerate(range(0, len(rows), 2)):
                    logits = a.lm_head(a.final_norm(x[i:i + 2])).float()
                    lq = F.log_softmax(logits, -1)
                    kl += float((t_lp[k].exp() * (t_lp[k] - lq)).sum())
                    tgt = ids[rows][i:i + 2, 1:]
                    lm += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                reduction="sum"))
                    n += lq.shape[0] * lq.shape[1]
            replace_pair(a, idx, cand)  # the candidate model, to measure it; then put the pair back
            ppl = perplexity_of_ids(model, dev, windows=args.windows)["ppl"]
            a.set_layers(layers)
            rec = {"pair": idx, "r": r, "kl": kl / n, "lm": lm / (n - len(rows)), "dev_ppl": ppl}
            out.append(rec)
            print(json.dumps(rec), flush=True)
    truth = [c["dev_ppl"] for c in out]
    summary = {}
    for key in ("kl", "lm"):
        v = [c[key] for c in out]
        pick = min(range(len(out)), key=lambda i: v[i])
        summary[key] = {"spearman_with_dev_ppl": spearman(v, truth),
                        "pick": out[pick], "pick_truth_rank": sorted(truth).index(truth[pick]) + 1}
    result = {"candidates": out, "summary": summary, "seconds": time.perf_counter() - t0,
              "held_out_rows": rows, "windows": args.windows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
