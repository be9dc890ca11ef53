"""pytest-benchmark: peak memory and time of the fused (chunked) linear + KL loss against the naive one.

    pytest benchmarks/bench_fused_kl.py --benchmark-only                  # all shapes (~10+ min on 2 cores)
    pytest benchmarks/bench_fused_kl.py --benchmark-only -k "49152 and 576"
    python benchmarks/bench_fused_kl.py [--quick]                         # the same runs, a markdown table

What runs: one forward + backward of ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))`` (T = 1,
mean over tokens) for N = 4,096 tokens, vocabularies 49,152 and 128,256, d = 576 and
4,096, float32, random inputs; the teacher given as its hidden states and head (the
head is the student's own tensor, so the inputs are counted once).

* naive: ``come_fast.distill.loss_terms``' formula on materialised logits,
  ``F.kl_div(log_softmax(F.linear(h, W).float() / T), log_softmax(teacher logits / T),
  log_target=True, reduction="batchmean")``;
* fused: ``come_fast.dispatch.Ops(device).linear_kl`` (on CPU the PyTorch chunked path,
  ``come_fast.linear_kl``; Triton on CUDA).

``head``: "frozen" (only the hidden states take a gradient: the hierarchical
distillation's case) or "trains" (the head's weight too; d = 576 only, by default).

Each case runs in a fresh subprocess, so its memory is its own: peak memory is the
peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` once the
inputs exist) minus the resident size at that point, i.e. what the loss and its
backward add on top of the inputs; on CUDA ``torch.cuda.max_memory_allocated`` minus
the allocated bytes before.  Time is the wall clock of that one forward + backward
inside the worker (``extra_info``); pytest-benchmark's own statistic is the whole
subprocess (start-up and input creation included).  A case whose naive loss would
not fit in 90% of the memory available (estimated 7.2 N V x 4 bytes) is skipped, and the worker
runs under an address-space limit so it fails with an allocation error instead of
starving the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
N_TOKENS = 4096
VOCABS = [49152, 128256]
DIMS = [576, 4096]
IMPLS = ["naive", "fused"]


# --------------------------------------------------------------------------- #
# the worker (one case per process)
# --------------------------------------------------------------------------- #
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(impl: str, V: int, d: int, N: int, head: str, device: str, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from come_fast.dispatch import Ops

    torch.set_num_threads(threads)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    # in-place scaling: no temporaries that would raise the peak before it is reset
    h = torch.randn(N, d, generator=g).to(dev).requires_grad_()
    W = torch.randn(V, d, generator=g).mul_(2.0 / d ** 0.5).to(dev).requires_grad_(head == "trains")
    t_h = torch.randn(N, d, generator=g).to(dev)
    t_w = W.detach()  # the teacher's head: the same tensor (counted once)
    T = 1.0
    ops = Ops("auto", dev)

    def naive():
        logits = F.linear(h, W).float()
        with torch.no_grad():
            tgt = F.linear(t_h, t_w).float()
        return T * T * F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(tgt / T, -1), log_target=True,
                                reduction="batchmean")

    def fused():
        return ops.linear_kl(h, W, teacher_hidden=t_h, teacher_weight=t_w, temperature=T)

    fn = naive if impl == "naive" else fused
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        base = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kb("VmHWM") * 1024 - base
    return {"impl": impl, "V": V, "d": d, "N": N, "head": head, "device": device, "backend": ops.backend,
            "threads": threads, "loss": float(loss.detach()), "grad_h_norm": float(h.grad.norm()),
            "seconds": seconds, "peak_bytes": int(peak), "base_bytes": int(base)}


def run_case(impl: str, V: int, d: int, N: int = N_TOKENS, head: str = "frozen", device: str = "cpu",
             threads: int = 2, timeout: float = 3600) -> dict:
    """Run one case in a fresh interpreter; returns the worker's dict (or raises)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, str(V), str(d), str(N), head, device,
           str(threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker {impl} V={V} d={d} failed (rc={p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def naive_estimate(V: int, N: int = N_TOKENS) -> int:
    """Bytes the naive loss needs beyond its inputs: 7.04 float32 [N, V] tensors measured at its
    peak (N = 4096, V = 49,152: 5,400 MiB), with a margin."""
    return int(7.2 * N * V * 4)


def _skip_reason(impl: str, V: int, N: int, device: str):
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    need = naive_estimate(V, N) if impl == "naive" else naive_estimate(V, N) // 8
    avail = _mem_available()
    if need > 0.9 * avail:
        return f"{impl} needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
    return None


# --------------------------------------------------------------------------- #
# pytest-benchmark
# --------------------------------------------------------------------------- #
CASES = [(V, d, "frozen") for V in VOCABS for d in DIMS] + [(V, 576, "trains") for V in VOCABS]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V,d,head", CASES, ids=[f"V{V}-d{d}-{h}" for V, d, h in CASES])
def test_bench_linear_kl(benchmark, V, d, head, impl, device):
    why = _skip_reason(impl, V, N_TOKENS, device)
    if why:
        pytest.skip(why)
    res = {}

    def call():
        res.update(run_case(impl, V, d, N_TOKENS, head, device))

    benchmark.group = f"linear_kl V={V} d={d} N={N_TOKENS} head {head} {device}"
    benchmark.pedantic(call, rounds=1, iterations=1)
    benchmark.extra_info.update({k: res[k] for k in ("seconds", "peak_bytes", "base_bytes", "loss", "backend")})
    benchmark.extra_info["peak_MiB"] = round(res["peak_bytes"] / 2**20, 1)


# --------------------------------------------------------------------------- #
# script: the same cases, one markdown table
# --------------------------------------------------------------------------- #
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fused vs naive linear + KL: peak memory and time")
    ap.add_argument("--worker", nargs=7, metavar=("IMPL", "V", "D", "N", "HEAD", "DEVICE", "THREADS"))
    ap.add_argument("--quick", action="store_true", help="N = 512 and d = 576 only (a smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.worker:
        impl, V, d, N, head, device, threads = args.worker
        avail = _mem_available()
        if device == "cpu" and avail:
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            lim = int(_status_kb("VmSize") * 1024 + 2**30 + 0.9 * avail)  # fail, do not starve the machine
            resource.setrlimit(resource.RLIMIT_AS, (lim if hard == resource.RLIM_INFINITY else min(lim, hard), hard))
        print(json.dumps(worker(impl, int(V), int(d), int(N), head, device, int(threads))), flush=True)
        return 0
    N = 512 if args.quick else N_TOKENS
    cases = [(V, 576, "frozen") for V in VOCABS] if args.quick else CASES
    print(f"N = {N} tokens, {args.device}, {args.threads} threads, float32, T = 1")
    print("| V | d | head | naive peak MiB | fused peak MiB | fused / naive | naive s | fused s | loss rel diff |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for V, d, head in cases:
        r = {}
        for impl in IMPLS:
            why = _skip_reason(impl, V, N, args.device)
            r[impl] = None if why else run_case(impl, V, d, N, head, args.device, args.threads)
        mib = lambda x: f"{x['peak_bytes'] / 2**20:.0f}" if x else "skipped"  # noqa: E731
        sec = lambda x: f"{x['seconds']:.2f}" if x else "-"  # noqa: E731
        ratio = (f"{r['fused']['peak_bytes'] / r['naive']['peak_bytes']:.3f}"
                 if r["naive"] and r["fused"] else "-")
        agree = "-"
        if r["naive"] and r["fused"]:
            agree = f"{abs(r['naive']['loss'] - r['fused']['loss']) / abs(r['naive']['loss']):.1e}"
        print(f"| {V} | {d} | {head} | {mib(r['naive'])} | {mib(r['fused'])} | {ratio} | {sec(r['naive'])} | "
              f"{sec(r['fused'])} | {agree} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
