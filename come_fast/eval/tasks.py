"""The seven zero-shot multiple-choice tasks, read from local files and scored
the way lm-evaluation-harness 0.4.13 scores them.

The loaders turn each local file into the rows of the Hugging Face dataset that
lm-eval's stock task reads (``allenai/ai2_arc``, ``Rowan/hellaswag``, ...), so
the same rows feed lm-eval itself (``come_fast/eval/lm_eval_tasks/``, the path
``come_fast.evaluate`` takes when lm-eval is installed) and the built-in
scorer below (the fallback without lm-eval).

What lm-eval does, and the built-in scorer reproduces (written from its task
YAMLs and its HF model wrapper, not copied):

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
and its KV cache reused for the choices; several questions share each pair of
forward passes (prefixes, then suffixes, right-padded with an attention mask),
and the output head is applied only at the scored positions (``score_groups``,
also the fast path of the lm-eval model ``come_fast``).
"""
from __future__ import annotations

import json
import math
import os
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


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")
_ENDS_SENTENCE = re.compile(r"[.!?][\"')\]]*$")


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """``(ctx_a, ctx_b)`` of a HellaSwag context whose two halves the local file
    has already joined (``ctx_a + " " + ctx_b``).

    lm-eval builds the query from ``ctx_a + " " + ctx_b.capitalize()``, so the
    split matters. In HellaSwag, ``ctx_b`` is the lower-case start of the
    sentence to be completed (ActivityNet items: "A man is sitting on a roof." +
    "he"), or empty where the context ends with a full sentence (every WikiHow
    item). So: a context that ends a sentence has no ``ctx_b``; otherwise
    ``ctx_b`` is what follows the last sentence end (the whole context when
    there is none). On the local validation file this finds a ``ctx_b`` for the
    3,243 ActivityNet items and none for the 6,799 WikiHow ones; the first ten
    items match the original ``hellaswag_val.jsonl`` exactly (tests).
    """
    ctx = ctx.strip()
    if _ENDS_SENTENCE.search(ctx):
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return "", ctx
    cut = ends[-1].end()
    return ctx[:cut].rstrip(), ctx[cut:]


def _load_hellaswag(data_dir: Path) -> list[dict]:
    # llama.cpp layout, 6 lines per question: "activity_label: ctx", gold, 4
    # endings (the file's text already went through lm-eval's clean-up; see
    # SOURCES.md). Rows as Rowan/hellaswag has them, ctx split back into
    # ctx_a / ctx_b so that lm-eval's capitalisation of ctx_b applies.
    lines = _read_lines(data_dir / "hellaswag" / "validation.txt")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag: {len(lines)} lines is not a multiple of 6")
    docs = []
    for ind, i in enumerate(range(0, len(lines), 6)):
        label, sep, ctx = lines[i].partition(": ")
        if not sep:
            raise ValueError(f"hellaswag: line {i + 1} has no 'activity label: ' prefix: {lines[i]!r}")
        ctx_a, ctx_b = split_hellaswag_context(ctx)
        docs.append({"ind": ind, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                     "endings": lines[i + 2:i + 6], "label": lines[i + 1].strip()})
    return docs


def hellaswag_query(doc: dict) -> str:
    """lm-eval's HellaSwag query: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``."""
    return hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())


