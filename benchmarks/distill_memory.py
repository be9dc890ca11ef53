"""Peak memory and time of the distillation schedules (come_fast.posttrain):
joint vs layer-wise, with and without gradient checkpointing, on a model of
SmolLM2-135M's shape (random weights: memory and time do not depend on the
values) compressed by deleting layers to ~30%.

    python benchmarks/distill_memory.py --device cuda --steps 10 --out results.json

On CUDA the figure is torch.cuda.max_memory_allocated over the distillation
alone (the teacher and student weights included: they are resident before it
starts; ``weights_bytes`` gives them). On a CPU ``peak_bytes`` is null.
Also checks, on the device, that an interrupted and resumed run ends at the
uninterrupted run's parameters (max abs difference reported).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from come_fast.adapters import adapter_for  # noqa: E402
from come_fast.posttrain import hierarchical_distill  # noqa: E402


def smollm2_shaped(layers: int, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype=dtype, device=device).eval()


class Crash(Exception):
    pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--keep", type=int, default=21, help="student layers (of 30): 21 is ~30% of SmolLM2-135M")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume-only", action="store_true", help="only the resume and rerun comparison")
    ap.add_argument("--no-resume", action="store_true", help="only the memory figures")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    teacher = smollm2_shaped(30, dtype, dev)
    keep = list(range(args.keep - 1)) + [29]  # delete a block before the last layer (ShortGPT's usual cut)
    g = torch.Generator().manual_seed(1)
    n_rows = args.steps * args.batch
    train = torch.randint(0, 49152, (n_rows, args.seq_len), generator=g)
    val = torch.randint(0, 49152, (args.batch, args.seq_len), generator=g)

    def student():
        s = copy.deepcopy(teacher)
        a = adapter_for(s)
        a.set_layers([a.layers[i] for i in keep])
        with torch.no_grad():  # no layer is the teacher's own any more: the layer-wise schedule trains every one
            for p in a.layers.parameters():
                p.mul_(1.01)
        return s

    weights = sum(p.numel() * p.element_size() for p in teacher.parameters())
    rows = []
    configs = () if args.resume_only else (("joint", False), ("joint", True), ("layerwise", False), ("layerwise", True))
    for schedule, gc in configs:
        s = student()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        rep = hierarchical_distill(adapter_for(s), adapter_for(teacher), train, keep, steps=args.steps, lr=1e-4,
                                   batch_size=args.batch, val_tokens=val, schedule=schedule, grad_checkpoint=gc,
                                   joint_steps=0 if schedule == "layerwise" else None)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        row = {"schedule": schedule, "grad_checkpoint": gc, "seconds": round(sec, 2),
               "peak_bytes": rep["peak_memory_bytes"], "resident_before_bytes": base if dev.type == "cuda" else None,
               "loss_before": rep["loss_before"], "loss_after": rep["loss_after"],
               "layer_runs": len([r for r in rep["layers"] if not r.get("skipped")])}
        if row["peak_bytes"] is not None:
            row["peak_over_resident_MiB"] = round((row["peak_bytes"] - base) / 2**20, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del s
    if dev.type == "cuda" and not args.resume_only:
        # the layer runs alone, without the joint loss's evaluations around them
        from come_fast.distill import training_only
        from come_fast.posttrain import _layerwise

        s = student()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        a = adapter_for(s)
        with training_only(s, list(a.layers.parameters())):
            _layerwise(a, adapter_for(teacher), keep, train, val, steps=args.steps, lr=1e-4, batch_size=args.batch,
                       seed=0, progress=False, eval_every=0, patience=None, group=1, ck=None, grad_checkpoint=False,
                       cache_bytes=None, teachers_own=set())
        torch.cuda.synchronize()
        row = {"schedule": "layerwise: the layer runs alone", "grad_checkpoint": False,
               "peak_bytes": int(torch.cuda.max_memory_allocated(dev)), "resident_before_bytes": base}
        row["peak_over_resident_MiB"] = round((row["peak_bytes"] - base) / 2**20, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del s
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": args.dtype,
           "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "student_layers": len(keep),
           "weights_bytes": weights, "runs": rows, "torch": torch.__version__}
    if not args.no_resume:
        res.update(resume_check(args, teacher, student, train, val, keep))
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def resume_check(args, teacher, student, train, val, keep) -> dict:
    """k steps, a crash, a resume to N, against N straight and against a second straight run."""
    kw = dict(steps=args.steps, lr=1e-3, batch_size=args.batch, val_tokens=val, eval_every=2, save_every=2)
    a0 = student()
    hierarchical_distill(adapter_for(a0), adapter_for(teacher), train, keep, **kw)
    a1 = student()
    with tempfile.TemporaryDirectory() as d:
        def crash(label, done, total):
            if done == args.steps // 2 + 1:
                raise Crash()
        try:
            hierarchical_distill(adapter_for(a1), adapter_for(teacher), train, keep, resume=d, progress=crash, **kw)
        except Crash:
            pass
        a1 = student()
        hierarchical_distill(adapter_for(a1), adapter_for(teacher), train, keep, resume=d, **kw)
    a2 = student()  # the same run again, uninterrupted: how deterministic the device is
    hierarchical_distill(adapter_for(a2), adapter_for(teacher), train, keep, **kw)
    with torch.no_grad():
        diff = max(float((p - q).abs().max()) for p, q in zip(a0.parameters(), a1.parameters()))
        rerun = max(float((p - q).abs().max()) for p, q in zip(a0.parameters(), a2.parameters()))
    bitwise = all(torch.equal(p, q) for p, q in zip(a0.parameters(), a1.parameters()))
    return {"resume_max_abs_diff": diff, "resume_bitwise": bitwise, "rerun_max_abs_diff": rerun}


if __name__ == "__main__":
    sys.exit(main())
