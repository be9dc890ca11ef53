"""The seven zero-shot multiple-choice tasks, read from local files and scored
the way lm-evaluation-harness 0.4.13 scores them.

What lm-eval does, and we reproduce (written from its task YAMLs and its HF
model wrapper, not copied):

- every choice becomes one loglikelihood request ``(context, " " + choice)``
  (``target_delimiter`` is a single space); WinoGrande is the exception
  ("partial scoring"): the choices are the *contexts* (sentence prefix up to the
  blank + option) and the continuation is ``" " + rest of the sentence``;
- trailing whitespace of a context moves onto its continuation; then
  ``whole = tok(context + continuation)``, ``ctx = tok(context)``,
  ``cont = whole[len(ctx):]``, no special tokens;
- the model input is ``(ctx + cont)[-(max_length + 1):][:-1]`` (left
  truncation), the score is the summed log-probability of ``cont``;
- ``acc`` = argmax of the scores, ``acc_norm`` = argmax of score divided by the
  choice's length in *characters* (``len(choice)``, the doc_to_choice string
  without the delimiter); ties go to the first choice (numpy argmax);
- the standard error is the sample standard deviation / sqrt(n).

Speed (CPU): the token prefix shared by all choices of a question is run once
and its KV cache reused for the choices, which run as one right-padded batch;
the output head is applied only at the scored positions.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Examples and task table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question as loglikelihood requests.

    ``requests[i]`` is the ``(context, continuation)`` pair for choice ``i``
    (continuation already carries the leading space); ``choices[i]`` is the
    doc_to_choice string whose character length normalises ``acc_norm``.
    """

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class TaskSpec:
    name: str
    files: tuple[str, ...]  # relative to data_dir; all must exist
    load: Callable[[Path], list]  # data_dir -> raw docs, in file order
    to_example: Callable[[object], MCExample]
    metrics: tuple[str, ...]  # what lm-eval reports for the task
    headline: str  # the metric evaluation.md uses for this task
    chance: float  # headline metric of a guesser (evaluation.md's numbers)


TARGET_DELIMITER = " "


def _multiple_choice(context: str, choices: Sequence[str], gold: int) -> MCExample:
    """Shared context, one continuation per choice (lm-eval's default)."""
    choices = tuple(choices)
    return MCExample(tuple((context, TARGET_DELIMITER + c) for c in choices), choices, int(gold))


# --- file readers -----------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


# --- PIQA -------------------------------------------------------------------


def _load_piqa(data_dir: Path) -> list[dict]:
    docs = _read_jsonl(data_dir / "piqa" / "validation.jsonl")
    labels = [line for line in _read_lines(data_dir / "piqa" / "validation-labels.lst") if line.strip()]
    if len(labels) != len(docs):
        raise ValueError(f"piqa: {len(docs)} questions but {len(labels)} labels")
    return [dict(doc, label=int(lab)) for doc, lab in zip(docs, labels)]


def format_piqa(doc: dict) -> MCExample:
    return _multiple_choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


# --- HellaSwag --------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow bracket artifacts out, " [title]"
    becomes a sentence break, double spaces collapse."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _load_hellaswag(data_dir: Path) -> list[dict]:
    # llama.cpp layout, 6 lines per question: "label: ctx", gold, 4 endings. The
    # ctx is ctx_a + " " + ctx_b without lm-eval's ctx_b.capitalize(), which the
    # file cannot undo (see SOURCES.md): a known, small difference.
    lines = _read_lines(data_dir / "hellaswag" / "validation.txt")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag: {len(lines)} lines is not a multiple of 6")
    return [{"query": lines[i], "label": int(lines[i + 1]), "endings": lines[i + 2:i + 6]}
            for i in range(0, len(lines), 6)]


def format_hellaswag(doc: dict) -> MCExample:
    return _multiple_choice(hellaswag_preprocess(doc["query"]),
                            [hellaswag_preprocess(e) for e in doc["endings"]], doc["label"])


