"""Command line: ``come-fast compress``, ``come-fast export``, ``come-fast eval``, ``come-fast bench quality``
and ``come-fast bench serving``. Calls the API only."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _windows(v: str):
    """--ppl-windows: a count, or 'all' (None: every full window of the test set)."""
    if v == "all":
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {v!r}") from None


def _default_data_dir() -> str:
    """``come_fast.eval.default_data_dir()``: ``$COME_FAST_DATA_DIR`` (the old
    ``$COME_FAST_DATA`` still read, with a DeprecationWarning), else ``shared/data``
    beside the repository or ``../shared/data``. The caller checks that it exists."""
    from .eval import default_data_dir

    return str(default_data_dir())


# api.DTYPES's names, spelled out so that parsing (and --help) does not import torch;
# tests/test_cli.py checks that the two agree
DTYPES = ("float32", "bfloat16", "float16")
DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda when a GPU is visible, else cpu; the default)"
SAMPLE_PROMPT = "The capital of France is"
SAMPLE_TOKENS = 20


def _device_arg(text: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N (whether it is there is checked later)."""
    t = text.strip().lower()
    if t in ("auto", "cpu", "cuda") or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"invalid device {text!r} (choose from auto, cpu, cuda, cuda:N)")


def resolve_device(spec: str) -> str:
    """--device as a torch device: auto is cuda when CUDA is available, else
    cpu; cuda (or cuda:N) where there is none is a ValueError (one line, exit 2)."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
                   else "no GPU is visible")
            raise ValueError(f"--device {spec}: CUDA is not available ({why}); use --device cpu or --device auto")
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA device(s)")
    return spec


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def sample_text(model, tokenizer, prompt: str = SAMPLE_PROMPT, new_tokens: int = SAMPLE_TOKENS) -> str:
    """The greedy continuation of ``prompt`` (at most ``new_tokens`` tokens,
    stopping at EOS), decoded without special tokens."""
    import torch
    from transformers import GenerationConfig

    enc = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    ids = enc["input_ids"].to(device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    # a fresh config: the checkpoint's own may ask for sampling (temperature, top_p)
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _calib_source(args):
    """--calib with --calib-config/--calib-split: a hub dataset spec."""
    if args.calib_config is None and args.calib_split is None:
        return args.calib
    if args.calib is None or Path(args.calib).expanduser().exists() or \
            Path(args.calib).suffix in (".safetensors", ".txt", ".jsonl", ".json"):
        raise ValueError("--calib-config and --calib-split choose a hub dataset's config and split: "
                         "give its id with --calib (e.g. --calib allenai/c4 --calib-config en "
                         "--calib-split validation)")
    return {"path": args.calib, "name": args.calib_config, "split": args.calib_split}


DISTILL_FLAGS = ("data", "tokens", "val_rows", "eval_every", "patience", "schedule", "group", "joint_steps",
                 "resume", "save_every")


def _distill_options(args) -> dict:
    """The --distill-* flags given, as compress's distill_* options."""
    out = {f"distill_{k}": getattr(args, f"distill_{k}") for k in DISTILL_FLAGS
           if getattr(args, f"distill_{k}") is not None}
    if args.distill_grad_checkpoint:
        out["distill_grad_checkpoint"] = True
    return out


def _distill_lines(res) -> list:
    """The distillation's outcome: loss before and after, tokens, the validation losses."""
    rep = next((s["distillation"] for s in res.report if isinstance(s, dict) and "distillation" in s), None)
    if rep is None:
        return []
    tk = rep["tokens"]
    budget = f" of a budget of {tk['budget']:,}" if tk["budget"] else ""
    trained = [r for r in rep["layers"] if not r.get("skipped")]
    runs = ""
    if rep["layers"]:  # layer-wise: every layer's run sees the training rows
        runs = (f"; {len(trained)} layer runs of {trained[0]['tokens_seen'] if trained else 0:,} tokens, "
                f"{len(rep['layers']) - len(trained)} layers skipped as the teacher's own, a joint pass of "
                f"{tk['seen'] - sum(r['tokens_seen'] for r in trained):,}")
    lines = [f"distillation ({rep['schedule']}): loss on the {rep['loss_on']} {rep['loss_before']:.4f} -> "
             f"{rep['loss_after']:.4f}; {tk['seen']:,} training tokens seen{budget} ({tk['train_rows']} rows x "
             f"{tk['seq_len']}, {tk['val_rows']} validation rows){runs}"
             f"{'; stopped early' if rep['stopped_early'] else ''}"]
    if rep["validation"]:
        lines.append("validation loss by tokens seen: " + ", ".join(f"{v['tokens']:,}: {v['loss']:.4f}"
                                                                  for v in rep["validation"]))
    return lines