def format_hellaswag(doc: dict) -> MCExample:
    return _multiple_choice(hellaswag_query(doc), [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


# --- WinoGrande -------------------------------------------------------------


def _load_winogrande(data_dir: Path) -> list[dict]:
    # The llm-foundry file holds the two scored contexts (sentence up to the
    # blank + option) and the rest of the sentence; rows as allenai/winogrande
    # has them are rebuilt from the contexts' common prefix. Where that prefix
    # stops inside a word the options come out shorter, but lm-eval's choices
    # (sentence[:blank] + option) and target (sentence[blank + 1:].strip()) are
    # the same strings either way.
    docs = []
    for i, row in enumerate(_read_jsonl(data_dir / "winogrande" / "validation.jsonl")):
        first, second = row["context_options"]
        prefix = os.path.commonprefix([first, second])
        if "_" in prefix:
            raise ValueError(f"winogrande: row {i} has '_' before the blank: {first!r}")
        docs.append({"sentence": prefix + "_ " + row["continuation"].strip(), "option1": first[len(prefix):],
                     "option2": second[len(prefix):], "answer": str(int(row["gold"]) + 1)})
    return docs


def format_winogrande(doc: dict) -> MCExample:
    # Partial scoring: the choices are the contexts (sentence[:blank] + option),
    # the scored continuation " " + sentence[blank + 1:].strip().
    blank = doc["sentence"].index("_")
    contexts = tuple(doc["sentence"][:blank] + doc[k] for k in ("option1", "option2"))
    continuation = TARGET_DELIMITER + doc["sentence"][blank + 1:].strip()
    return MCExample(tuple((c, continuation) for c in contexts), contexts, {"1": 0, "2": 1}[doc["answer"]])


# --- ARC --------------------------------------------------------------------


def _arc_loader(subdir: str) -> Callable[[Path], list[dict]]:
    # The original AI2 files, as rows of allenai/ai2_arc (question = the stem).
    def load(data_dir: Path) -> list[dict]:
        return [{"id": d["id"], "question": d["question"]["stem"],
                 "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                             "label": [c["label"] for c in d["question"]["choices"]]},
                 "answerKey": d["answerKey"]} for d in _read_jsonl(data_dir / subdir / "test.jsonl")]
    return load


def format_arc(doc: dict) -> MCExample:
    return _multiple_choice(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"],
                            doc["choices"]["label"].index(doc["answerKey"]))


# --- BoolQ ------------------------------------------------------------------


def _load_boolq(data_dir: Path) -> list[dict]:
    # SuperGLUE's jsonl, label as aps/super_glue has it (1 = true).
    return [dict(d, label=_boolq_label(d["label"])) for d in _read_jsonl(data_dir / "boolq" / "validation.jsonl")]


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
    # The original TSV (not csv: question stems contain unbalanced quotes), as
    # rows of allenai/openbookqa "main".
    lines = _read_lines(data_dir / "openbookqa" / "test.tsv")
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:] if line.strip()]
    col = {name: header.index(name) for name in ("ID", "Question Stem", "Choices", "Answer Key")}
    return [{"id": r[col["ID"]], "question_stem": r[col["Question Stem"]],
             "choices": {"text": _split_obqa_choices(r[col["Choices"]]), "label": list("ABCD")},
             "answerKey": r[col["Answer Key"]].strip()} for r in rows]


def format_openbookqa(doc: dict) -> MCExample:
    return _multiple_choice(doc["question_stem"], doc["choices"]["text"],
                            doc["choices"]["label"].index(doc["answerKey"].lstrip()))


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