# --- WinoGrande -------------------------------------------------------------


def _load_winogrande(data_dir: Path) -> list[dict]:
    return _read_jsonl(data_dir / "winogrande" / "validation.jsonl")


def format_winogrande(doc: dict) -> MCExample:
    # Partial scoring: contexts = sentence[:blank] + option (the file's
    # context_options), scored continuation = " " + sentence[blank+1:].strip().
    contexts = tuple(doc["context_options"])
    continuation = TARGET_DELIMITER + doc["continuation"].strip()
    return MCExample(tuple((c, continuation) for c in contexts), contexts, int(doc["gold"]))


# --- ARC --------------------------------------------------------------------


def _arc_loader(subdir: str) -> Callable[[Path], list[dict]]:
    return lambda data_dir: _read_jsonl(data_dir / subdir / "test.jsonl")


def format_arc(doc: dict) -> MCExample:
    q = doc["question"]
    labels = [c["label"] for c in q["choices"]]
    return _multiple_choice(f"Question: {q['stem']}\nAnswer:", [c["text"] for c in q["choices"]],
                            labels.index(doc["answerKey"]))


# --- BoolQ ------------------------------------------------------------------


def _load_boolq(data_dir: Path) -> list[dict]:
    return _read_jsonl(data_dir / "boolq" / "validation.jsonl")


def _boolq_label(label) -> int:
    # The SuperGLUE jsonl stores "true"/"false"; HF's copy stores 1/0.
    if isinstance(label, str):
        if label.lower() not in ("true", "false"):
            raise ValueError(f"boolq: unexpected label {label!r}")
        return int(label.lower() == "true")
    return int(bool(label))


def format_boolq(doc: dict) -> MCExample:
    return _multiple_choice(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"],
                            _boolq_label(doc["label"]))


# --- OpenBookQA -------------------------------------------------------------


def _split_obqa_choices(text: str) -> list[str]:
    """"(A) x (B) y (C) z (D) w" -> [x, y, z, w]. Markers are searched in order,
    so a choice may itself contain brackets."""
    positions, start = [], 0
    for letter in "ABCD":
        marker = f"({letter})"
        at = text.find(marker, start)
        if at < 0:
            raise ValueError(f"openbookqa: no {marker} in choices {text!r}")
        positions.append((at, at + len(marker)))
        start = at + len(marker)
    ends = [p[0] for p in positions[1:]] + [len(text)]
    return [text[p[1]:end].strip() for p, end in zip(positions, ends)]


def _load_openbookqa(data_dir: Path) -> list[dict]:
    # The original TSV (not csv: question stems contain unbalanced quotes).
    lines = _read_lines(data_dir / "openbookqa" / "test.tsv")
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:] if line.strip()]
    col = {name: header.index(name) for name in ("Question Stem", "Choices", "Answer Key")}
    return [{"question_stem": r[col["Question Stem"]],
             "choices": _split_obqa_choices(r[col["Choices"]]),
             "answerKey": r[col["Answer Key"]]} for r in rows]


def format_openbookqa(doc: dict) -> MCExample:
    return _multiple_choice(doc["question_stem"], doc["choices"], "ABCD".index(doc["answerKey"].strip()))


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("piqa", ("piqa/validation.jsonl", "piqa/validation-labels.lst"), _load_piqa, format_piqa,
                 ("acc", "acc_norm"), "acc_norm", 0.50),
        TaskSpec("hellaswag", ("hellaswag/validation.txt",), _load_hellaswag, format_hellaswag,
                 ("acc", "acc_norm"), "acc_norm", 0.25),
        TaskSpec("winogrande", ("winogrande/validation.jsonl",), _load_winogrande, format_winogrande,
                 ("acc",), "acc", 0.50),
        TaskSpec("arc_easy", ("arc_easy/test.jsonl",), _arc_loader("arc_easy"), format_arc,
                 ("acc", "acc_norm"), "acc_norm", 0.25),
        TaskSpec("arc_challenge", ("arc_challenge/test.jsonl",), _arc_loader("arc_challenge"), format_arc,
                 ("acc", "acc_norm"), "acc_norm", 0.25),
        TaskSpec("boolq", ("boolq/validation.jsonl",), _load_boolq, format_boolq, ("acc",), "acc", 0.50),
        TaskSpec("openbookqa", ("openbookqa/test.tsv",), _load_openbookqa, format_openbookqa,
                 ("acc", "acc_norm"), "acc_norm", 0.25),
    )
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def check_files(name: str, data_dir) -> None:
    """Raise FileNotFoundError naming the first missing data file of a task."""
    for rel in get_task(name).files:
        path = Path(data_dir) / rel
        if not path.is_file():
            raise FileNotFoundError(f"data file for task {name!r} not found: {path}")


