"""docs/evaluation.md's reference numbers: dense SmolLM2-135M-Instruct on
examples 200-499 of each task file, scored by lm-eval 0.4.13 itself through
come_fast.evaluate (harness="lm-eval": the stock task definitions on the local
files, come_fast/eval/lm_eval_tasks/). Writes dense_200_499.json beside this file.

    .venv/bin/python benchmarks/lmeval_check/reference_slice.py
"""
import json
from pathlib import Path

import torch

import come_fast
from come_fast.eval import ZERO_SHOT_TASKS, default_data_dir
from come_fast.models import load_model

torch.set_num_threads(1)
model, tok = load_model("smollm2-135m", dtype=torch.float32, device=torch.device("cpu"))
res = come_fast.evaluate(model, tokenizer=tok, data_dir=default_data_dir(), tasks=list(ZERO_SHOT_TASKS),
                         start=200, limit=300, progress=False, harness="lm-eval")
(Path(__file__).parent / "dense_200_499.json").write_text(json.dumps(res, indent=1))
for name in ZERO_SHOT_TASKS:
    print(name, {k: round(100 * v, 1) for k, v in res["tasks"][name].items() if k in ("acc", "acc_norm")})
