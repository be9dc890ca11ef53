"""Evaluation through lm-eval (come_fast/eval/lmeval.py, come_fast/eval/lm_eval_tasks/):
the registered ``come_fast`` model against stock HFLM on a tiny random model,
the task YAMLs against lm-eval's stock ones and the local files, the built-in
scorer against lm-eval's requests, and ``come_fast.evaluate`` through lm-eval."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e \".[eval]\")")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.evaluator import evaluate as lm_eval_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from come_fast import eval as ev  # noqa: E402
from come_fast.eval import lmeval  # noqa: E402
from come_fast.eval import tasks as T  # noqa: E402
from come_fast.eval.lm_eval_tasks import LM_EVAL_TASKS, TASKS_DIR  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import bpe_tokenizer, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"shared data dir not found at {DATA_DIR}")

COUNTS = {"piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
          "boolq": 3270, "openbookqa": 500}
CORPUS = [
    "Question: What do cats like to eat?\nAnswer: fish and milk, mostly.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Sarah was a much better surgeon than Maria so Maria always got the harder cases.",
    "Is the sky blue? yes. Is grass red? no. Answer: yes no maybe",
]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer):
    # max_position_embeddings 384: long requests (BoolQ passages, the toy long context) are left-truncated
    return tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=384)


def _manager():
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(DATA_DIR)})


def _run(lm, names, limit=None, samples=None):
    manager = _manager()
    loaded = manager.load([LM_EVAL_TASKS[n][0] for n in names])["tasks"]
    for t in loaded.values():
        t.set_config(key="num_fewshot", value=0)
    return lm_eval_evaluate(lm=lm, task_dict={"tasks": loaded, "groups": {}}, limit=limit, samples=samples,
                            log_samples=True)


# ---------------------------------------------------------------------------
# the model class
# ---------------------------------------------------------------------------


def test_come_fast_is_registered():
    from lm_eval.api.registry import get_model

    assert get_model("come_fast") is lmeval.ComeFastLM
    assert issubclass(lmeval.ComeFastLM, HFLM)


def _requests(tokenizer):
    # two documents of several choices (one sharing its whole context, one
    # WinoGrande-like with differing contexts), single-request documents, an
    # empty context (conditioned on the prefix token) and a request whose
    # context needs left truncation
    long_ctx = " ".join(CORPUS) * 4
    docs = [
        [("Question: What do cats like to eat?\nAnswer:", " fish"), ("Question: What do cats like to eat?\nAnswer:",
                                                                     " rocks and more rocks"),
         ("Question: What do cats like to eat?\nAnswer:", " milk")],
        [("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
         ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")],
        [("The quick brown fox", " jumps")],
        [("", "The dog sleeps in the sun.")],
        [(long_ctx, " yes"), (long_ctx, " no")],
        [("Is the sky blue? ", "yes")],
    ]
    reqs = []
    for doc_id, pairs in enumerate(docs):
        for i, args in enumerate(pairs):
            reqs.append(Instance(request_type="loglikelihood", doc={}, arguments=args, idx=i,
                                 metadata=("toy", doc_id, 1)))
    return reqs


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihood_matches_hflm(model, tokenizer, batch_size):
    reqs = _requests(tokenizer)
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4).loglikelihood(reqs, disable_tqdm=True)
    ours = lmeval.ComeFastLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                             progress=False).loglikelihood(reqs, disable_tqdm=True)
    assert len(ours) == len(stock)
    for (ll_ours, greedy_ours), (ll_stock, greedy_stock) in zip(ours, stock):
        assert ll_ours == pytest.approx(ll_stock, abs=1e-4, rel=1e-5)
        assert greedy_ours == greedy_stock


def test_plain_path_is_hflm_exactly(model, tokenizer):
    reqs = _requests(tokenizer)
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2).loglikelihood(reqs, disable_tqdm=True)
    plain = lmeval.ComeFastLM(pretrained=model, tokenizer=tokenizer, batch_size=2, share_prefix=False,
                              progress=False).loglikelihood(reqs, disable_tqdm=True)
    assert plain == stock


def test_fast_path_skipped_for_softcapped_logits(model, tokenizer):
    lm = lmeval.ComeFastLM(pretrained=model, tokenizer=tokenizer, progress=False)
    assert lm._fast_path_applies()
    model.config.final_logit_softcapping = 30.0
    try:
        assert not lm._fast_path_applies()
    finally:
        del model.config.final_logit_softcapping


def test_loads_a_come_fast_folder(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    lm = lmeval.ComeFastLM(pretrained=str(tmp_path / "m"), device="cpu")
    assert lm.model.dtype == torch.float32 and lm.get_model_info()["come_fast_source"] == str(tmp_path / "m")
    reqs = _requests(tokenizer)[:3]
    ref = HFLM(pretrained=model, tokenizer=tokenizer).loglikelihood(reqs, disable_tqdm=True)
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    assert [a for a, _ in got] == pytest.approx([a for a, _ in ref], abs=1e-4)


@needs_data
def test_tasks_match_stock_hflm(model, tokenizer):
    names = ["piqa", "hellaswag", "winogrande", "arc_easy", "boolq", "openbookqa"]
    stock = _run(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), names, limit=6)
    ours = _run(lmeval.ComeFastLM(pretrained=model, tokenizer=tokenizer, batch_size=8, progress=False), names,
                limit=6)
    for n in names:
        t = LM_EVAL_TASKS[n][0]
        a = sorted(stock["samples"][t], key=lambda s: s["doc_id"])
        b = sorted(ours["samples"][t], key=lambda s: s["doc_id"])
        assert len(a) == len(b) == 6
        for sa, sb in zip(a, b):
            assert [r[0][0] for r in sb["resps"]] == pytest.approx([r[0][0] for r in sa["resps"]], abs=1e-4)
            assert sa["acc"] == sb["acc"] and sa.get("acc_norm") == sb.get("acc_norm")
        assert stock["results"][t] == ours["results"][t]


# ---------------------------------------------------------------------------
# the task YAMLs
# ---------------------------------------------------------------------------

_STOCK = {"piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
          "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
          "boolq": "super_glue/boolq/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml"}
_PROMPT_KEYS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter",
                "fewshot_delimiter", "should_decontaminate", "doc_to_decontamination_query", "metric_list",
                "num_fewshot", "process_results")


@pytest.mark.parametrize("name", list(LM_EVAL_TASKS))
def test_yaml_is_the_stock_task(name):
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    stock = load_yaml(Path(lm_eval.tasks.__file__).parent / _STOCK[name])
    ours = load_yaml(TASKS_DIR / f"{LM_EVAL_TASKS[name][0]}.yaml")
    for k in _PROMPT_KEYS:
        assert ours.get(k) == stock.get(k), (name, k)
    assert ours["metadata"]["version"] == stock["metadata"]["version"]
    assert ours["task"] == LM_EVAL_TASKS[name][0] and "come_fast_zeroshot" in ours["tag"]
    assert callable(ours["custom_dataset"]) and "dataset_path" not in ours
    split = LM_EVAL_TASKS[name][1]
    assert ours.get(f"{split}_split") == split
    if name == "hellaswag":  # lm-eval's own process_docs, memoized
        from lm_eval.tasks.hellaswag.utils import process_docs

        assert stock["process_docs"] is process_docs
        assert ours["process_docs"].__name__ == "hellaswag_process_docs"


@needs_data
def test_tasks_load_the_local_files():
    manager = _manager()
    assert set(manager.match_tasks(["come_fast_zeroshot"])) == {"come_fast_zeroshot"}
    loaded = manager.load([t for t, _ in LM_EVAL_TASKS.values()])["tasks"]
    for name, (task, _) in LM_EVAL_TASKS.items():
        assert len(loaded[task].eval_docs) == COUNTS[name], name


@needs_data
@pytest.mark.parametrize("name", list(LM_EVAL_TASKS))
def test_builtin_scorer_makes_lm_eval_requests(name):
    """The fallback scorer's (context, continuation) strings, choices and gold
    are lm-eval's, on the first 25 and 5 later examples of each file."""
    task = _manager().load([LM_EVAL_TASKS[name][0]])["tasks"][LM_EVAL_TASKS[name][0]]
    task.set_config(key="num_fewshot", value=0)
    ids = sorted(set(range(25)) | {200, 499, 777 % COUNTS[name], COUNTS[name] - 2, COUNTS[name] - 1})
    task.build_all_requests(samples=ids, rank=0, world_size=1)
    by_doc = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    examples = T.load_examples(name, DATA_DIR)
    assert sorted(by_doc) == list(range(len(ids)))  # with samples=, lm-eval numbers the chosen docs 0, 1, ...
    for doc_id, index in enumerate(ids):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        ex = examples[index]
        assert tuple(tuple(i.args) for i in insts) == ex.requests, (name, index)
        doc = insts[0].doc
        assert task.doc_to_target(doc) == ex.gold or task.doc_to_text(doc) == ex.gold, (name, index)