def check_limit(limit) -> None:
    """``limit``: None (every example) or a positive integer; 0, a negative
    number (which slicing would read as "all but the last N") or a float is refused."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer (the first N examples of each task) or None, got {limit!r}")


def load_examples(name: str, data_dir, limit: Optional[int] = None) -> list[MCExample]:
    """The task's examples in file order; ``limit=N`` keeps the first N."""
    spec = get_task(name)
    check_limit(limit)
    check_files(name, data_dir)
    docs = spec.load(Path(data_dir))
    if limit is not None:
        docs = docs[:limit]
    return [spec.to_example(d) for d in docs]


# ---------------------------------------------------------------------------
# Tokenization (lm-eval's HFLM rules)
# ---------------------------------------------------------------------------

_HUGE_MODEL_MAX_LENGTH = 10 ** 20  # tokenizers without a limit report ~1e30


def model_max_length(model, tokenizer=None) -> int:
    """The context length lm-eval's HFLM would use: the model config's
    n_positions / max_position_embeddings / n_ctx, else the tokenizer's
    model_max_length, else 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < _HUGE_MODEL_MAX_LENGTH:
        return int(limit)
    return 2048


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) request, split as lm-eval splits them."""
    if not context:
        # lm-eval then conditions on a BOS/EOS token whose choice varies by
        # version; none of our tasks has an empty context.
        raise ValueError("empty context is not supported")
    # Trailing whitespace belongs to the continuation: "Answer: " + "yes" is
    # scored like "Answer:" + " yes", the way BPE vocabularies attach spaces.
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


# ---------------------------------------------------------------------------
# Fast loglikelihood of the choices of one question
# ---------------------------------------------------------------------------


def _model_input(context_ids: list[int], continuation_ids: list[int], max_length: int) -> list[int]:
    """lm-eval's input: the last max_length+1 tokens, minus the final one (it is
    only ever a target)."""
    if not continuation_ids:
        raise ValueError("empty continuation: nothing to score")
    if len(continuation_ids) > max_length:
        raise ValueError(f"continuation of {len(continuation_ids)} tokens exceeds max_length {max_length}")
    return (context_ids + continuation_ids)[-(max_length + 1):][:-1]


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


