"""The `come_fast` lm-eval model against stock HFLM: same tasks, same examples,
per-example answers and CPU seconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lmeval_check/fast_path.py \
        --model ~/.cache/come_fast/smollm2-135m --tasks piqa,hellaswag,arc_easy --limit 200 \
        --runs fast,hf8 --out /tmp/lmcheck/dense.json

Runs: ``fastN`` = ComeFastLM (shared-context fast path, up to N requests per
pass; ``fast`` = 1: one question at a time), ``plainN`` = ComeFastLM with
share_prefix=False (HFLM's path on a come_fast-loaded model), ``hfN`` =
stock ``HFLM(pretrained=DIR, dtype=float32, device=cpu, batch_size=N)``, i.e.
``lm_eval --model hf --batch_size N``. Every run evaluates lm-eval's stock task
definitions on the local files (come_fast/eval/lm_eval_tasks/) through
``lm_eval.evaluator.evaluate``, one thread, CPU seconds by time.process_time.
The JSON holds, per run and task, the metrics, seconds and every example's
log-likelihoods; the summary printed compares each run with the first.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from come_fast.eval import default_data_dir  # noqa: E402
from come_fast.eval.lm_eval_tasks import LM_EVAL_TASKS, TASKS_DIR  # noqa: E402


def make_lm(run: str, model_dir: str):
    if run.startswith(("fast", "plain")):
        from come_fast.eval.lmeval import ComeFastLM

        kind, size = (run[:4], run[4:]) if run.startswith("fast") else (run[:5], run[5:])
        return ComeFastLM(pretrained=model_dir, dtype="float32", device="cpu", share_prefix=kind == "fast",
                          batch_size=int(size or 1), progress=False)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=int(run[2:]))


def run_one(run: str, model_dir: str, tasks: list[str], data_dir: str, limit: int, start: int,
            on_task=lambda out: None) -> dict:
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    lm = make_lm(run, model_dir)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": data_dir})
    out = {}
    for name in tasks:
        lt = LM_EVAL_TASKS[name][0]
        task = manager.load([lt])["tasks"][lt]
        task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
        c0, w0 = time.process_time(), time.perf_counter()
        res = evaluate(lm=lm, task_dict={"tasks": {lt: task}, "groups": {}}, log_samples=True,
                       samples={lt: list(range(start, start + limit))})
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        samples = sorted(res["samples"][lt], key=lambda s: s["doc_id"])
        m = res["results"][lt]
        out[name] = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                     "metrics": {k.split(",")[0]: v for k, v in m.items() if k.endswith(",none")},
                     "examples": [{"doc_id": s["doc_id"], "lls": [float(r[0][0]) for r in s["resps"]],
                                   "acc": s["acc"], "acc_norm": s.get("acc_norm"), "target": s["target"]}
                                  for s in samples]}
        print(f"{run:6s} {name:14s} cpu {cpu:8.1f} s  wall {wall:8.1f} s  "
              + "  ".join(f"{k} {100 * v:.1f}" for k, v in out[name]["metrics"].items() if "stderr" not in k),
              flush=True)
        on_task(out)
    del lm
    gc.collect()
    return out


def compare(ref: dict, other: dict) -> dict:
    out = {}
    for name, r in ref.items():
        o = other.get(name)
        if o is None:
            continue
        acc = sum(a["acc"] != b["acc"] for a, b in zip(r["examples"], o["examples"]))
        accn = sum((a["acc_norm"] != b["acc_norm"]) for a, b in zip(r["examples"], o["examples"]))
        dll = max(abs(x - y) for a, b in zip(r["examples"], o["examples"]) for x, y in zip(a["lls"], b["lls"]))
        out[name] = {"acc_diffs": acc, "acc_norm_diffs": accn, "max_abs_dll": dll,
                     "cpu_ratio": round(o["cpu_s"] / r["cpu_s"], 2)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (loaded by both come_fast and stock HFLM)")
    ap.add_argument("--tasks", default="piqa,hellaswag,arc_easy")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--runs", default="fast16,hf8", help="comma list of fast<N>, plain<N>, hf<N> (N: batch size)")
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()
    model_dir = os.path.expanduser(args.model)
    tasks = args.tasks.split(",")
    result = {"model": model_dir, "tasks": tasks, "limit": args.limit, "start": args.start, "runs": {}}
    for run in args.runs.split(","):
        def save(out, run=run):
            result["runs"][run] = out
            Path(args.out).write_text(json.dumps(result, indent=1))

        run_one(run, model_dir, tasks, args.data_dir, args.limit, args.start, on_task=save)
    runs = list(result["runs"])
    result["comparison"] = {f"{r} vs {runs[0]}": compare(result["runs"][runs[0]], result["runs"][r])
                            for r in runs[1:]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["comparison"], indent=1))


if __name__ == "__main__":
    main()
