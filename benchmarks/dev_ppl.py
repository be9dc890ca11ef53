"""Development metrics for choosing defaults: perplexity on held-out C4 text and
on WikiText-2 validation.

The quality issue forbids tuning on WikiText-2 test. This script measures a
compressed model on C4 documents 500-999 of ``data/c4/train_sample.jsonl``
(the calibration tokens come from the first 64 documents) and on WikiText-2
VALIDATION (the tokenized release, detokenized as lm-eval does: the
calibration is web text, the report Wikipedia, and a lever that only fits the
calibration's domain shows here), 20 windows of 512 tokens each, the same
protocol as the WikiText-2 test perplexity otherwise.

    python benchmarks/dev_ppl.py --method come --ratio 0.3 [--option KEY=VALUE ...] [--out FILE]
    python benchmarks/dev_ppl.py --saved DIR [--out FILE]     # a model compressed before (come_fast.save)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

import come_fast
from come_fast.cli import _parse_kv, _default_data_dir
from come_fast.eval.perplexity import perplexity_of_ids, token_ids

CALIB = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "come_reference" / "calib_tokens.safetensors"


def c4_dev_ids(tokenizer, data_dir: str, first_doc: int = 500) -> list[int]:
    lines = (Path(data_dir) / "c4" / "train_sample.jsonl").read_text().splitlines()
    text = "\n\n".join(json.loads(l)["text"] for l in lines[first_doc:])
    return token_ids(tokenizer, text)


def wikitext_detokenize(s: str) -> str:
    """lm-evaluation-harness's wikitext detokenizer (tasks/wikitext/preprocess_wikitext.py)."""
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = s.replace(" : ", ": ").replace(" ; ", "; ").replace(" . ", ". ").replace(" ! ", "! ").replace(" ? ", "? ")
    s = s.replace(" , ", ", ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176)).replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def wiki_valid_ids(tokenizer, data_dir: str) -> list[int]:
    """WikiText-2 VALIDATION (never test): the tokenized release, detokenized, as a
    second development domain (the calibration is web text; the report is Wikipedia)."""
    text = wikitext_detokenize((Path(data_dir) / "wikitext2" / "valid.tokens.txt").read_text())
    return token_ids(tokenizer, text)


def heldout_kl(model, dense) -> float:
    """Mean KL(dense || model) per token on the calibration rows the refit holds out."""
    from safetensors.torch import load_file
    from come_fast.compensate import holdout_rows

    ids = load_file(str(CALIB))["input_ids"]
    rows = holdout_rows(ids.shape[0])
    total = n = 0
    with torch.inference_mode():
        for r in rows:
            lp = torch.log_softmax(dense(ids[r:r + 1]).logits.float(), -1)
            lq = torch.log_softmax(model(ids[r:r + 1]).logits.float(), -1)
            total += float((lp.exp() * (lp - lq)).sum())
            n += lp.shape[1]
    return total / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="come")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--option", action="append", default=[])
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--generate", action="store_true", help="also print a greedy continuation")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--snapshots", default=None, help="smaller ratios measured on the way (progressive methods)")
    p.add_argument("--saved", default=None, help="measure this saved compressed model instead of compressing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.saved and (args.option or args.snapshots):
        p.error("--saved measures a model as it was saved: --option and --snapshots do not apply")
    opts = dict(_parse_kv(t) for t in args.option)
    if args.saved:
        model, tok, meta = come_fast.load(args.saved)
        if tok is None:
            p.error(f"{args.saved} holds no tokenizer")
    else:
        model, tok = come_fast.load_model("smollm2-135m")
    t0 = time.perf_counter()
    ids = c4_dev_ids(tok, _default_data_dir())
    wids = wiki_valid_ids(tok, _default_data_dir())
    snaps = {}
    if args.snapshots:
        from come_fast.api import removals_for_ratio

        want = {removals_for_ratio(model, float(r)): float(r) for r in args.snapshots.split(",")}

        def on_step(partial):
            r = want.get(partial.layers_before - partial.layers_after)
            if r is not None:
                snaps[r] = {"c4_dev_ppl": perplexity_of_ids(partial.model, ids, windows=args.windows)["ppl"],
                            "wiki_valid_ppl": perplexity_of_ids(partial.model, wids, windows=args.windows)["ppl"],
                            "provenance": partial.provenance, "seconds": partial.seconds}
                print(json.dumps({"snapshot": r, **snaps[r]}), flush=True)

        opts["on_step"] = on_step
    if args.saved:
        secs, prov, steps = 0.0, (meta or {}).get("provenance"), None
    elif args.method != "dense":
        res = come_fast.compress(model, ratio=args.ratio, method=args.method, calib=str(CALIB), tokenizer=tok,
                                  progress=args.progress, **opts)
        opts.pop("on_step", None)
        secs = time.perf_counter() - t0
        prov = res.provenance
        steps = [{k: st.get(k) for k in ("pair", "ratio", "loss", "removed", "seconds")} for st in res.report
                 if isinstance(st, dict) and "compensation" not in st]
    else:
        secs, prov, steps = 0.0, None, None
    ppl = perplexity_of_ids(model, ids, windows=args.windows)["ppl"]
    wppl = perplexity_of_ids(model, wids, windows=args.windows)["ppl"]
    calib_kl = heldout_kl(model, come_fast.load_model("smollm2-135m")[0])
    out = {"method": "saved: " + args.saved if args.saved else args.method, "ratio": None if args.saved else args.ratio, "options": opts, "c4_dev_ppl": ppl, "wiki_valid_ppl": wppl, "calib_heldout_kl": calib_kl, "compress_s": secs,
           "provenance": prov, "steps": steps, "snapshots": snaps}
    if args.generate:
        ids_in = tok("The capital of France is", return_tensors="pt").input_ids
        with torch.inference_mode():
            g = model.generate(ids_in, max_new_tokens=20, do_sample=False)
        out["generate"] = tok.decode(g[0])
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