def _cache_kwarg(decoder) -> str:
    # transformers 5.x renamed the KV-cache argument from past_key_values to cache.
    import inspect

    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def _pad_right(seqs: Sequence[Sequence[int]], device) -> torch.Tensor:
    # Pads sit after every real token, so causal attention never lets a real
    # position see them: no attention mask needed, pad id irrelevant.
    width = max(len(s) for s in seqs)
    out = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def sequence_loglikelihoods(model, token_pairs: Sequence[tuple[list[int], list[int]]], max_length: int,
                            share_prefix: bool = True) -> list[float]:
    """Summed log-probability of each continuation given its context (token
    ids), for the few requests of one question, in one batch.

    With ``share_prefix`` the token prefix common to all inputs (up to the first
    scored position) is run once and its KV cache repeated for the batch.
    Call under ``torch.inference_mode()``.
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    inputs = [_model_input(c, t, max_length) for c, t in token_pairs]
    n_scored = [len(t) for _, t in token_pairs]
    first_scored = min(len(x) - n for x, n in zip(inputs, n_scored))
    prefix = min(_common_prefix_len(inputs), first_scored) if share_prefix else 0

    if prefix > 0:
        key = _cache_kwarg(decoder)
        out = decoder(input_ids=torch.tensor([inputs[0][:prefix]], device=device), use_cache=True)
        cache = _returned_cache(out)
        cache.batch_repeat_interleave(len(inputs))
        suffixes = _pad_right([x[prefix:] for x in inputs], device)
        hidden = decoder(input_ids=suffixes, use_cache=True, **{key: cache}).last_hidden_state
    else:
        hidden = decoder(input_ids=_pad_right(inputs, device), use_cache=False).last_hidden_state

    # Gather only the hidden states that predict continuation tokens.
    rows = [hidden[i, len(x) - n - prefix:len(x) - prefix] for i, (x, n) in enumerate(zip(inputs, n_scored))]
    logprobs = F.log_softmax(head(torch.cat(rows)).float(), dim=-1)
    targets = torch.tensor([tok for _, t in token_pairs for tok in t], device=device)
    token_lp = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return [part.sum().item() for part in torch.split(token_lp, n_scored)]


def choice_loglikelihoods(model, tokenizer, example: MCExample, max_length: Optional[int] = None,
                          share_prefix: bool = True) -> list[float]:
    """Log-likelihood of every choice of one question (lm-eval tokenization)."""
    max_length = model_max_length(model, tokenizer) if max_length is None else max_length
    pairs = [encode_pair(tokenizer, ctx, cont) for ctx, cont in example.requests]
    return sequence_loglikelihoods(model, pairs, max_length, share_prefix=share_prefix)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def _argmax(values: Sequence[float]) -> int:
    # First index of the maximum, like numpy.argmax (ties go to the first choice).
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def score_choices(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """``{"acc", "acc_norm"}`` (0/1) of one question; acc_norm divides each
    loglikelihood by the choice's length in characters, as lm-eval does."""
    normed = [ll / len(c) if len(c) else -math.inf for ll, c in zip(loglikelihoods, choices)]
    return {"acc": float(_argmax(loglikelihoods) == gold), "acc_norm": float(_argmax(normed) == gold)}


def mean_and_stderr(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and its standard error (sample std with n-1, / sqrt(n)); the error
    is None below two values."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(per_example: Sequence[dict], metrics: Sequence[str]) -> dict:
    """Task-level ``{metric, metric_stderr, ..., "n"}`` from per-question scores."""
    out = {}
    for m in metrics:
        out[m], out[f"{m}_stderr"] = mean_and_stderr([s[m] for s in per_example])
    out["n"] = len(per_example)
    return out


# ---------------------------------------------------------------------------
# Running a task
# ---------------------------------------------------------------------------


def evaluate_task(model, tokenizer, name: str, data_dir, limit: Optional[int] = None, progress: bool = True,
                  max_length: Optional[int] = None) -> dict:
    """Zero-shot accuracy of ``model`` on one task.

    Returns ``{"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n",
    "headline", "chance", "seconds"}`` (fractions, not percentages).
    """
    from tqdm.auto import tqdm

    spec = get_task(name)
    examples = load_examples(name, data_dir, limit)
    max_length = model_max_length(model, tokenizer) if max_length is None else max_length
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    scores = []
    try:
        with torch.inference_mode():
            for ex in tqdm(examples, desc=name, disable=not progress):
                lls = choice_loglikelihoods(model, tokenizer, ex, max_length)
                scores.append(score_choices(lls, ex.choices, ex.gold))
    finally:
        model.train(was_training)
    result = aggregate(scores, spec.metrics)
    result.update(headline=spec.headline, chance=spec.chance, seconds=round(time.perf_counter() - start, 3))
    return result