def _compress(args) -> int:
    import torch

    from . import api, methods
    from .checkpoint import check_output_dir
    from .models import load_model

    torch.set_num_threads(args.threads or torch.get_num_threads())
    out = Path(args.out)
    # before the model loads: a refused target (the current folder, a parent, home, a root, a non-checkpoint
    # with --overwrite), an existing folder without --overwrite, a folder another process is writing
    check_output_dir(out, overwrite=args.overwrite)
    if args.method not in methods.available():
        raise ValueError(f"unknown method {args.method!r}; available: {', '.join(methods.available())}")
    options = dict(_parse_kv(t) for t in args.option or [])
    api.split_options(args.method, options)  # the method's, ls_* and distill_* options, before the model loads
    calib = _calib_source(args)
    t0 = time.perf_counter()
    offload = getattr(args, "offload", None)
    if offload:  # the layers are read from the folder a few at a time, inside compress (come_fast/offload.py)
        model, tok = args.model, None
        print(f"streaming {args.model} from disk (--offload disk): a few decoder layers in memory at a time, "
              f"in {args.dtype}")
    else:
        model, tok = load_model(args.model, dtype=_torch_dtype(args.dtype), device=args.device)
        print(f"loaded {args.model}: {model.config.num_hidden_layers} layers "
              f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.dtype} on {args.device}) "
              f"in {time.perf_counter() - t0:.1f} s")
    res = api.compress(model, offload=offload, **({"dtype": args.dtype} if offload else {}),  # loaded above otherwise
                       ratio=args.ratio, target_layers=args.target_layers, method=args.method,
                       calib=calib, text_column=args.text_column, tokenizer=tok, faithful=args.faithful, allow_repeat=args.allow_repeat,
                       n_samples=args.n_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                       backend=args.backend, rounding=args.rounding, seed=args.seed, progress=not args.quiet,
                       distill_steps=args.distill_steps,
                       compensate=None if args.compensate == "none" else args.compensate,
                       exact=args.exact, width_multiple=args.width_multiple,
                       **({} if args.distill_lr is None else {"distill_lr": args.distill_lr}),
                       **_distill_options(args), **options)
    print(res.summary())
    print(f"provenance: {json.dumps(res.provenance)}")
    for line in _distill_lines(res):
        print(line)
    argv = getattr(args, "argv", None)
    if argv is not None:  # the model card records how the checkpoint was made
        import shlex

        res.command = "come-fast " + shlex.join(argv)
    path = api.save(res, out, overwrite=args.overwrite)
    ex = res.settings.get("exact")
    if ex and len(set(ex["widths"])) > 1:
        print(f"achieved ratio {res.achieved_ratio:.6f} (target {ex['ratio']}); MLP widths {ex['widths']}")
        print(f"saved to {path} (per-layer MLP widths: load with come_fast.load, or transformers' "
              "from_pretrained(..., trust_remote_code=True); come-fast export --format decilm writes the DeciLM form)")
    else:
        print(f"saved to {path} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    tok = res.tokenizer if res.tokenizer is not None else tok
    if not (args.quiet or args.no_sample or offload) and tok is not None:
        try:  # the checkpoint is saved: a failure here only costs the sample
            text = sample_text(res.model, tok)
        except Exception as e:
            print(f"(no sample generation: {_one_line(e)})", file=sys.stderr)
        else:
            print(f"sample (greedy, up to {SAMPLE_TOKENS} tokens): {json.dumps(SAMPLE_PROMPT)} -> "
                  f"{json.dumps(text, ensure_ascii=False)}")
    return 0


def _export(args) -> int:
    from . import api

    path = api.export(args.model, format=args.format, out=args.out, overwrite=args.overwrite)
    print(f"wrote {path} ({args.format}; come_fast.load reads it back)")
    return 0


def _eval(args) -> int:
    import torch

    from . import api
    from .eval import _check_task_names, to_markdown

    if args.threads:
        torch.set_num_threads(args.threads)

    data_dir = args.data_dir or _default_data_dir()
    if data_dir is None or not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data folder {data_dir!r} not found: pass --data-dir (the folder with wikitext2/, piqa/, ...)")
    # before the model loads
    tasks = None if args.tasks is None else _check_task_names(args.tasks)
    model, tok, meta = api.load(args.model, dtype=_torch_dtype(args.dtype), device=args.device)
    res = api.evaluate(model, tasks=tasks, data_dir=data_dir, limit=args.limit, tokenizer=tok,
                       progress=not args.quiet, batch_size=args.batch_size, start=args.start,
                       harness=args.harness)
    name = args.name or str(args.model)
    print(to_markdown({name: res}))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({name: res}, indent=1))
        os.replace(tmp, out)
        out.with_suffix(".md").write_text(to_markdown({name: res}) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def _check_args(args) -> None:
    """Numbers argparse takes as given but no command can use: refused before
    anything loads, naming the flag."""
    import math

    def at_least(flag, value, lo, what):
        if value is not None and value < lo:
            raise ValueError(f"{flag} must be {what}, got {value}")

    if args.cmd == "compress":
        at_least("--n-samples", args.n_samples, 1, "a positive integer")
        at_least("--seq-len", args.seq_len, 2, "at least 2 (tokens per calibration row)")
        at_least("--batch-size", args.batch_size, 1, "a positive integer")
        at_least("--threads", args.threads, 1, "a positive integer")
        at_least("--width-multiple", args.width_multiple, 1, "a positive integer")
        at_least("--distill-tokens", args.distill_tokens, 1, "a positive integer (training tokens)")
        at_least("--distill-val-rows", args.distill_val_rows, 0, "a non-negative integer")
        for flag in ("eval_every", "patience", "group", "save_every"):
            at_least(f"--distill-{flag.replace('_', '-')}", getattr(args, f"distill_{flag}"), 1, "a positive integer")
        at_least("--distill-joint-steps", args.distill_joint_steps, 0, "a non-negative integer")
        lr = args.distill_lr
        if lr is not None and not (math.isfinite(lr) and 0 < lr <= 1):
            raise ValueError(f"--distill-lr must be a number in (0, 1] (a learning rate), got {lr}")
    elif args.cmd == "eval":
        at_least("--limit", args.limit, 1, "a positive integer (the first N examples of each task)")
        at_least("--batch-size", args.batch_size, 1, "a positive integer")
        at_least("--threads", args.threads, 1, "a positive integer")
    if args.cmd in ("compress", "eval"):
        args.device = resolve_device(args.device)  # before the model loads
    if args.cmd == "bench" and args.bench == "quality":
        at_least("--limit", args.limit, 1, "a positive integer (the first N examples of each task)")
        at_least("--start", args.start, 0, "a non-negative integer (the first example index)")
        if args.ppl_windows is not None:
            at_least("--ppl-windows", args.ppl_windows, 1, "a positive integer (WikiText-2 windows) or 'all'")
        at_least("--threads", args.threads, 1, "a positive integer")
    if args.cmd == "bench" and args.bench == "serving":
        at_least("--threads", args.threads, 1, "a positive integer")
        at_least("--runs", args.runs, 1, "a positive integer (timed runs per figure)")
        at_least("--warmup", args.warmup, 0, "a non-negative integer")
        at_least("--prefill-len", args.prefill_len, 1, "a positive integer (tokens per prefill row)")
        at_least("--prompt-len", args.prompt_len, 1, "a positive integer (prompt tokens before decoding)")
        at_least("--new-tokens", args.new_tokens, 2, "at least 2 (decode is timed from the first new token to the last)")
        args.device = resolve_device(args.device)


def _parse_value(key: str, value: str, text: str, example: str) -> tuple[str, object]:
    """The value read as JSON when it parses (numbers, true/false), else a string."""
    if not key.strip():
        raise ValueError(f"--option {text!r}: expected {example}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _parse_option(text: str) -> tuple[str, str, object]:
    """METHOD:KEY=VALUE (the sweep's per-method options)."""
    example = "METHOD:KEY=VALUE, e.g. sleb:score_rows=8"
    try:
        method, kv = text.split(":", 1)
        key, value = kv.split("=", 1)
    except ValueError:
        raise ValueError(f"--option {text!r}: expected {example}") from None
    return (method.strip(), *_parse_value(key, value, text, example))


def _parse_kv(text: str) -> tuple[str, object]:
    """KEY=VALUE (a method option of compress)."""
    example = "KEY=VALUE, e.g. score_rows=8"
    if "=" not in text:
        raise ValueError(f"--option {text!r}: expected {example}")
    return _parse_value(*text.split("=", 1), text, example)


def _ratios(text: str | None) -> list[float] | None:
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return []
    return [float(r) for r in text.split(",") if r.strip()]


def _bench_quality(args) -> int:
    import torch

    from .bench import Sweep

    torch.set_num_threads(args.threads)
    options: dict = {}
    for text in args.option or []:
        m, k, v = _parse_option(text)
        options.setdefault(m, {})[k] = v
    data_dir = args.data_dir or _default_data_dir()
    if data_dir is None or not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data folder {data_dir!r} not found: pass --data-dir (the folder with wikitext2/, piqa/, ...)")
    sweep = Sweep(model=args.model, methods=args.methods, ratios=_ratios(args.ratios), limit=args.limit,
                  tasks_at=_ratios(args.tasks_at), out=args.out, calib=args.calib, data_dir=data_dir,
                  options=options, keep_models=args.keep_models, ppl_windows=args.ppl_windows,
                  progress=not args.quiet, verbose=args.verbose, start=args.start, tasks=args.tasks)
    todo = sweep.pending()
    print(f"{len(sweep.cells())} cells, {len(todo)} pieces of work left; results in {sweep.out}/")
    sweep.run()
    print(f"wrote {sweep.out / 'quality.csv'}, {sweep.out / 'quality.md'}, {sweep.out / 'quality.png'}")
    return 0


def _batches(flag: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            values = []
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 1,8")
        return values
    return parse


def _bench_serving(args) -> int:
    from . import serving

    prefill = [(b, args.prefill_len) for b in args.prefill_batches]
    record = serving.serving(args.model, baseline=args.baseline, threads=args.threads, runs=args.runs,
                             warmup=args.warmup, prefill=prefill, decode_batches=args.decode_batches,
                             new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                             optimize=not args.no_optimize, dtype=_torch_dtype(args.dtype), device=args.device,
                             seed=args.seed, log=(lambda *a: None) if args.quiet else print)
    table = serving.to_markdown(record)
    print(table)
    if args.out:
        from .eval import write_json_atomic

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, out)
        md = out.with_suffix(".md")
        md.write_text(table + "\n")
        print(f"wrote {out} and {md}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import methods

    names = methods.available()
    p = argparse.ArgumentParser(prog="come-fast", description="Depth compression of Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="compress a model and save a Hugging Face checkpoint")
    c.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), a local folder or a hub id")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="share of all parameters to remove, in (0, 1)")
    g.add_argument("--target-layers", type=int, help="number of decoder layers to keep")
    c.add_argument("--method", default="come", metavar="METHOD",
                   help=f"compression method, one of: {', '.join(names)} (default: come)")
    c.add_argument("--faithful", action="store_true", help="reproduce the authors' release, quirks included")
    c.add_argument("--allow-repeat", action="store_true", default=None,
                   help="let a merged layer merge again (the default of CoMe's default mode)")
    c.add_argument("--no-repeat", dest="allow_repeat", action="store_false",
                   help="a merged layer is not merged again (the release's --wo-repeat; faithful mode's default)")
    c.add_argument("--device", type=_device_arg, default="auto", help=f"where the model runs: {DEVICE_HELP}")
    c.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="the weights' dtype while compressing, and the checkpoint's (default: float32)")
    c.add_argument("--calib", default=None,
                   help="calibration: .safetensors (input_ids), .txt, .jsonl, a hub dataset id; "
                        "default: sequences sampled from the model")
    c.add_argument("--calib-config", default=None, help="the hub dataset's config (name), with --calib ID")
    c.add_argument("--calib-split", default=None, help="the hub dataset's split, with --calib ID (default: train)")
    c.add_argument("--text-column", default="text",
                   help="the field (.jsonl) or column (hub dataset) holding the text (default: text)")
    c.add_argument("--n-samples", type=int, default=32, help="calibration rows (default: 32)")
    c.add_argument("--seq-len", type=int, default=256, help="tokens per calibration row (default: 256)")
    c.add_argument("--batch-size", type=int, default=2, help="calibration rows per forward pass (default: 2)")
    c.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="kernels: triton, torch, or auto (Triton on a CUDA device where it imports, else PyTorch)")
    c.add_argument("--rounding", default="nearest", choices=["nearest", "down", "up"],
                   help="how --ratio is met with whole layers")
    c.add_argument("--exact", action="store_true",
                   help="land within 0.5 points of --ratio: whole layers up to it, the rest as MLP channels of the "
                        "changed layers (per-layer widths)")
    c.add_argument("--width-multiple", type=int, default=None,
                   help="with --exact: every MLP width a multiple of this (default 64; must divide the MLP width)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default calibration, sampling methods)")
    c.add_argument("--distill-steps", type=int, default=0,
                   help="then N steps of hierarchical distillation from the original model (0: none)")
    c.add_argument("--distill-lr", type=float, default=None, help="distillation learning rate (default 1e-4)")
    c.add_argument("--distill-data", default=None,
                   help="distil on this text instead of the calibration rows: .txt, .jsonl (--text-column), "
                        ".safetensors (input_ids) or a hub dataset id; cut into rows of --seq-len")
    c.add_argument("--distill-tokens", type=int, default=None,
                   help="training-token budget: the steps it holds (or the fewer of those and --distill-steps)")
    c.add_argument("--distill-val-rows", type=int, default=None,
                   help="rows held apart for the validation loss (default 8 with --distill-data, else 0)")
    c.add_argument("--distill-eval-every", type=int, default=None,
                   help="validation loss every K steps (default: a tenth of the run)")
    c.add_argument("--distill-patience", type=int, default=None,
                   help="stop after P validation losses in a row without a new best")
    c.add_argument("--distill-schedule", default=None, choices=["joint", "layerwise"],
                   help="joint (default): all layers in one run; layerwise: each layer alone on the teacher's "
                        "states at its span, then a short joint pass")
    c.add_argument("--distill-group", type=int, default=None,
                   help="layerwise: consecutive student layers trained together (default 1)")
    c.add_argument("--distill-joint-steps", type=int, default=None,
                   help="layerwise: steps of the final joint pass (default a tenth of --distill-steps; 0: none)")
    c.add_argument("--distill-resume", default=None, metavar="DIR",
                   help="write distillation checkpoints to DIR and continue from the last one found there")
    c.add_argument("--distill-save-every", type=int, default=None,
                   help="with --distill-resume: steps between checkpoints (default 50)")
    c.add_argument("--distill-grad-checkpoint", action="store_true",
                   help="recompute each layer's inside in the backward pass: less memory, the same gradients")
    c.add_argument("--compensate", default="auto", choices=["auto", "ls", "none"],
                   help="closed-form refit of changed layers toward the original (ls); auto: the method's default")
    c.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a method option, repeatable (e.g. score_rows=8, pair_tokens=all; see the README)")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    c.add_argument("--offload", default=None, choices=["disk"],
                   help="disk: stream the decoder layers of a local safetensors --model folder a few at a time "
                        "(models larger than memory; needs --calib; float32 on the CPU)")
    c.add_argument("--out", required=True, help="output folder for the checkpoint")
    c.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    c.add_argument("--no-sample", action="store_true",
                   help=f"do not print the compressed model's greedy continuation of {SAMPLE_PROMPT!r}")
    c.add_argument("--quiet", action="store_true", help="no progress bars and no sample generation")
    c.set_defaults(fn=_compress)

    x = sub.add_parser("export", help="write a compressed checkpoint in another format (decilm)")
    x.add_argument("--model", required=True, help="a folder written by come-fast compress")
    x.add_argument("--format", default="decilm", choices=["decilm"],
                   help="decilm: the DeciLM / nemotron-nas block_configs form (per-layer MLP widths)")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    x.set_defaults(fn=_export)

    e = sub.add_parser("eval", help="WikiText-2 perplexity and zero-shot tasks")
    e.add_argument("--model", required=True, help="a checkpoint folder (or smollm2-135m, a hub id)")
    e.add_argument("--tasks", default=None, help="comma-separated; default: wikitext2 and the seven tasks")
    e.add_argument("--limit", type=int, default=None, help="first N examples per task (200 = the dev slice)")
    e.add_argument("--start", type=int, default=0,
                   help="first example index per zero-shot task (--start 200 --limit 300: the examples "
                        "docs/evaluation.md's reference numbers were measured on)")
    e.add_argument("--harness", default="auto", choices=("auto", "lm-eval", "builtin"),
                   help="who scores the zero-shot tasks: lm-eval itself (auto: when installed, the .[eval] "
                        "extra) or come_fast's built-in copy of its task definitions")
    e.add_argument("--data-dir", default=None, help="folder with wikitext2/, piqa/, ... (default: "
                                                     "$COME_FAST_DATA_DIR, else shared/data beside the repository)")
    e.add_argument("--device", type=_device_arg, default="auto", help=f"where the model runs: {DEVICE_HELP}")
    e.add_argument("--dtype", default="float32", choices=DTYPES, help="the weights' dtype (default: float32)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    e.add_argument("--batch-size", type=int, default=1,
                   help="WikiText-2 windows per forward pass (default: 1; the zero-shot tasks run up to 16 "
                        "requests per pass, a question's choices on their shared context)")
    e.add_argument("--name", default=None, help="the model's name in the table and JSON (default: --model)")
    e.add_argument("--out", default=None, help="write JSON (and a .md table beside it)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(fn=_eval)

    b = sub.add_parser("bench", help="benchmarks across methods")
    bsub = b.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser("quality", help="every method x ratio: WikiText-2 perplexity and zero-shot tasks (resumable)")
    q.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), a local folder or a hub id")
    q.add_argument("--methods", default="all",
                   help=f"comma-separated, or 'all' (come, come-faithful and every baseline); methods: "
                        f"{', '.join(names)}")
    q.add_argument("--ratios", default="0.1,0.2,0.3", help="shares of all parameters to remove")
    q.add_argument("--limit", type=int, default=200, help="first N examples per zero-shot task")
    q.add_argument("--tasks-at", default=None, help="ratios at which the 7 tasks run (default: all; 'none': perplexity only)")
    q.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks to run (default: the seven)")
    q.add_argument("--start", type=int, default=0,
                   help="first example index per task (--start 200: examples outside the dev slice, to report on)")
    q.add_argument("--out", default="results", help="results folder (default: results)")
    q.add_argument("--calib", default=None, help="calibration, as for compress (the same for every method)")
    q.add_argument("--data-dir", default=None, help="folder with wikitext2/, piqa/, ... (default: "
                                                     "$COME_FAST_DATA_DIR, else shared/data beside the repository)")
    q.add_argument("--option", action="append", metavar="METHOD:KEY=VALUE",
                   help="extra compress option for one method, e.g. sleb:score_rows=32 (repeatable)")
    q.add_argument("--ppl-windows", type=_windows, default=40,
                   help="WikiText-2 windows of 512 tokens (default: 40; 'all': the whole test set)")
    q.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared CPU one thread is several times faster than two)")
    q.add_argument("--keep-models", action="store_true", help="keep the compressed checkpoints under OUT/models/")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.add_argument("--verbose", action="store_true", help="inner progress bars (compression, evaluation)")
    q.set_defaults(fn=_bench_quality)

    from . import serving as sv

    sv_help = ("prefill and decode tokens/s of each model (and of the baseline), with and without "
               "come_fast.optimize_for_inference; each figure the median of --runs runs")
    s = bsub.add_parser("serving", help=sv_help, description=sv_help)
    s.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="a checkpoint folder (come_fast.save output) or smollm2-135m; repeatable")
    s.add_argument("--baseline", default=None, metavar="DIR",
                   help="the dense model: measured speed-ups over it are printed beside the ideal ones")
    s.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, fixed for every run (default: torch's, recorded in the JSON)")
    s.add_argument("--runs", type=int, default=sv.RUNS, help=f"timed runs per figure, the median is reported "
                                                             f"(default: {sv.RUNS})")
    s.add_argument("--warmup", type=int, default=sv.WARMUP, help=f"untimed runs first (default: {sv.WARMUP})")
    s.add_argument("--prefill-batches", type=_batches("--prefill-batches"),
                   default=[b for b, _ in sv.PREFILL], help="prefill batch sizes (default: 1,8)")
    s.add_argument("--prefill-len", type=int, default=sv.PREFILL[0][1],
                   help=f"tokens per prefill row (default: {sv.PREFILL[0][1]})")
    s.add_argument("--decode-batches", type=_batches("--decode-batches"), default=list(sv.DECODE_BATCHES),
                   help="decode batch sizes (default: 1,16)")
    s.add_argument("--new-tokens", type=int, default=sv.NEW_TOKENS,
                   help=f"tokens each decode run generates, exactly (default: {sv.NEW_TOKENS})")
    s.add_argument("--prompt-len", type=int, default=sv.PROMPT_LEN,
                   help=f"prompt tokens before decoding (default: {sv.PROMPT_LEN})")
    s.add_argument("--no-optimize", action="store_true", help="time the plain models only")
    s.add_argument("--device", type=_device_arg, default="cpu", help="where the models run: cpu (the default), cuda, cuda:N, or auto")
    s.add_argument("--dtype", default="float32", choices=DTYPES, help="the weights' dtype (default: float32)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default: 0)")
    s.add_argument("--out", default=None, help="write JSON (and a .md table beside it)")
    s.add_argument("--quiet", action="store_true", help="only the table")
    s.set_defaults(fn=_bench_serving)
    return p


def main(argv=None) -> int:
    import warnings

    from .logs import CliHandler

    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # the long steps logged to stderr (INFO; --quiet: warnings only; a bench sweep's many compressions only with
    # --verbose), and come_fast's own deprecations shown
    quiet = getattr(args, "quiet", False) or (args.cmd == "bench" and not getattr(args, "verbose", False))
    logging_on = CliHandler(quiet=quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("default", category=DeprecationWarning, module=r"come_fast(\.|$)")
            return _run(args)
    finally:
        logging_on.close()


def _run(args) -> int:
    try:
        _check_args(args)
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, OSError, RuntimeError, FloatingPointError) as e:
        # FloatingPointError: a training that diverged (distillation, Streamline, Reverse's recovery)
        if os.environ.get("COME_FAST_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if os.environ.get("COME_FAST_DEBUG") or not _is_safetensors_error(e):
            raise
        # safetensors' own error type (not an OSError): a full disk while saving, a file it cannot parse
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _is_safetensors_error(e: BaseException) -> bool:
    return type(e).__name__ == "SafetensorError" and type(e).__module__.startswith("safetensors")


def _one_line(e: BaseException) -> str:
    text = str(e).replace("\n", " ").strip() or e.__class__.__name__
    if _is_safetensors_error(e) and ("os error 28" in text or "No space left" in text):
        text = f"no space left on the device while writing safetensors ({text})"
    return text


if __name__ == "__main__":
    sys.exit(main())
