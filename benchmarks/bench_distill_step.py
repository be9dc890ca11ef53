"""pytest-benchmark: one joint distillation step in float32 against the same step under bfloat16 autocast.

    pytest benchmarks/bench_distill_step.py --benchmark-only      # ~2 min on 2 cores
    python benchmarks/bench_distill_step.py [--threads 2]         # the same, a markdown table

What runs: SmolLM2-135M's shape (d 576, MLP 1,536, 9/3 heads, vocabulary 49,152,
tied head) with random weights, so no download: a 30-layer teacher and a 21-layer
student (30% fewer layers), one AdamW step of ``come_fast.posttrain``'s joint loss
``kl+ce`` (``distill_mse=0, distill_kl=1, distill_ce=1``: the teacher's forward
under inference mode, the student's forward and backward, the fused linear + KL
loss and the cross-entropy) on a batch of 2 x 256 tokens, the distillation runs'
setting. ``autocast``: "none" (float32) or "bfloat16" (``distill_autocast``: the
forward passes and the loss under ``torch.autocast``, the weights, gradients and
optimizer state in float32). The step's time does not depend on the weights'
values, so random ones measure what the real model's step costs.
"""
from __future__ import annotations

import argparse
import time

import pytest
import torch

from come_fast.adapters import adapter_for
from come_fast.distill import AUTOCAST_DTYPES, LossWeights, distill
from come_fast.posttrain import _Joint

AUTOCASTS = ["none", "bfloat16"]


def smollm2_shaped(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=layers, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=2048, rope_theta=100000.0)
    return LlamaForCausalLM(cfg).eval()


def make_step(autocast: str, batch: int = 2, seq_len: int = 256):
    """A callable running one distillation step (the same batch each time)."""
    teacher = smollm2_shaped(30)
    student = smollm2_shaped(21, seed=1)
    prov = list(range(21))  # kl+ce matches only the heads: the provenance is not read beyond its length
    rows = torch.randint(0, 49152, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    s, t = adapter_for(student), adapter_for(teacher)
    joint = _Joint(s, t, prov, mse=0.0, kl=1.0, grad_checkpoint=False, scale_rows=rows, batch_size=batch, ce=1.0)
    for p in student.parameters():
        p.requires_grad_(False)
    params = [p for layer in s.layers for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    forward = joint.forward_on(rows)
    amp = AUTOCAST_DTYPES.get(autocast)

    def step():
        distill(forward, params, batch, steps=1, lr=1e-5, batch_size=batch, weights=LossWeights(mse=0, kl=1, ce=1),
                autocast=amp)

    return step


@pytest.mark.parametrize("autocast", AUTOCASTS)
def test_distill_step(benchmark, autocast):
    step = make_step(autocast)
    step()  # warm-up (allocations, oneDNN kernels)
    benchmark.extra_info["tokens_per_step"] = 512
    benchmark.pedantic(step, rounds=3, iterations=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| autocast | s per step (2 x 256 tokens), median of {args.rounds} | tokens/s |\n|---|---:|---:|")
    for autocast in AUTOCASTS:
        step = make_step(autocast)
        step()
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        med = sorted(times)[len(times) // 2]
        print(f"| {autocast} | {med:.2f} | {512 / med:.0f} |", flush=True)


if __name__ == "__main__":
    main()
