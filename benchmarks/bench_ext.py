"""Fused SwiGLU MLP (come_fast::swiglu_mlp) vs the stock Hugging Face LlamaMLP, CPU.

SmolLM2-135M shapes: d = 576, I = 1536 (dense) and I = 1271 (a merged, odd
width). Three variants per shape, all under torch.inference_mode():

* ``hf``        stock ``LlamaMLP.forward`` (gate, silu, up, mul, down)
* ``patched``   the same module after ``come_fast.runtime.use_fused_mlp``
                (includes the Python overhead of the patched forward)
* ``op``        ``torch.ops.come_fast.swiglu_mlp`` called directly

Run::

    pytest benchmarks/bench_ext.py --benchmark-group-by=param:inter,param:tokens \\
        --benchmark-columns=min,median,mean,rounds

``patched``/``op`` are skipped when come_fast._C is not built. On a shared
2-core machine compare the ``min`` column and set ``OMP_NUM_THREADS=1``: with
2 OpenMP threads on contended cores every barrier waits for a descheduled
thread and timings swing 5-10x.

The three GEMMs are ~95% of the time on CPU, so the fused op can only save the
silu/mul passes and two [N, I] allocations; measured here (1 thread, min):
decode step (T=1) ~8-14% faster, prefill (T=128/512) 1-5% faster.
"""
from __future__ import annotations

import pytest
import torch

from come_fast import runtime

pytest.importorskip("pytest_benchmark")

D = 576
WIDTHS = [1536, 1271]
TOKENS = [1, 128, 512]  # decode step, short and long prefill (batch 1)


def _mlp(inter: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=D, intermediate_size=inter, hidden_act="silu", mlp_bias=False)
    return LlamaMLP(cfg).eval()


@pytest.fixture(scope="module", params=WIDTHS, ids=lambda i: f"I{i}")
def inter(request):
    return request.param


@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("variant", ["hf", "patched", "op"])
def test_mlp(benchmark, inter, tokens, variant):
    if variant != "hf" and not runtime.EXTENSION_AVAILABLE:
        pytest.skip(f"come_fast._C not available: {runtime.EXTENSION_ERROR}")
    mlp = _mlp(inter)
    x = torch.randn(1, tokens, D)
    with torch.inference_mode():
        ref = mlp(x)
        if variant == "patched":
            assert runtime.use_fused_mlp(mlp) == 1
            fn = lambda: mlp(x)  # noqa: E731
        elif variant == "op":
            wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            fn = lambda: torch.ops.come_fast.swiglu_mlp(x, wg, wu, wd)  # noqa: E731
        else:
            fn = lambda: mlp(x)  # noqa: E731
        torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-5)
        benchmark.group = f"I={inter} tokens={tokens}"
        benchmark.extra_info.update(d=D, inter=inter, tokens=tokens, threads=torch.get_num_threads())
        benchmark(fn)