# ---------------------------------------------------------------------------
# HellaSwag: the context split back into ctx_a / ctx_b
# ---------------------------------------------------------------------------

# ctx_a / ctx_b of the first ten items of rowanz/hellaswag's hellaswag_val.jsonl (MIT)
_ORIGINAL_SPLITS = [
    ("A man is sitting on a roof.", "he"),
    ("A lady walks to a barbell. She bends down and grabs the pole.", "the lady"),
    ("Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, with "
     "other individuals visible in the background.", "the child and a different man"),
    ("A boy is running down a track.", "the boy"),
    ("The boy lifts his body above the height of a pole. The boy lands on his back on to a red mat.", "the boy"),
    ("The boy lands on his back on to a red mat. The boy gets up from the mat.", "the boy"),
    ("A man is standing in front of a camera. He starts playing a harmonica for the camera.", "he"),
    ("A cartoon animation video is shown with people wandering around and rockets being shot.", "two men"),
    ("A man is holding a pocket knife while sitting on some rocks in the wilderness.", "then he"),
    ("Then he takes a small stone from the flowing river and smashes it on another stone. He starts to crush the "
     "small stone to smaller pieces.", "he"),
]


def test_hellaswag_context_split():
    assert T.split_hellaswag_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    # WikiHow contexts end a sentence: no ctx_b
    assert T.split_hellaswag_context("How to x. Do y.") == ("How to x. Do y.", "")
    assert T.split_hellaswag_context("the cat sat") == ("", "the cat sat")
    doc = {"activity_label": "Roof", "ctx_a": "A man is on a roof.", "ctx_b": "he", "endings": ["x."], "label": "0"}
    assert T.hellaswag_query(doc) == "Roof: A man is on a roof. He"


