"""WikiText-2 perplexity under the protocol of our reference fixture.

Protocol (kept exactly; the dense SmolLM2-135M reference is 29.1876):
- read ``wikitext2/test.txt`` in text mode, so the file's CRLF line ends become
  ``\\n`` and the text is the usual ``"\\n\\n".join(rows)`` string;
- tokenize it whole with ``tokenizer(text, add_special_tokens=False)``;
- take the first ``windows`` windows of ``seq_len`` tokens, starting every
  ``stride`` tokens (default ``stride = seq_len``: non-overlapping);
- batch 1, no BOS, no attention mask; each window's loss is its mean
  next-token cross-entropy over its ``seq_len - 1`` predictions;
- PPL = exp(mean of the window means).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

WIKITEXT2_TEST = os.path.join("wikitext2", "test.txt")

# Positions per lm_head call: 512 positions x 49k vocab x fp32 would be 100 MB of
# logits; 128 positions keep it at 25 MB without a measurable slowdown.
_HEAD_CHUNK = 128


def read_wikitext2_test(data_dir) -> str:
    path = Path(data_dir) / WIKITEXT2_TEST
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 test file not found: {path}")
    # Text mode with the default newline=None turns the stored CRLF into LF.
    with open(path, encoding="utf-8") as f:
        return f.read()


def token_ids(tokenizer, text: str) -> list[int]:
    """Tokenize without any special token (no BOS), as the protocol says."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_windows(windows) -> None:
    """``windows``: None (every full window) or a positive integer."""
    if windows is not None and (isinstance(windows, bool) or not isinstance(windows, int) or windows < 1):
        raise ValueError(f"ppl_windows must be a positive integer (WikiText-2 windows) or None (all), got {windows!r}")


def window_starts(n_tokens: int, seq_len: int, windows: Optional[int], stride: Optional[int] = None) -> list[int]:
    """Start offsets of the full windows that fit in ``n_tokens``; a trailing
    partial window is dropped, as in the GPTQ/SparseGPT protocol."""
    stride = seq_len if stride is None else stride
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    check_windows(windows)
    available = 0 if n_tokens < seq_len else (n_tokens - seq_len) // stride + 1
    if windows is None:
        return [i * stride for i in range(available)]
    if windows > available:
        raise ValueError(
            f"asked for {windows} windows of {seq_len} tokens (stride {stride}) but the text "
            f"has {n_tokens} tokens: only {available} fit"
        )
    return [i * stride for i in range(windows)]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def mean_next_token_nll(model, ids: torch.Tensor) -> float:
    """Mean cross-entropy of predicting ids[1:] from ids[:-1] for one sequence.

    Runs the decoder for hidden states and applies the output head in chunks of
    positions, so the full (seq_len x vocab) logits never exist at once.
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    ids = ids.view(1, -1).to(_device_of(model))
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    targets = ids[0, 1:]
    total = 0.0
    for start in range(0, hidden.shape[0], _HEAD_CHUNK):
        logits = head(hidden[start:start + _HEAD_CHUNK]).float()
        total += F.cross_entropy(logits, targets[start:start + _HEAD_CHUNK], reduction="sum").item()
    return total / targets.numel()


def mean_next_token_nlls(model, ids: torch.Tensor) -> list[float]:
    """:func:`mean_next_token_nll` of each row of ``ids`` [b, T], in one forward
    pass (rows of equal length: no padding, no mask)."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    ids = ids.to(_device_of(model))
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    targets = ids[:, 1:]
    out = []
    for r in range(ids.shape[0]):
        total = 0.0
        for start in range(0, hidden.shape[1], _HEAD_CHUNK):
            logits = head(hidden[r, start:start + _HEAD_CHUNK]).float()
            total += F.cross_entropy(logits, targets[r, start:start + _HEAD_CHUNK], reduction="sum").item()
        out.append(total / targets.shape[1])
    return out


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (windows per forward pass), got {batch_size!r}")


def perplexity_of_ids(model, ids, seq_len: int = 512, windows: Optional[int] = 40,
                      stride: Optional[int] = None, progress: bool = False, batch_size: int = 1) -> dict:
    """Perplexity of a token stream; returns ``{"ppl", "windows", "tokens", "window_nll"}``.
    ``batch_size``: windows per forward pass (1, the protocol's, by default; the
    windows are of equal length, so a batch changes only floating-point rounding)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    check_batch_size(batch_size)
    starts = window_starts(ids.numel(), seq_len, windows, stride)
    if not starts:
        raise ValueError(f"text too short: {ids.numel()} tokens, fewer than one window of {seq_len}")
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if batch_size == 1:
                nll = [mean_next_token_nll(model, ids[s:s + seq_len])
                       for s in tqdm(starts, desc="wikitext2", disable=not progress, leave=False)]
            else:
                nll = []
                groups = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
                for group in tqdm(groups, desc="wikitext2", disable=not progress, leave=False):
                    nll += mean_next_token_nlls(model, torch.stack([ids[s:s + seq_len] for s in group]))
    finally:
        model.train(was_training)
    mean = sum(nll) / len(nll)
    # math.exp overflows past ~709; a destroyed model should read inf, not crash.
    ppl = math.exp(mean) if mean < 700 else math.inf
    return {"ppl": ppl, "windows": len(nll), "tokens": len(nll) * seq_len,
            "mean_nll": mean, "window_nll": nll}


def wikitext2_perplexity(model, tokenizer, data_dir, seq_len: int = 512, windows: Optional[int] = 40,
                         stride: Optional[int] = None, progress: bool = False) -> float:
    """WikiText-2 test perplexity of ``model`` (see the module docstring for the
    protocol). ``windows=None`` uses every full window of the test set."""
    return wikitext2_perplexity_details(model, tokenizer, data_dir, seq_len, windows, stride, progress)["ppl"]


def wikitext2_perplexity_details(model, tokenizer, data_dir, seq_len: int = 512, windows: Optional[int] = 40,
                                 stride: Optional[int] = None, progress: bool = False, batch_size: int = 1) -> dict:
    """Like :func:`wikitext2_perplexity` but returns the dict of
    :func:`perplexity_of_ids` (ppl, windows, tokens, per-window mean NLL)."""
    ids = token_ids(tokenizer, read_wikitext2_test(data_dir))
    return perplexity_of_ids(model, ids, seq_len=seq_len, windows=windows, stride=stride, progress=progress,
                             batch_size=batch_size)
