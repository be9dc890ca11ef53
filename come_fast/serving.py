"""``come-fast bench serving``: prefill and decode speed of causal LMs.

For each model (a checkpoint folder written by ``come_fast.save``, any
supported Hugging Face folder, or ``smollm2-135m``), with and without
``come_fast.optimize_for_inference``:

* **prefill** tokens/s at batch x length (default 1 x 512 and 8 x 512): one
  forward pass over random token ids with ``use_cache=True`` and
  ``logits_to_keep=1``, as ``generate`` runs its prefill (the KV cache is
  built, the output head is applied at the last position only);
* **decode** tokens/s at batch 1 and 16 (default 128 new tokens after a
  32-token prompt): ``generate`` with the KV cache, greedy,
  ``min_new_tokens = max_new_tokens`` so every run decodes exactly the asked
  number of tokens (checked on the output). A streamer stamps the time of
  every step, so the decode figure is ``batch x (new_tokens - 1)`` tokens over
  the time from the first generated token to the last (the first token comes
  out of the prefill); the end-to-end ``generate`` time and the time to the
  first token are recorded too.

Each figure is the median of ``runs`` timed runs after ``warmup`` untimed
ones, at a fixed torch thread count. The variants of one model alternate run
by run (plain, optimized, plain, ...), so drift on a shared machine hits both
alike. Token ids are random (seeded): speed does not depend on them, and no
tokenizer is needed.

With a baseline (the dense model), each model's measured speed-up over it in
the same variant is reported beside the ideal one: the ratio of the weights a
token's forward pass multiplies with, baseline over model: the non-embedding
parameters (decoder layers and final norm) for prefill (the output head runs
at one position per sequence), the non-embedding parameters plus the output
head for decode (one head product per generated token). The attention over
the cache, which grows with the context, is left out of the ideal.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PREFILL = ((1, 512), (8, 512))  # (batch, tokens)
DECODE_BATCHES = (1, 16)
NEW_TOKENS = 128
PROMPT_LEN = 32
RUNS = 5
WARMUP = 1
PLAIN, OPTIMIZED = "plain", "optimized"


@dataclass(frozen=True)
class Workload:
    kind: str  # "prefill" or "decode"
    batch: int
    prompt_len: int  # prefill: the tokens of the pass; decode: the prompt before decoding
    new_tokens: int = 0  # decode only

    @property
    def name(self) -> str:
        if self.kind == "prefill":
            return f"prefill {self.batch}x{self.prompt_len}"
        return f"decode b{self.batch} x{self.new_tokens}"


def workloads(prefill=PREFILL, decode_batches=DECODE_BATCHES, new_tokens=NEW_TOKENS,
              prompt_len=PROMPT_LEN) -> list[Workload]:
    """The workloads of one model: prefill (batch, length) pairs, then decode batches."""
    out = [Workload("prefill", int(b), int(n)) for b, n in prefill]
    out += [Workload("decode", int(b), int(prompt_len), int(new_tokens)) for b in decode_batches]
    for w in out:
        if w.batch < 1 or w.prompt_len < 1:
            raise ValueError(f"{w.name}: batch and length must be positive integers")
        if w.kind == "decode" and w.new_tokens < 2:
            raise ValueError(f"{w.name}: new tokens must be at least 2 (the decode speed is timed from the first "
                             "generated token to the last)")
    names = [w.name for w in out]
    if len(set(names)) != len(names):
        raise ValueError(f"a workload is listed twice: {', '.join(names)}")
    return out


def random_ids(vocab_size: int, batch: int, length: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def prefill_once(model, ids: torch.Tensor) -> float:
    """Seconds of one prefill pass (KV cache built, head at the last position)."""
    dev = ids.device
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        _sync(dev)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        _sync(dev)
        t = time.perf_counter() - t0
    if tuple(out.logits.shape[:2]) != (ids.shape[0], 1):
        raise RuntimeError(f"prefill returned logits of shape {tuple(out.logits.shape)}")
    return t


class _StepClock:
    """A ``generate`` streamer that stamps each step: the prompt, then one put per generated token."""

    def __init__(self, batch: int):
        self.batch = batch
        self.prompt_at = None
        self.steps: list[float] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.prompt_at is None:
            self.prompt_at = now
            return
        if value.reshape(-1).shape[0] != self.batch:
            raise RuntimeError(f"generate streamed {value.numel()} tokens in one step, expected {self.batch}")
        self.steps.append(now)

    def end(self) -> None:
        self.ended = True


def _eos_pad(model):
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    first = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    pad = getattr(gc, "pad_token_id", None)
    if pad is None:
        pad = first if first is not None else 0
    return eos, pad


def decode_once(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """One greedy ``generate`` of exactly ``new_tokens`` tokens per row, KV cache on.

    Returns seconds (decode: first to last generated token; total; to the
    first token) and the counts seen: ``generated`` (new columns in the
    output), ``steps`` (tokens streamed per row)."""
    from transformers import GenerationConfig

    eos, pad = _eos_pad(model)
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           use_cache=True, eos_token_id=eos, pad_token_id=pad)
    clock = _StepClock(ids.shape[0])
    dev = ids.device
    with torch.inference_mode():
        _sync(dev)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                             streamer=clock)
        _sync(dev)
        t1 = time.perf_counter()
    generated = out.shape[1] - ids.shape[1]
    if generated != new_tokens or len(clock.steps) != new_tokens or out.shape[0] != ids.shape[0]:
        raise RuntimeError(f"generate produced {generated} new tokens in {len(clock.steps)} steps for "
                           f"{out.shape[0]} rows; asked {new_tokens} for {ids.shape[0]}")
    return {"decode_s": clock.steps[-1] - clock.steps[0], "total_s": t1 - t0, "ttft_s": clock.steps[0] - t0,
            "generated": int(generated), "steps": len(clock.steps)}


def parameter_counts(model) -> dict:
    """Total, embedding, output-head and non-embedding parameter counts (tied weights counted once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    total = sum(seen.values())
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    n_emb = sum(seen[i] for i in emb_ids)
    n_head = sum(seen[i] for i in head_ids)  # multiplied once per generated token even when tied
    n_nonemb = total - sum(seen[i] for i in emb_ids | head_ids)
    return {"total": total, "embedding": n_emb, "lm_head": n_head, "non_embedding": n_nonemb,
            "tied": bool(head_ids) and head_ids <= emb_ids}


def ideal_weights(counts: dict, kind: str) -> int:
    """Weights one token's forward multiplies with (see the module docstring)."""
    return counts["non_embedding"] + (counts["lm_head"] if kind == "decode" else 0)


def set_variant(model, variant: str) -> None:
    """``"optimized"``: ``optimize_for_inference`` (quietly); ``"plain"``: the stock MLP forwards."""
    from . import runtime

    if variant == OPTIMIZED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # said once, in measure_model
            runtime.optimize_for_inference(model)
    else:
        runtime.restore_mlp(model)


def _fused_count(model) -> int:
    return sum(1 for m in model.modules() if m.__dict__.get("_come_fast_fused_mlp", False))


def _run(model, w: Workload, ids: torch.Tensor) -> dict:
    if w.kind == "prefill":
        return {"seconds": prefill_once(model, ids)}
    r = decode_once(model, ids, w.new_tokens)
    return {"seconds": r["decode_s"], "total_s": r["total_s"], "ttft_s": r["ttft_s"],
            "generated": r["generated"], "steps": r["steps"]}


def _summarise(w: Workload, runs: list[dict]) -> dict:
    med = statistics.median(r["seconds"] for r in runs)
    rec = {"kind": w.kind, "batch": w.batch, "prompt_len": w.prompt_len, "runs": len(runs),
           "seconds": [r["seconds"] for r in runs], "median_s": med}
    if w.kind == "prefill":
        rec["tokens"] = w.batch * w.prompt_len
    else:
        rec["new_tokens"] = w.new_tokens
        rec["generated_per_run"] = [r["generated"] for r in runs]  # new tokens per row, as generate returned them
        rec["steps_per_run"] = [r["steps"] for r in runs]
        rec["tokens"] = w.batch * (w.new_tokens - 1)  # timed: first generated token to the last
        rec["total_s"] = [r["total_s"] for r in runs]
        rec["ttft_s"] = [r["ttft_s"] for r in runs]
        med_total = statistics.median(rec["total_s"])
        rec["median_total_s"] = med_total
        rec["e2e_tok_s"] = w.batch * w.new_tokens / med_total if med_total > 0 else None
    rec["tok_s"] = rec["tokens"] / med if med > 0 else None
    return rec


def measure_model(model, work: list[Workload], runs: int = RUNS, warmup: int = WARMUP, optimize: bool = True,
                  seed: int = 0, progress=None) -> dict:
    """Time ``work`` on one model; the variants alternate run by run.

    Returns ``{"variants": {"plain": {workload: record}, "optimized": {...} or None},
    "fused_mlps": n, "optimize_skipped": reason or None}``; the model is left
    in its plain state."""
    from . import runtime

    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be at least 1 and warmup at least 0, got {runs} and {warmup}")
    variants = [PLAIN]
    skipped = None
    fused = 0
    if optimize:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            runtime.optimize_for_inference(model)
        fused = _fused_count(model)
        runtime.restore_mlp(model)
        if fused:
            variants.append(OPTIMIZED)
            for c in caught:  # e.g. some devices without a kernel
                warnings.warn(str(c.message), RuntimeWarning, stacklevel=2)
        else:
            skipped = "; ".join(str(c.message) for c in caught) or "no MLP was routed through the extension op"
            warnings.warn(f"{skipped} (timing the plain model only)", RuntimeWarning, stacklevel=2)
    dev = _device(model)
    vocab = model.config.vocab_size
    result = {v: {} for v in variants}
    try:
        for i, w in enumerate(work):
            ids = random_ids(vocab, w.batch, w.prompt_len, seed=seed + i, device=dev)
            for v in variants:
                set_variant(model, v)
                for _ in range(warmup):
                    _run(model, w, ids)
            done = {v: [] for v in variants}
            for r in range(runs):
                for v in variants:
                    set_variant(model, v)
                    done[v].append(_run(model, w, ids))
                    if progress is not None:
                        progress(w, v, r, done[v][-1])
            for v in variants:
                result[v][w.name] = _summarise(w, done[v])
    finally:
        runtime.restore_mlp(model)
    return {"variants": {PLAIN: result[PLAIN], OPTIMIZED: result.get(OPTIMIZED)}, "fused_mlps": fused,
            "optimize_skipped": skipped}


def _speedups(rec: dict, base: dict, work: list[Workload]) -> dict:
    out = {}
    for v in (PLAIN, OPTIMIZED):
        mv, bv = rec["variants"].get(v), base["variants"].get(v)
        bplain = base["variants"][PLAIN]
        if mv is None:
            out[v] = None
            continue
        row = {}
        for w in work:
            m = mv[w.name]["tok_s"]
            b = bv[w.name]["tok_s"] if bv is not None else None
            bp = bplain[w.name]["tok_s"]
            ideal = ideal_weights(base["params"], w.kind) / max(ideal_weights(rec["params"], w.kind), 1)
            row[w.name] = {"measured": m / b if m and b else None, "ideal": ideal,
                           "vs_baseline_plain": m / bp if m and bp else None}
        out[v] = row
    return out


def _describe(model, meta) -> dict:
    cfg = model.config
    widths = sorted({m.gate_proj.out_features for m in model.modules()
                     if isinstance(getattr(m, "gate_proj", None), torch.nn.Linear)})
    d = {"layers": getattr(cfg, "num_hidden_layers", None), "mlp_widths": widths,
         "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    if meta:
        d["method"] = meta.get("method")
        d["achieved_ratio"] = meta.get("achieved_ratio")
    return d


def _label(spec: str, taken: set) -> str:
    p = Path(str(spec))
    base = p.name if p.name and os.path.isdir(str(spec)) else str(spec)
    label, k = base, 2
    while label in taken:
        label, k = f"{base}#{k}", k + 1
    return label


def serving(models, baseline=None, *, threads: int | None = None, runs: int = RUNS, warmup: int = WARMUP,
            prefill=PREFILL, decode_batches=DECODE_BATCHES, new_tokens: int = NEW_TOKENS, prompt_len: int = PROMPT_LEN,
            optimize: bool = True, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
            log=print) -> dict:
    """Measure every model in ``models`` (and ``baseline`` first, when given):
    folders or ``smollm2-135m``, loaded one at a time with ``come_fast.load``.
    Sets torch's thread count for the process when ``threads`` is given.
    Returns the JSON-ready record (see the module docstring)."""
    from . import api, runtime

    work = workloads(prefill, decode_batches, new_tokens, prompt_len)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads}")
        torch.set_num_threads(threads)
    specs = ([("baseline", baseline)] if baseline is not None else []) + [("model", m) for m in models]
    if not models:
        raise ValueError("give at least one model")
    import transformers

    record = {
        "settings": {"threads": torch.get_num_threads(), "runs": runs, "warmup": warmup, "seed": seed,
                     "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                     "workloads": [asdict(w) | {"name": w.name} for w in work],
                     "extension": {"available": runtime.EXTENSION_AVAILABLE, "error": runtime.EXTENSION_ERROR,
                                   "devices": runtime.extension_devices()},
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "baseline": None, "models": {},
    }
    taken: set = set()
    for role, spec in specs:
        label = _label(spec, taken)
        taken.add(label)
        model, _tok, meta = api.load(spec, dtype=dtype, device=device)
        model.eval()
        log(f"{label}: {model.config.num_hidden_layers} layers, timing {len(work)} workloads x "
            f"{runs} runs ({torch.get_num_threads()} threads)")
        t0 = time.perf_counter()
        rec = {"path": str(spec), "role": role, **_describe(model, meta), "params": parameter_counts(model)}
        rec.update(measure_model(model, work, runs=runs, warmup=warmup, optimize=optimize, seed=seed))
        rec["seconds"] = time.perf_counter() - t0
        record["models"][label] = rec
        if role == "baseline":
            record["baseline"] = label
        del model
    if record["baseline"] is not None:
        base = record["models"][record["baseline"]]
        for label, rec in record["models"].items():
            if label != record["baseline"]:
                rec["speedup"] = _speedups(rec, base, work)
    return record


def _fmt(x, spec=",.0f") -> str:
    return "-" if x is None else format(x, spec)


def to_markdown(record: dict) -> str:
    """The tokens/s table (one row per model and variant) and, with a
    baseline, the measured over ideal speed-up table."""
    names = [w["name"] for w in record["settings"]["workloads"]]
    s = record["settings"]
    lines = [f"tokens/s, median of {s['runs']} runs, {s['threads']} threads, {s['dtype']} on {s['device']} "
             "(decode: steps after the first token)", "",
             "| model | variant | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for label, rec in record["models"].items():
        for v in (PLAIN, OPTIMIZED):
            row = rec["variants"].get(v)
            if row is None:
                continue
            lines.append(f"| {label} | {v} | " + " | ".join(_fmt(row[n]["tok_s"]) for n in names) + " |")
    if record["baseline"] is not None:
        lines += ["", f"speed-up over {record['baseline']} in the same variant: measured (ideal)", "",
                  "| model | variant | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
        for label, rec in record["models"].items():
            for v, row in (rec.get("speedup") or {}).items():
                if row is None:
                    continue
                cells = [f"{_fmt(row[n]['measured'], '.2f')}x ({row[n]['ideal']:.2f}x)" for n in names]
                lines.append(f"| {label} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