@needs_data
def test_hellaswag_split_matches_the_original_file():
    docs = T.get_task("hellaswag").load(DATA_DIR)
    assert [(d["ctx_a"], d["ctx_b"]) for d in docs[:10]] == _ORIGINAL_SPLITS
    assert sum(bool(d["ctx_b"]) for d in docs) == 3243  # the ActivityNet items; WikiHow's 6799 have none
    assert T.load_examples("hellaswag", DATA_DIR, limit=1)[0].requests[0][0] == \
        "Roof shingle removal: A man is sitting on a roof. He"


# ---------------------------------------------------------------------------
# come_fast.evaluate through lm-eval
# ---------------------------------------------------------------------------


@needs_data
def test_evaluate_through_lm_eval_matches_builtin(model, tokenizer):
    names = ["piqa", "hellaswag", "winogrande", "arc_challenge", "boolq", "openbookqa"]
    rng = torch.random.get_rng_state()
    tokenizer.pad_token = None  # HFLM sets a missing one: evaluate puts it back
    a = ev.evaluate(model, tokenizer, tasks=names, data_dir=DATA_DIR, limit=5, start=3, progress=False,
                    harness="lm-eval")
    assert torch.equal(rng, torch.random.get_rng_state())  # lm-eval's seeding does not leak
    assert model.training is False and tokenizer.pad_token is None
    b = ev.evaluate(model, tokenizer, tasks=names, data_dir=DATA_DIR, limit=5, start=3, progress=False,
                    harness="builtin")
    assert a["config"]["harness"].startswith("lm-eval 0.4") and b["config"]["harness"] == "builtin"
    assert a["config"]["start"] == 3
    for n in names:
        ra, rb = a["tasks"][n], b["tasks"][n]
        assert set(ra) == set(rb) and ra["n"] == rb["n"] == 5
        for m in T.get_task(n).metrics:
            assert ra[m] == rb[m], (n, m)
            assert ra[f"{m}_stderr"] == pytest.approx(rb[f"{m}_stderr"])
        # the per-question answers: the same in both, in example order, and they make the headline metric
        assert ra["correct"] == rb["correct"] and len(ra["correct"]) == 5
        assert ra["correct"].count("1") / 5 == pytest.approx(ra[ra["headline"]])
    one_by_one = "".join(ev.evaluate_task(model, tokenizer, "arc_challenge", DATA_DIR, limit=1, start=3 + i,
                                          progress=False, harness="builtin")["correct"] for i in range(5))
    assert a["tasks"]["arc_challenge"]["correct"] == one_by_one
    assert a["average"] == b["average"]
    json.dumps(a)


