"""Greedy continuations of a few prompts from saved checkpoints, to see that a
compressed model still writes text (a model that generates gibberish is a
failed result, whatever its perplexity):

    python benchmarks/generate_samples.py results/models/come@0.3 results/models/shortgpt+ls@0.3 \
        [--tokens 30] [--out results/generate_samples.md]

Each checkpoint is loaded with stock ``AutoModelForCausalLM.from_pretrained``
and the tokenizer of the embedded SmolLM2 (the sweep saves no tokenizer).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import come_fast

PROMPTS = ["The capital of France is", "Water boils at a temperature of",
           "Once upon a time, a little girl named", "The three primary colors are"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="checkpoint folders; 'dense' for the original model")
    p.add_argument("--tokens", type=int, default=30)
    p.add_argument("--out", default="results/generate_samples.md")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dense, tok = come_fast.load_model("smollm2-135m")
    lines = ["# Greedy continuations", "",
             f"{args.tokens} new tokens, greedy, with the KV cache; prompts as plain text (no chat template).", ""]
    for m in args.models:
        model = dense if m == "dense" else AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()
        lines += [f"## {m} ({model.config.num_hidden_layers} layers)", ""]
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")
            with torch.inference_mode():
                g = model.generate(**ids, max_new_tokens=args.tokens, do_sample=False,
                                   pad_token_id=tok.eos_token_id)
            text = tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            lines.append(f"- **{prompt}** {' '.join(text.split())}")
            print(lines[-1], flush=True)
        lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
