"""Scale benchmark (issue 11, item 3): wall time and peak RSS of compress in
memory and with offload="disk", on random-weight Llama checkpoints of growing
size (bfloat16 on disk, sharded), each run in a fresh process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py --sizes 0.1 --method shortgpt
    # on an idle machine (a 3B model is ~6 GB in bf16 on disk, 12 GB in float32 in memory):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_scale.py --sizes 0.5,1,3 --modes disk,memory \
        --dtype bfloat16 --method shortgpt --n-samples 8 --seq-len 128 --out benchmarks/scale_bf16.json

Peak RSS is the child's ru_maxrss. ``--dtype``: the dtype the model is
compressed in (``compress(..., dtype=)``; float32 by default, twice the bf16
checkpoint's size). In memory the RSS grows with the whole model; the disk
mode's should stay near the embeddings and head plus a few decoder layers
(``offload.capacity_for``) plus the cached boundaries. Results are printed and
written as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# approximate size in billions -> Llama shape (vocab 32000, untied head)
SHAPES = {
    "0.1": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
                num_key_value_heads=4),
    "0.5": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, num_attention_heads=16,
                num_key_value_heads=4),
    "1": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
              num_key_value_heads=8),
    "3": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
              num_key_value_heads=8),
}


def build(size: str, root: Path) -> Path:
    """A random bf16 Llama of ``size`` saved in 1 GB shards (kept for later runs)."""
    folder = root / f"llama-random-{size}b"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False, **SHAPES[size])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="1GB")
    tmp.rename(folder)
    return folder


CHILD = r"""
import json, sys, time, resource, torch
from come_fast import api, offload
folder, out, mode, method, n, T, dtype = sys.argv[1:8]
torch.manual_seed(0)
calib = torch.randint(0, 32000, (int(n), int(T)))
t0 = time.perf_counter()
res = api.compress(folder, ratio=0.3, method=method, calib=calib, batch_size=2, dtype=dtype,
                   offload="disk" if mode == "disk" else None)
t1 = time.perf_counter()
api.save(res, out, overwrite=True)
t2 = time.perf_counter()
st = offload.store_of(res.model)
print(json.dumps({"compress_s": t1 - t0, "save_s": t2 - t1, "params_before": res.params_before,
                  "achieved_ratio": res.achieved_ratio, "provenance": res.provenance,
                  "peak_layer_bytes": st.peak_bytes if st else None, "fixed_bytes": st.fixed_bytes if st else None,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run(folder: Path, out: Path, mode: str, method: str, n: int, T: int, dtype: str) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out), mode, method, str(n), str(T), dtype],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                           "OMP_NUM_THREADS", "1")})
    if p.returncode:
        raise RuntimeError(f"{mode} run failed:\n{p.stderr[-3000:]}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    rec.update(mode=mode, wall_s=time.perf_counter() - t0, peak_rss_mb=rec.pop("maxrss_kb") / 1024)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1", help=f"comma-separated, of {', '.join(SHAPES)} (billions)")
    ap.add_argument("--modes", default="memory,disk")
    ap.add_argument("--method", default="shortgpt")
    ap.add_argument("--dtype", default="float32", help="the dtype the model is compressed in (float32, bfloat16)")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--root", default=os.path.expanduser("~/.cache/come_fast/bench_scale"))
    ap.add_argument("--out", default=None, help="JSON file for the records")
    args = ap.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for size in args.sizes.split(","):
        folder = build(size, root)
        for mode in args.modes.split(","):
            rec = run(folder, root / f"out-{size}b-{mode}", mode, args.method, args.n_samples, args.seq_len, args.dtype)
            rec.update(size=size, method=args.method, calibration=[args.n_samples, args.seq_len], dtype=args.dtype)
            records.append(rec)
            print(f"{size}B {mode:6s} {args.dtype} {args.method}: {rec['params_before'] / 1e6:.0f}M params, compress "
                  f"{rec['compress_s']:.1f} s, save {rec['save_s']:.1f} s, wall {rec['wall_s']:.1f} s, peak RSS "
                  f"{rec['peak_rss_mb']:.0f} MB" + (f", peak layers {rec['peak_layer_bytes'] / 2**20:.0f} MiB "
                                                    f"+ fixed {rec['fixed_bytes'] / 2**20:.0f} MiB"
                                                    if rec["peak_layer_bytes"] else ""), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