@needs_data
def test_evaluate_task_routes_and_slices(model, tokenizer):
    r = ev.evaluate_task(model, tokenizer, "arc_easy", DATA_DIR, limit=4, start=2, progress=False)
    ex = T.load_examples("arc_easy", DATA_DIR, limit=4, start=2)
    assert r["n"] == 4 and len(ex) == 4
    assert ex[0].requests == T.load_examples("arc_easy", DATA_DIR, limit=3)[2].requests
    with pytest.raises(ValueError, match="start"):
        ev.evaluate_task(model, tokenizer, "openbookqa", DATA_DIR, limit=4, start=500, progress=False)
    with pytest.raises(ValueError, match="start"):
        ev.evaluate(model, tokenizer, tasks=["piqa"], data_dir=DATA_DIR, start=-1)


def test_harness_choice(monkeypatch):
    assert ev.zero_shot_harness("auto") == "lm-eval"
    assert ev.zero_shot_harness("builtin") == "builtin"
    with pytest.raises(ValueError, match="harness"):
        ev.zero_shot_harness("vllm")
    monkeypatch.setattr(ev, "_lm_eval_importable", lambda: False)
    monkeypatch.setattr(ev, "_WARNED_BUILTIN", False)
    with pytest.warns(UserWarning, match="lm-eval is not installed"):
        assert ev.zero_shot_harness("auto") == "builtin"
    with pytest.raises(ImportError, match=r"\.\[eval\]"):
        ev.zero_shot_harness("lm-eval")


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------


@needs_data
@pytest.mark.slow
def test_lm_eval_command_with_come_fast_model(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "come_fast.eval.lmeval", "--model", "come_fast", "--model_args",
           f"pretrained={tmp_path / 'm'}", "--tasks", "come_fast_arc_easy", "--limit", "3", "--device", "cpu",
           "--metadata", json.dumps({"data_dir": str(DATA_DIR)}), "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "come_fast_arc_easy" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_eval_extra_pins_lm_eval():
    text = (REPO / "pyproject.toml").read_text()
    assert 'eval = ["lm-eval==0.4.13"]' in text
    assert importlib.util.find_spec("come_fast.eval.lm_eval_tasks") is not None