def check_start(start) -> None:
    """``start``: the index of the first example (a non-negative integer)."""
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative integer (the first example's index), got {start!r}")


def load_examples(name: str, data_dir, limit: Optional[int] = None, start: int = 0) -> list[MCExample]:
    """The task's examples in file order; ``limit=N`` keeps N of them, from
    index ``start`` (0: the first N)."""
    spec = get_task(name)
    check_limit(limit)
    check_start(start)
    check_files(name, data_dir)
    docs = spec.load(Path(data_dir))
    if start >= len(docs) and start:
        raise ValueError(f"{name}: start={start} is past the task's {len(docs)} examples")
    docs = docs[start:] if limit is None else docs[start:start + limit]
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


def _prepare_group(pairs, max_length: int, share_prefix: bool):
    inputs = [_model_input(c, t, max_length) for c, t in pairs]
    n_scored = [len(t) for _, t in pairs]
    first_scored = min(len(x) - n for x, n in zip(inputs, n_scored))
    prefix = min(_common_prefix_len(inputs), first_scored) if share_prefix else 0
    return inputs, n_scored, prefix


def score_groups(model, groups: Sequence[Sequence[tuple[list[int], list[int]]]], max_length: int,
                 share_prefix: bool = True, softmax_dtype: Optional[torch.dtype] = torch.float32
                 ) -> list[list[tuple[float, bool]]]:
    """``(summed log-probability, is_greedy)`` of each continuation given its
    context (token ids): what lm-eval's ``loglikelihood`` returns per request,
    for ``groups`` of requests (a group: the choices of one question).

    With ``share_prefix`` each group's token prefix common to its inputs (up to
    the first scored position) runs once and its KV cache serves every request
    of the group; all groups go through two forward passes (their prefixes as
    one right-padded batch, then all their requests' suffixes on the repeated
    cache), with an attention mask and position ids where prefixes differ in
    length. A group without a common prefix runs as one plain batch. The output
    head is applied only at the scored positions. ``softmax_dtype``: the
    log-softmax's dtype (None: the logits' own, as lm-eval's HFLM does by
    default). Inputs are lm-eval's (left-truncated to ``max_length``). Call
    under ``torch.inference_mode()``.
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    prepared = [_prepare_group(g, max_length, share_prefix) for g in groups]
    hidden_rows: list = [None] * len(groups)  # per group: the hidden states predicting its scored tokens

    for gi, (inputs, n_scored, prefix) in enumerate(prepared):
        if prefix == 0:  # nothing shared: one plain right-padded batch
            hidden = decoder(input_ids=_pad_right(inputs, device), use_cache=False).last_hidden_state
            hidden_rows[gi] = [hidden[i, len(x) - n:len(x)] for i, (x, n) in enumerate(zip(inputs, n_scored))]

    shared = [gi for gi, (_, _, prefix) in enumerate(prepared) if prefix > 0]
    if shared:
        key = _cache_kwarg(decoder)
        prefixes = [prepared[gi][2] for gi in shared]
        row_group = [k for k, gi in enumerate(shared) for _ in prepared[gi][0]]
        suffixes = [x[prepared[gi][2]:] for gi in shared for x in prepared[gi][0]]
        prefix_ids = _pad_right([prepared[gi][0][0][:prepared[gi][2]] for gi in shared], device)
        suffix_ids = _pad_right(suffixes, device)
        if len(shared) == 1:  # one prefix: no padding inside the sequence, no mask needed
            out = decoder(input_ids=prefix_ids, use_cache=True)
            cache = _returned_cache(out)
            cache.batch_select_indices(torch.tensor(row_group, device=device))
            hidden = decoder(input_ids=suffix_ids, use_cache=True, **{key: cache}).last_hidden_state
        else:
            width_p, width_s = prefix_ids.shape[1], suffix_ids.shape[1]
            p = torch.tensor(prefixes, device=device)
            prefix_mask = (torch.arange(width_p, device=device)[None, :] < p[:, None]).long()
            out = decoder(input_ids=prefix_ids, attention_mask=prefix_mask,
                          position_ids=torch.arange(width_p, device=device).expand(len(shared), -1), use_cache=True)
            cache = _returned_cache(out)
            rows = torch.tensor(row_group, device=device)
            cache.batch_select_indices(rows)
            lengths = torch.tensor([len(x) for x in suffixes], device=device)
            suffix_mask = (torch.arange(width_s, device=device)[None, :] < lengths[:, None]).long()
            hidden = decoder(input_ids=suffix_ids, attention_mask=torch.cat([prefix_mask[rows], suffix_mask], dim=1),
                             position_ids=p[rows][:, None] + torch.arange(width_s, device=device)[None, :],
                             use_cache=True, **{key: cache}).last_hidden_state
        r = 0
        for gi in shared:
            inputs, n_scored, prefix = prepared[gi]
            hidden_rows[gi] = []
            for x, n in zip(inputs, n_scored):
                hidden_rows[gi].append(hidden[r, len(x) - n - prefix:len(x) - prefix])
                r += 1

    flat_n = [n for _, n_scored, _ in prepared for n in n_scored]
    logprobs = F.log_softmax(head(torch.cat([h for rows in hidden_rows for h in rows])), dim=-1, dtype=softmax_dtype)
    targets = torch.tensor([tok for g in groups for _, t in g for tok in t], device=device)
    token_lp = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
    hits = logprobs.argmax(dim=-1) == targets
    scores = [(float(lp.sum()), bool(h.all())) for lp, h in zip(torch.split(token_lp, flat_n),
                                                                torch.split(hits, flat_n))]
    out, i = [], 0
    for g in groups:
        out.append(scores[i:i + len(g)])
        i += len(g)
    return out


def sequence_scores(model, token_pairs: Sequence[tuple[list[int], list[int]]], max_length: int,
                    share_prefix: bool = True, softmax_dtype: Optional[torch.dtype] = torch.float32
                    ) -> list[tuple[float, bool]]:
    """``score_groups`` for the requests of one question."""
    return score_groups(model, [token_pairs], max_length, share_prefix=share_prefix, softmax_dtype=softmax_dtype)[0]


def sequence_loglikelihoods(model, token_pairs: Sequence[tuple[list[int], list[int]]], max_length: int,
                            share_prefix: bool = True) -> list[float]:
    """Summed log-probability of each continuation given its context (token
    ids), for the few requests of one question, in one batch (float32
    log-softmax); see ``sequence_scores``. Call under ``torch.inference_mode()``.
    """
    return [ll for ll, _ in sequence_scores(model, token_pairs, max_length, share_prefix=share_prefix)]


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


def answers_string(headline_scores: Sequence[float]) -> str:
    """Per-question right (1) / wrong (0) of the headline metric, in example
    order, as one string: what a paired comparison of two models needs."""
    return "".join("1" if float(v) > 0.5 else "0" for v in headline_scores)


def aggregate(per_example: Sequence[dict], metrics: Sequence[str], headline: Optional[str] = None) -> dict:
    """Task-level ``{metric, metric_stderr, ..., "n"}`` from per-question scores,
    and ``"correct"`` (``answers_string`` of ``headline``) when it is given."""
    out = {}
    for m in metrics:
        out[m], out[f"{m}_stderr"] = mean_and_stderr([s[m] for s in per_example])
    out["n"] = len(per_example)
    if headline is not None:
        out["correct"] = answers_string([s[headline] for s in per_example])
    return out


# ---------------------------------------------------------------------------
# Running a task
# ---------------------------------------------------------------------------


def evaluate_task(model, tokenizer, name: str, data_dir, limit: Optional[int] = None, progress: bool = True,
                  max_length: Optional[int] = None, start: int = 0, batch_size: int = 16) -> dict:
    """Zero-shot accuracy of ``model`` on one task, scored by the built-in
    scorer (``come_fast.eval.evaluate_task`` uses lm-eval when installed).
    Questions are scored longest first, up to ``batch_size`` requests (choices)
    per pair of forward passes (``score_groups``), at least one question.

    Returns ``{"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n",
    "headline", "chance", "seconds", "correct"}`` (fractions, not percentages;
    ``correct``: ``answers_string`` of the headline metric).
    """
    from tqdm.auto import tqdm

    spec = get_task(name)
    examples = load_examples(name, data_dir, limit, start=start)
    max_length = model_max_length(model, tokenizer) if max_length is None else max_length
    start_time = time.perf_counter()
    was_training = model.training
    model.eval()
    pairs = [[encode_pair(tokenizer, ctx, cont) for ctx, cont in ex.requests] for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: -max(len(c) + len(t) for c, t in pairs[i]))
    chunks, chunk = [], []
    for i in order:
        if chunk and sum(len(pairs[j]) for j in chunk) + len(pairs[i]) > batch_size:
            chunks.append(chunk)
            chunk = []
        chunk.append(i)
    if chunk:
        chunks.append(chunk)
    scores: list = [None] * len(examples)
    try:
        with torch.inference_mode(), tqdm(total=len(examples), desc=name, disable=not progress) as bar:
            for chunk in chunks:
                for i, group in zip(chunk, score_groups(model, [pairs[i] for i in chunk], max_length)):
                    scores[i] = score_choices([ll for ll, _ in group], examples[i].choices, examples[i].gold)
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    result = aggregate(scores, spec.metrics, spec.headline)
    result.update(headline=spec.headline, chance=spec.chance, seconds=round(time.perf_counter() - start_time, 3))
    return result
