"""Distillation against plain fine-tuning at the same token budget (issue 9).

Trains a compressed SmolLM2 (a folder ``come_fast.save`` wrote, which records
the provenance) from the dense model on C4 documents 0-499 of
``c4/train_sample.jsonl`` (documents 500-999 are the development text the
compression's levers were chosen on; ``--docs 1000`` trains on them too, as
the mixed-precision budget needs: ``--autocast bfloat16`` runs the steps in
bfloat16 autocast, about twice as fast here): ``--loss distill`` is the hierarchical distillation (MSE along the
provenance + KL at the head, compress's default), ``--loss ce`` plain LM
fine-tuning of the same model (next-token cross-entropy, no teacher),
``--loss distill+ce`` both (``distill_ce=1`` beside the default terms),
``--loss kl+ce`` the same without the layer targets (``distill_mse=0``),
``--loss kl`` the teacher's output distribution alone (no layer targets, no
cross-entropy); ``--layers changed`` trains only the student layers the
compression changed (merged or compensated), the others stay the teacher's;
``--schedule layerwise --layer-steps S`` first trains each changed layer alone
(S steps of MSE to the teacher's state at the end of its span, on the same
rows), then runs ``--steps`` joint steps of the loss named. Same rows, steps,
batch, learning rate and schedule. Every ``--eval-every`` steps
the student's next-token loss on 8 held-apart rows is recorded (the same
measure for every loss), then WikiText-2 perplexity (40 windows) and, with
``--tasks``, the dev slice of the tasks named.

    python benchmarks/distill_compare.py --student results/models/come@0.3 --loss distill \
        --steps 150 --out results/distill/come30_distill.json [--save DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from come_fast import api
from come_fast.adapters import adapter_for
from come_fast.distill import AUTOCAST_DTYPES
from come_fast.eval import evaluate
from come_fast.models import load_model
from come_fast.posttrain import distill_rows, hierarchical_distill

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
C4_ROWS = "c4/train_sample.jsonl documents 0-499"  # the default training text, as the JSON records it
LOSSES = {"distill": dict(mse=1.0, kl=1.0, ce=0.0), "ce": dict(mse=0.0, kl=0.0, ce=1.0),
          "distill+ce": dict(mse=1.0, kl=1.0, ce=1.0), "kl+ce": dict(mse=0.0, kl=1.0, ce=1.0),
          "kl": dict(mse=0.0, kl=1.0, ce=0.0)}


def lm_loss(model, rows: torch.Tensor, batch: int = 2) -> float:
    with torch.no_grad():
        return sum(float(model(rows[i:i + batch], labels=rows[i:i + batch]).loss)
                   for i in range(0, rows.shape[0], batch)) / math.ceil(rows.shape[0] / batch)


def plot(folder: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 8))
    colours = iter(plt.get_cmap("tab20").colors)  # more runs than the default cycle's 10 colours
    shapes, dense, sources = set(), set(), set()
    for f in sorted(folder.glob("*.json")):
        d = json.loads(f.read_text())
        if "curve" not in d:  # another benchmark's output in the same folder (position_ppl.json)
            continue
        shapes.add(f"{d['val_rows']} rows x {d['seq_len']}")
        sources.add("C4" if str(d.get("data", C4_ROWS)).startswith("c4/") else Path(d["data"]).name)  # older runs: C4
        if "teacher_val_lm_loss" in d:
            dense.add(round(d["teacher_val_lm_loss"], 6))
        xs = [c["tokens"] / 1000 for c in d["curve"]]
        ys = [math.exp(c["val_lm_loss"]) for c in d["curve"]]
        only = "" if d.get("layers", "all") == "all" else f", {d['layers']} layers only"
        temp = f", T {d['temperature']:g}" if "temperature" in d else ""
        temp += ", bfloat16" if d.get("autocast") else ""
        temp += f", seed {d['seed']}" if d.get("seed") else ""
        if d.get("schedule") == "layerwise":
            only += f", after {d['layer_steps']} layer-wise steps per layer"
        name = d.get('label') or Path(d['student']).name
        ax.plot(xs, ys, marker="o", ms=3, color=next(colours, None), ls="--" if "ShortGPT" in name else "-",
                label=f"{name} + {d['loss']}{only} (lr {d['lr']:g}{temp}; WikiText-2 {d['ppl']:.1f})")
    for loss in sorted(dense):
        ax.axhline(math.exp(loss), color="grey", ls="--", lw=1)
        ax.annotate(f"dense model {math.exp(loss):.1f}", (0, math.exp(loss)), textcoords="offset points",
                    xytext=(2, 3), fontsize=8, color="grey")
    ax.set_xlabel("training tokens seen (thousands)")
    ax.set_ylabel(f"held-out {' / '.join(sorted(sources))} perplexity ({', '.join(sorted(shapes))})", fontsize=9)
    ax.set_title("SmolLM2-135M at 30%: held-out perplexity while training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below: the curves stay visible
    fig.tight_layout()
    out = folder / "curves.png"
    fig.savefig(out.with_suffix(".tmp.png"), dpi=120)
    os.replace(out.with_suffix(".tmp.png"), out)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", help="a compressed model folder (come_fast.save)")
    ap.add_argument("--label", help="the student's name in the plot (default: its folder's name)")
    ap.add_argument("--loss", choices=sorted(LOSSES))
    ap.add_argument("--plot", metavar="DIR", help="only draw DIR/*.json's curves into DIR/curves.png")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0, help="the KL term's temperature T (T^2 KL at T)")
    ap.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), help="mixed-precision training steps (about 2x faster here)")
    ap.add_argument("--docs", type=int, default=500,
                    help="train on C4 documents 0..N-1 (the first --val-rows rows held apart); default 500")
    ap.add_argument("--rows", type=int,
                    help="training rows to cut (default: one per step and batch slot; fewer: the steps go round them)")
    ap.add_argument("--seed", type=int, default=0, help="the order of the training rows (hierarchical_distill's seed)")
    ap.add_argument("--val-rows", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--tasks", default="", help="comma-separated dev-slice tasks after training (e.g. piqa,hellaswag)")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--train-text", metavar="FILE",
                    help="train (and hold rows apart) on this UTF-8 text file instead of C4 documents 0-499")
    ap.add_argument("--layers", choices=("all", "changed"), default="all",
                    help="train every decoder layer, or only those the compression changed (merged or compensated)")
    ap.add_argument("--schedule", choices=("joint", "layerwise"), default="joint",
                    help="layerwise: --layer-steps steps per changed layer alone (MSE) before the --steps joint ones")
    ap.add_argument("--layer-steps", type=int, default=0, help="the layerwise schedule's steps per layer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--save", metavar="DIR", help="also write the trained model there (come_fast's checkpoint form)")
    args = ap.parse_args(argv)
    if args.plot:
        return plot(Path(args.plot))
    if not (args.student and args.loss and args.out):
        ap.error("--student, --loss and --out are needed (or --plot DIR)")
    if (args.schedule == "layerwise") != (args.layer_steps > 0):
        ap.error("--schedule layerwise needs --layer-steps S > 0, and --layer-steps only goes with it")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    teacher, tok = load_model("smollm2-135m")
    student, stok, meta = api.load(args.student)
    prov = meta["provenance"]
    if args.train_text:
        docs = [Path(args.train_text).read_text(encoding="utf-8")]
    else:
        docs = [json.loads(line)["text"] for line in
                (Path(args.data_dir) / "c4" / "train_sample.jsonl").read_text().splitlines()[:args.docs]]
    rows = distill_rows(docs, teacher, tok, rows=args.val_rows + (args.rows or args.steps * args.batch),
                        seq_len=args.seq_len)
    val, train = rows[:args.val_rows], rows[args.val_rows:]
    per_step = args.batch * args.seq_len
    teacher_val = lm_loss(teacher, val)  # the dense model's own held-out loss: where the curves can go
    curve = [{"step": 0, "tokens": 0, "val_lm_loss": lm_loss(student, val)}]
    print(f"step 0: held-out LM loss {curve[0]['val_lm_loss']:.4f}", flush=True)

    layer_curve, joint_start = [], []

    def monitor(label, done, total):  # called after every step: the same measure for both losses
        if label.startswith("layer"):  # the layerwise phase: one point at the end of each layer's run
            if done == total:
                layer_curve.append({"phase": label, "val_lm_loss": lm_loss(student, val),
                                    "seconds": time.perf_counter() - t1})
                print(f"{label}: held-out LM loss {layer_curve[-1]['val_lm_loss']:.4f} "
                      f"({layer_curve[-1]['seconds']:.0f} s)", flush=True)
            return
        if not joint_start:
            joint_start.append(time.perf_counter() - t1)
        if done % args.eval_every == 0 or done == total:
            loss = lm_loss(student, val)
            curve.append({"step": done, "tokens": done * per_step, "val_lm_loss": loss,
                          "seconds": time.perf_counter() - t1})
            print(f"step {done}/{total}: held-out LM loss {loss:.4f} ({time.perf_counter() - t1:.0f} s)", flush=True)

    t1 = time.perf_counter()
    schedule = (dict(schedule="layerwise", steps=args.layer_steps, joint_steps=args.steps)
                if args.schedule == "layerwise" else dict(steps=args.steps))
    rep = hierarchical_distill(adapter_for(student), adapter_for(teacher), train, prov, lr=args.lr,
                               batch_size=args.batch, val_tokens=val, progress=monitor, layers=args.layers,
                               temperature=args.temperature, autocast=args.autocast, seed=args.seed,
                               **schedule, **LOSSES[args.loss])
    train_s = time.perf_counter() - t1
    del teacher
    tasks = ["wikitext2"] + [t for t in args.tasks.split(",") if t]
    ev = evaluate(student, stok or tok, tasks=tasks, data_dir=args.data_dir, limit=200, progress=False)
    out = {"student": args.student, "label": args.label, "loss": args.loss, "weights": LOSSES[args.loss],
           "data": args.train_text or C4_ROWS.replace("0-499", f"0-{args.docs - 1}"),
           "layers": args.layers, "trained_layers": rep["settings"]["trained_layers"],
           **({"schedule": "layerwise", "layer_steps": args.layer_steps, "layerwise_curve": layer_curve,
               "layerwise_seconds": joint_start[0] if joint_start else None}
              if args.schedule == "layerwise" else {}),
           "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
           **({"temperature": args.temperature} if args.temperature != 1.0 else {}),
           **({"autocast": args.autocast} if args.autocast else {}), **({"seed": args.seed} if args.seed else {}),
           **({"docs": args.docs} if args.docs != 500 else {}), "train_rows": int(train.shape[0]),
           "tokens": args.steps * per_step, "val_rows": args.val_rows, "train_seconds": train_s,
           "threads": args.threads, "teacher_val_lm_loss": teacher_val,
           "objective_before": rep["loss_before"], "objective_after": rep["loss_after"], "curve": curve,
           "ppl": ev["tasks"]["wikitext2"]["ppl"],
           "tasks": {k: v for k, v in ev["tasks"].items() if k != "wikitext2"},
           "total_seconds": time.perf_counter() - t0}
    if args.save:
        from come_fast.checkpoint import save_checkpoint

        meta = dict(meta, distillation={k: out[k] for k in ("loss", "weights", "steps", "batch", "seq_len", "lr",
                                                            "tokens", "ppl")})
        save_checkpoint(student, stok or tok, args.save, meta)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.out)
    print(f"{args.loss}: {args.steps} steps ({out['tokens']:,} tokens) in {train_s:.0f} s; held-out LM loss "
          f"{curve[0]['val_lm_loss']:.4f} -> {curve[-1]['val_lm_loss']:.4f}; WikiText-2 {out['ppl']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
