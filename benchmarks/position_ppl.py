"""WikiText-2 perplexity split by position inside the 512-token windows: where
in the context a compressed model loses most against the dense one (issue 9's
diagnosis of the distilled model's gap):

    python benchmarks/position_ppl.py dense results/keep4/models/come@0.3+distill+ce-400 \\
        [--windows 20] [--out results/distill_long/position_ppl.json]

The windows are the evaluation's (the first N non-overlapping 512-token windows
of the test text); each quarter's perplexity is exp of the mean next-token loss
of the positions in it, over all windows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

import come_fast
from come_fast.eval.perplexity import read_wikitext2_test, token_ids, window_starts
from come_fast.models import load_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def position_losses(model, x: torch.Tensor, batch: int = 2) -> torch.Tensor:
    """Mean next-token loss at each position 1..T-1 over the rows of ``x`` [n, T]."""
    total = torch.zeros(x.shape[1] - 1, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            rows = x[i:i + batch]
            logits = model(rows).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                                    reduction="none").view(rows.shape[0], -1)
            total += nll.sum(0).double()
    return total / x.shape[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="checkpoint folders (come_fast.save); 'dense' for the original")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--parts", type=int, default=4, help="equal position ranges per window")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, tok = load_model("smollm2-135m")
    ids = torch.as_tensor(token_ids(tok, read_wikitext2_test(args.data_dir)))
    T, W = args.seq_len, args.windows
    try:
        x = torch.stack([ids[s:s + T] for s in window_starts(ids.numel(), T, W)])  # the evaluation's windows
    except ValueError as e:
        ap.error(str(e))
    edges = [round(k * T / args.parts) for k in range(args.parts + 1)]
    rows = {}
    for name in args.models:
        model = dense if name == "dense" else come_fast.load(name)[0]
        nll = position_losses(model, x)  # nll[j] predicts token j + 1
        parts = [math.exp(float(nll[max(a - 1, 0):b - 1].mean())) for a, b in zip(edges, edges[1:])]
        rows[name] = {"parts": parts, "all": math.exp(float(nll.mean()))}
        print(f"{name}: " + ", ".join(f"{a}-{b - 1}: {p:.2f}" for a, b, p in zip(edges, edges[1:], parts))
              + f"; all {rows[name]['all']:.2f}", flush=True)
    if "dense" in rows:
        for name, r in rows.items():
            r["ratio_to_dense"] = [p / d for p, d in zip(r["parts"], rows["dense"]["parts"])]
            print(f"{name} / dense: " + ", ".join(f"{q:.2f}x" for q in r["ratio_to_dense"]))
    if args.out:
        out = {"windows": W, "seq_len": T, "positions": [[a, b - 1] for a, b in zip(edges, edges[1:])],
               "models": rows}
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
