"""WikiText-2 perplexity split by position inside the 512-token windows: where
in the context a compressed model loses most against the dense one (issue 9's
diagnosis of the distilled model's gap):

    python benchmarks/position_ppl.py dense results/keep4/models/come@0.3+distill+ce-400 \\
        [--windows 20] [--out results/distill_long/position_ppl.json] [--tokens]

The windows are the evaluation's (the first N non-overlapping 512-token windows
of the test text); each quarter's perplexity is exp of the mean next-token loss
of the positions in it, over all windows.

``--tokens`` (needs ``dense`` among the models) splits the same predicted tokens
three more ways and gives each part's share of a model's excess loss over the
dense one (sum of its per-token loss minus the dense model's): by the kind of
token predicted (``KINDS``: WikiText's ``@-@`` / ``= heading =`` artefacts, the
space before punctuation its tokenisation leaves, whitespace, other
punctuation, word pieces), by the dense model's own loss on it (how sure the
teacher was), and by whether the same (previous token, token) pair occurred
earlier in the window (what copying from the context can predict).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import torch

import come_fast
from come_fast.eval.perplexity import read_wikitext2_test, token_ids, window_starts
from come_fast.models import load_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


KINDS = ("artefact (@-@, = heading =)", "space before punctuation", "whitespace", "other punctuation",
         "word piece")
TEACHER_LOSS_BINS = (0.0, 0.5, 1.5, 3.0, 5.0, math.inf)


def token_losses(model, x: torch.Tensor, batch: int = 2) -> torch.Tensor:
    """Next-token loss of every token of ``x`` [n, T] but the first: [n, T-1], float64."""
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            rows = x[i:i + batch]
            logits = model(rows).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                                    reduction="none").view(rows.shape[0], -1)
            out.append(nll.double())
    return torch.cat(out)


def position_losses(model, x: torch.Tensor, batch: int = 2) -> torch.Tensor:
    """Mean next-token loss at each position 1..T-1 over the rows of ``x`` [n, T]."""
    return token_losses(model, x, batch).mean(0)


def token_kind(piece: str) -> str:
    """The ``KINDS`` entry of one decoded token."""
    if "@" in piece or "=" in piece:
        return KINDS[0]
    if piece.strip() == "":
        return KINDS[2]
    if re.fullmatch(r" [^\w\s]+", piece) or piece.startswith(" '"):  # " ,", " .", " 's": WikiText's spacing
        return KINDS[1]
    if re.fullmatch(r"[^\w\s]+", piece.strip()):
        return KINDS[3]
    return KINDS[4]


def seen_pair(x: torch.Tensor) -> torch.Tensor:
    """[n, T-1] bool: whether (x[r, j], x[r, j+1]) already occurred at an earlier
    position of row r, i.e. the token at j+1 could be copied from the context."""
    n, T = x.shape
    out = torch.zeros(n, T - 1, dtype=torch.bool)
    for r in range(n):
        seen = set()
        for j, pair in enumerate(zip(x[r, :-1].tolist(), x[r, 1:].tolist())):
            out[r, j] = pair in seen
            seen.add(pair)
    return out


def excess_shares(loss: torch.Tensor, dense: torch.Tensor, parts: dict) -> dict:
    """Per named part (a bool mask over the tokens): its count, both models'
    perplexity on it, the excess loss per token and its share of the total excess."""
    excess = loss - dense
    total = float(excess.sum())
    return {name: {"tokens": int(m.sum()), "ppl": math.exp(float(loss[m].mean())),
                   "dense_ppl": math.exp(float(dense[m].mean())), "excess_per_token": float(excess[m].mean()),
                   "share_of_excess": float(excess[m].sum()) / total}
            for name, m in parts.items() if int(m.sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="checkpoint folders (come_fast.save); 'dense' for the original")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--parts", type=int, default=4, help="equal position ranges per window")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--out")
    ap.add_argument("--tokens", action="store_true",
                    help="also split each model's excess loss over the dense one by token kind, by the dense "
                         "model's loss and by whether the token pair occurred earlier in the window")
    args = ap.parse_args(argv)
    if args.tokens and "dense" not in args.models:
        ap.error("--tokens compares with the dense model: name 'dense' among the models")
    torch.set_num_threads(args.threads)
    dense, tok = load_model("smollm2-135m")
    ids = torch.as_tensor(token_ids(tok, read_wikitext2_test(args.data_dir)))
    T, W = args.seq_len, args.windows
    try:
        x = torch.stack([ids[s:s + T] for s in window_starts(ids.numel(), T, W)])  # the evaluation's windows
    except ValueError as e:
        ap.error(str(e))
    edges = [round(k * T / args.parts) for k in range(args.parts + 1)]
    rows, per_token = {}, {}
    for name in args.models:
        model = dense if name == "dense" else come_fast.load(name)[0]
        per_token[name] = token_losses(model, x)
        nll = per_token[name].mean(0)  # nll[j] predicts token j + 1
        parts = [math.exp(float(nll[max(a - 1, 0):b - 1].mean())) for a, b in zip(edges, edges[1:])]
        rows[name] = {"parts": parts, "all": math.exp(float(nll.mean()))}
        print(f"{name}: " + ", ".join(f"{a}-{b - 1}: {p:.2f}" for a, b, p in zip(edges, edges[1:], parts))
              + f"; all {rows[name]['all']:.2f}", flush=True)
    if "dense" in rows:
        for name, r in rows.items():
            r["ratio_to_dense"] = [p / d for p, d in zip(r["parts"], rows["dense"]["parts"])]
            print(f"{name} / dense: " + ", ".join(f"{q:.2f}x" for q in r["ratio_to_dense"]))
    if args.tokens:
        kinds = [token_kind(tok.decode([t])) for t in x[:, 1:].reshape(-1).tolist()]
        kind = torch.tensor([KINDS.index(k) for k in kinds]).view(x.shape[0], -1)
        d = per_token["dense"]
        splits = {"kind": {k: kind == i for i, k in enumerate(KINDS)},
                  "dense_loss": {f"[{a:g}, {b:g})": (d >= a) & (d < b)
                                 for a, b in zip(TEACHER_LOSS_BINS, TEACHER_LOSS_BINS[1:])},
                  "pair_seen_before": {"seen earlier in the window": (seen := seen_pair(x)), "not seen": ~seen}}
        for name in args.models:
            if name == "dense":
                continue
            rows[name]["split"] = {by: excess_shares(per_token[name], d, parts) for by, parts in splits.items()}
            for by, got in rows[name]["split"].items():
                print(f"{name} by {by}: " + "; ".join(
                    f"{part} {v['tokens']} tokens, {v['ppl']:.1f} / dense {v['dense_ppl']:.1f}, "
                    f"{v['share_of_excess']:.0%} of the excess" for part, v in got.items()), flush=True)
    if args.out:
        out = {"windows": W, "seq_len": T, "positions": [[a, b - 1] for a, b in zip(edges, edges[1:])],
               "models": rows}
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
