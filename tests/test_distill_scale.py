"""Distillation that scales (issue 9, items 2-4) on tiny random models:
data beyond calibration (distill_data, a validation split, early stopping, a
token budget), the teacher run per batch, the joint and layer-wise schedules,
resume from a checkpoint (bitwise the uninterrupted run), atomic checkpoints,
gradient checkpointing (the same gradients, less kept for backward), option
checks. Loss values are checked against hand computations from forward hooks
on the stock Hugging Face models, not against our own layer loop."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import come_fast
from come_fast import methods
from come_fast.adapters import adapter_for
from come_fast.compensate import spans
from come_fast.distill import LossWeights, ResumeError, RunCheckpoint, distill
from come_fast.posttrain import (DistillDataError, _Joint, distill_rows, hierarchical_distill, last_original,
                                 plan_distill)
from tiny import tiny_model, tokens

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest

WORDS = [f"w{i}" for i in range(100)]
DOCS = [" ".join(WORDS[(7 * i + 3 * j) % 100] for j in range(3 + i % 9)) for i in range(120)]


def word_tokenizer():
    """Word-level: word w{k} is id k + 2, within the tiny models' 128 tokens."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")


def reference_rows(docs, n, T):
    ids = [int(w[1:]) + 2 for d in docs if d for w in d.split()]
    return torch.tensor(ids[:n * T]).view(n, T)


# -- independent references ---------------------------------------------------------------

def boundaries(model, ids):
    """x_0 (the embeddings) .. x_L (raw, before the final norm) by forward hooks on the stock model."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    try:
        with torch.inference_mode():
            model(ids, use_cache=False)
            emb = model.model.embed_tokens(ids)
    finally:
        for h in hooks:
            h.remove()
    return [emb] + outs


def joint_loss_by_hand(student, teacher, ids, prov, mse=1.0, kl=1.0, scale_ids=None):
    """mse * mean_k MSE(h_k, t_k) / ms(t_k)  +  kl * KL(teacher || student), the scale over ``scale_ids``."""
    scale_ids = ids if scale_ids is None else scale_ids
    s_out = boundaries(student, ids)[1:]
    t_out = boundaries(teacher, ids)[1:]
    t_scale = boundaries(teacher, scale_ids)[1:]
    m = sum(F.mse_loss(s, t_out[last_original(p)]) / t_scale[last_original(p)].double().pow(2).mean()
            for s, p in zip(s_out, prov)) / len(prov)
    with torch.inference_mode():
        ls = F.log_softmax(student(ids, use_cache=False).logits, -1)
        lt = F.log_softmax(teacher(ids, use_cache=False).logits, -1)
    k = (lt.exp() * (lt - ls)).sum(-1).mean()
    return float(mse * m + kl * k)


def layer_loss_by_hand(student, teacher, ids, prov, k, scale_ids):
    """Student layer k alone on the teacher's state at the start of its span
    (0 for the first layer), its MSE to the teacher's state at the span's end
    over that state's mean square (over ``scale_ids``)."""
    sp = spans(prov, teacher.config.num_hidden_layers)
    s, e = (0 if k == 0 else sp[k][0]), sp[k][1]
    x = boundaries(teacher, ids)
    ms = boundaries(teacher, scale_ids)[e].double().pow(2).mean()
    p = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.inference_mode():
        y = student.model.layers[k](x[s], attention_mask=None, position_ids=p,
                                    position_embeddings=student.model.rotary_emb(x[s], p))
        y = y[0] if isinstance(y, tuple) else y
    return float(F.mse_loss(y, x[e]) / ms)


def delete_layers(teacher, keep):
    """A student made by deleting the teacher's layers not in ``keep`` (provenance = keep)."""
    student = copy.deepcopy(teacher)
    a = adapter_for(student)
    a.set_layers([a.layers[i] for i in keep])
    return student


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def merged(teacher):
    """A CoMe student (merged layers) and its provenance."""
    res = come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=tokens(n=8, T=16), compensate=None)
    return res.model, res.provenance


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# -- data beyond calibration ------------------------------------------------------------------

def test_distill_data_sources_give_the_same_rows_validation_first(tmp_path):
    datasets = pytest.importorskip("datasets")
    model, tok = tiny_model("llama"), word_tokenizer()
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    want = reference_rows(DOCS, 2 + 3 * 2, 16)
    assert len(set(want.flatten().tolist())) > 40  # the reference is not trivial
    for src in (DOCS, jsonl, str(jsonl), datasets.Dataset.from_dict({"text": DOCS})):
        plan = plan_distill({"distill_data": src, "distill_val_rows": 2}, 3, 2)
        plan.prepare(tokens(n=4, T=16), model, tok, seq_len=16)
        assert plan.run_steps == 3
        assert torch.equal(plan.val, want[:2]) and torch.equal(plan.train, want[2:]), src
    # a token tensor is taken as it is: first the validation rows, then every other row trains
    ids = tokens(n=7, T=16, seed=4)
    plan = plan_distill({"distill_data": ids, "distill_val_rows": 3}, 5, 2)
    plan.prepare(tokens(n=4, T=16), model, tok, seq_len=16)
    assert torch.equal(plan.val, ids[:3]) and torch.equal(plan.train, ids[3:]) and plan.run_steps == 5
    # without distill_data: the calibration rows, none held apart unless asked
    calib = tokens(n=6, T=16)
    plan = plan_distill({}, 4, 2)
    plan.prepare(calib, model, tok, seq_len=16)
    assert plan.val.shape[0] == 0 and torch.equal(plan.train, calib) and plan.eval_every is None
    plan = plan_distill({"distill_val_rows": 2}, 20, 2)
    plan.prepare(calib, model, tok, seq_len=16)
    assert torch.equal(plan.val, calib[:2]) and torch.equal(plan.train, calib[2:]) and plan.eval_every == 2


def test_token_budget_sets_the_steps_and_is_reported(teacher):
    calib = tokens(n=8, T=16)
    # 100 tokens hold 3 batches of 2 x 16 (96 tokens): 3 steps
    res = come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=calib, compensate=None,
                             distill_tokens=100, distill_lr=1e-3)
    rep = res.report[-1]["distillation"]
    assert rep["steps"] == 3 and rep["tokens"] == {"budget": 100, "seen": 96, "per_step": 32, "train_rows": 8,
                                                   "val_rows": 0, "seq_len": 16}
    assert res.settings["distill"]["tokens"]["seen"] == 96
    # with distill_steps too: the fewer
    res = come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=calib, compensate=None, distill_steps=2,
                             distill_tokens=100, distill_batch=1)
    assert res.report[-1]["distillation"]["tokens"]["seen"] == 2 * 16
    plan = plan_distill({"distill_tokens": 10_000}, 4, 2)
    assert plan.resolve_steps(16) == 4
    with pytest.raises(ValueError, match="less than one batch"):
        plan_distill({"distill_tokens": 31}, 0, 2).resolve_steps(16)


def test_teacher_runs_per_batch_in_inference_mode_and_the_loss_is_the_hand_loss_on_validation_rows(teacher, merged):
    student, prov = merged
    student = copy.deepcopy(student)
    train, val = tokens(n=6, T=16, seed=2), tokens(n=3, T=16, seed=3)
    seen = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x.shape[0], torch.is_inference_mode_enabled()))

    h = teacher.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        rep = hierarchical_distill(adapter_for(student), adapter_for(teacher), train, prov, steps=4, lr=1e-3,
                                   batch_size=2, val_tokens=val, eval_every=2)
    finally:
        h.remove()
    sizes, modes = [b for b, _ in seen], [m for _, m in seen]
    assert all(modes) and max(sizes) <= 2  # never more than a batch at a time, always under inference mode
    # 2 scale batches + 2 before + 4 steps + 3 evaluations x 2 batches + 2 after
    assert len(sizes) == 2 + 2 + 4 + 3 * 2 + 2
    assert [v["step"] for v in rep["validation"]] == [0, 2, 4]
    assert [v["tokens"] for v in rep["validation"]] == [0, 64, 128]
    assert rep["loss_on"] == "validation rows" and rep["tokens"]["val_rows"] == 3
    assert rep["loss_after"] == pytest.approx(joint_loss_by_hand(student, teacher, val, prov), rel=1e-4)
    assert rep["validation"][-1]["loss"] == pytest.approx(rep["loss_after"], rel=1e-6)
    before = joint_loss_by_hand(merged[0], teacher, val, prov)
    assert rep["loss_before"] == pytest.approx(before, rel=1e-4) and rep["validation"][0]["loss"] == pytest.approx(before, rel=1e-6)
    assert rep["loss_after"] < rep["loss_before"]


def test_plain_fine_tuning_is_the_models_own_lm_loss_and_runs_no_teacher(teacher, merged):
    # distill_mse=0, distill_kl=0, distill_ce=1: plain LM fine-tuning; its loss is the stock model's
    # next-token cross-entropy (transformers' labels= loss), and the teacher only sets the MSE scales
    student, prov = merged
    student = copy.deepcopy(student)
    train, val = tokens(n=6, T=16, seed=4), tokens(n=4, T=16, seed=5)

    def hf_loss(model):
        with torch.inference_mode():
            return sum(float(model(val[i:i + 2], labels=val[i:i + 2]).loss) for i in (0, 2)) / 2

    before = hf_loss(student)
    calls = []
    h = teacher.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        rep = hierarchical_distill(adapter_for(student), adapter_for(teacher), train, prov, steps=6, lr=3e-3,
                                   batch_size=2, val_tokens=val, mse=0.0, kl=0.0, ce=1.0)
    finally:
        h.remove()
    assert len(calls) == 2  # the two scale batches; no teacher run per training or evaluation batch
    assert rep["loss_before"] == pytest.approx(before, rel=1e-5)
    assert rep["loss_after"] == pytest.approx(hf_loss(student), rel=1e-5)
    assert rep["loss_after"] < rep["loss_before"]
    # with the KL beside it, both terms over the positions that have a next token
    s2 = copy.deepcopy(merged[0])
    rep2 = hierarchical_distill(adapter_for(s2), adapter_for(teacher), train, prov, steps=1, lr=1e-9,
                                batch_size=2, val_tokens=val, mse=0.0, kl=1.0, ce=1.0)
    with torch.inference_mode():
        kl = 0.0
        for i in (0, 2):
            ls = merged[0](val[i:i + 2]).logits[:, :-1].reshape(-1, 128)
            lt = teacher(val[i:i + 2]).logits[:, :-1].reshape(-1, 128)
            kl += float(F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True,
                                 reduction="batchmean")) / 2
    assert rep2["loss_before"] == pytest.approx(before + kl, rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_kl_temperature_is_t_squared_kl_of_the_softened_distributions(teacher, merged, T):
    student, prov = merged
    val = tokens(n=4, T=16, seed=6)
    rep = hierarchical_distill(adapter_for(copy.deepcopy(student)), adapter_for(teacher), tokens(n=4, T=16, seed=7),
                               prov, steps=1, lr=1e-9, batch_size=2, val_tokens=val, mse=0.0, kl=1.0,
                               temperature=T)
    with torch.inference_mode():
        ls = student(val, use_cache=False).logits.double() / T
        lt = teacher(val, use_cache=False).logits.double() / T
    p_t = lt.softmax(-1)
    by_hand = T * T * float((p_t * (lt.log_softmax(-1) - ls.log_softmax(-1))).sum(-1).mean())
    assert rep["loss_before"] == pytest.approx(by_hand, rel=1e-5)
    assert rep["settings"]["weights"]["temperature"] == T


def test_compress_records_the_temperature_and_a_resume_of_another_temperature_is_refused(teacher, tmp_path):
    calib = tokens(n=8, T=16)
    res = come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=calib, compensate=None, distill_steps=2,
                             distill_temperature=2.0, distill_resume=tmp_path / "run")
    rep = next(s["distillation"] for s in res.report if isinstance(s, dict) and "distillation" in s)
    assert rep["settings"]["weights"]["temperature"] == 2.0
    with pytest.raises(ResumeError, match="temperature"):
        come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=calib, compensate=None, distill_steps=2,
                           distill_resume=tmp_path / "run")


def test_autocast_runs_each_steps_forward_and_loss_in_bfloat16_and_keeps_the_parameters_float32():
    g = torch.Generator().manual_seed(0)
    x, w_t = torch.randn(6, 32, generator=g), torch.randn(50, 32, generator=g)
    w = torch.nn.Parameter(torch.randn(50, 32, generator=g) * 0.5)

    def forward(idx):
        return {"logits": x[idx] @ w.t(), "logits_target": x[idx] @ w_t.t()}

    def kl(a, b):  # KL(softmax(b) || softmax(a)), mean over rows, in float64
        a, b = a.double(), b.double()
        return float((b.softmax(-1) * (b.log_softmax(-1) - a.log_softmax(-1))).sum(-1).mean())

    w0 = w.detach().clone()
    kl_only = LossWeights(mse=0.0, kl=1.0)
    rep = distill(forward, [w], 6, steps=1, lr=1e-3, batch_size=6, weights=kl_only, autocast=torch.bfloat16)
    bf = lambda t: t.bfloat16().float()  # noqa: E731  (autocast's matmul reads and writes bfloat16)
    by_hand_bf16 = kl(bf(bf(x) @ bf(w0).t()), bf(bf(x) @ bf(w_t).t()))
    by_hand_fp32 = kl(x @ w0.t(), x @ w_t.t())
    assert rep.loss_first == pytest.approx(by_hand_bf16, rel=1e-2)
    assert abs(rep.loss_first - by_hand_bf16) < abs(by_hand_fp32 - by_hand_bf16) / 4  # the bf16 product, not fp32's
    assert w.dtype == torch.float32 and not torch.equal(w.detach(), w0)
    assert rep.settings["autocast"] == "bfloat16"
    assert "autocast" not in distill(forward, [w], 6, steps=1, lr=1e-3, batch_size=6, weights=kl_only).settings


def test_hierarchical_distill_autocast_trains_close_to_float32_and_is_recorded_and_checked(teacher, merged, tmp_path):
    student, prov = merged
    val, train = tokens(n=4, T=16, seed=6), tokens(n=8, T=16, seed=7)
    reps = {}
    for amp in (None, "bfloat16"):
        s = copy.deepcopy(student)
        reps[amp] = hierarchical_distill(adapter_for(s), adapter_for(teacher), train, prov, steps=4, lr=1e-3,
                                         batch_size=2, val_tokens=val, autocast=amp)
        assert all(p.dtype == torch.float32 for p in s.parameters())
    assert reps["bfloat16"]["loss_before"] == reps[None]["loss_before"]  # the held-apart loss: not in bf16
    assert reps["bfloat16"]["loss_first_step"] == pytest.approx(reps[None]["loss_first_step"], rel=2e-2)
    assert reps["bfloat16"]["loss_first_step"] != reps[None]["loss_first_step"]
    assert reps["bfloat16"]["loss_after"] == pytest.approx(reps[None]["loss_after"], rel=2e-2)
    assert reps["bfloat16"]["settings"]["autocast"] == "bfloat16" and reps[None]["settings"]["autocast"] is None
    with pytest.raises(ValueError, match="autocast"):
        hierarchical_distill(adapter_for(copy.deepcopy(student)), adapter_for(teacher), train, prov, steps=1,
                             autocast="float16")
    calib = tokens(n=8, T=16)
    res = come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=calib, compensate=None, distill_steps=2,
                             distill_autocast="bfloat16", distill_resume=tmp_path / "run")
    assert res.settings["distill"]["autocast"] == "bfloat16"
    with pytest.raises(ResumeError, match="autocast"):
        come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=calib, compensate=None, distill_steps=2,
                           distill_resume=tmp_path / "run")


def test_training_only_the_changed_layers_leaves_the_teachers_own_layers_as_they_are(teacher, merged):
    student, prov = merged
    own = [k for k, p in enumerate(prov) if isinstance(p, int)]  # kept whole, no compensation in the fixture
    changed = [k for k in range(len(prov)) if k not in own]
    assert own and changed, prov  # the fixture must have both kinds for this test to say anything
    train = tokens(n=6, T=16, seed=6)
    for layers, trained in (("changed", changed), ("all", list(range(len(prov))))):
        s = copy.deepcopy(student)
        rep = hierarchical_distill(adapter_for(s), adapter_for(teacher), train, prov, steps=4, lr=1e-3,
                                   batch_size=2, mse=0.0, kl=1.0, ce=1.0, layers=layers)
        assert rep["settings"]["trained_layers"] == trained
        for k, (a, b) in enumerate(zip(adapter_for(s).layers, adapter_for(student).layers)):
            same = all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
            assert same == (k not in trained), (layers, k)
        assert rep["loss_after"] < rep["loss_before"]  # on the training rows
        assert all(p.requires_grad for p in s.parameters()) == all(p.requires_grad for p in student.parameters())
    with pytest.raises(ValueError, match="layers must be"):
        hierarchical_distill(adapter_for(copy.deepcopy(student)), adapter_for(teacher), train, prov, steps=1,
                             layers="merged")
    same = copy.deepcopy(teacher)  # every layer the teacher's own: "changed" has nothing to train
    with pytest.raises(ValueError, match="nothing to train"):
        hierarchical_distill(adapter_for(same), adapter_for(teacher), train, list(range(len(adapter_for(same).layers))),
                             steps=1, layers="changed")


def test_early_stopping_stops_after_patience_evaluations_without_a_new_best():
    p = torch.nn.Parameter(torch.zeros(3))
    target = torch.tensor([1.0, 2.0, 3.0])
    vals = iter([5.0, 4.0, 4.5, 3.9, 4.0, 4.2, 1.0])

    rep = distill(lambda idx: {"hidden": p[None].expand(len(idx), -1), "hidden_target": target[None].expand(len(idx), -1)},
                  [p], 4, steps=10, lr=0.1, batch_size=1, validate=lambda: next(vals), eval_every=1, patience=2)
    # bests at steps 0, 1, 3; steps 4 and 5 are not better: stop after step 5
    assert rep.steps == 5 and rep.stopped_early and len(rep.history) == 5
    assert rep.validation == [[0, 5.0], [1, 4.0], [2, 4.5], [3, 3.9], [4, 4.0], [5, 4.2]]
    with pytest.raises(ValueError, match="validate"):
        distill(lambda idx: {}, [p], 4, steps=2, patience=1)


def test_progress_bar_shows_the_running_loss(monkeypatch):
    posts = []

    class Bar:
        def __init__(self, *a, **k):
            pass

        def update(self, n):
            pass

        def set_postfix(self, d):
            posts.append(dict(d))

        def close(self):
            pass

    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    p = torch.nn.Parameter(torch.zeros(2))
    t = torch.tensor([1.0, -1.0])
    rep = distill(lambda idx: {"hidden": p[None], "hidden_target": t[None]}, [p], 2, steps=3, lr=0.1, batch_size=1,
                  progress=True, validate=lambda: 0.5)
    assert len(posts) == 3
    assert [float(x["loss"]) for x in posts] == pytest.approx(
        [sum(rep.history[:i + 1]) / (i + 1) for i in range(3)], rel=1e-3)
    assert posts[-1]["val"] == "0.5"


# -- schedules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [[0, 2, 3, 5], [1, 2, 4, 5]])  # a gap inside; the first layer deleted
def test_layerwise_trains_each_layer_alone_on_the_teachers_states_at_its_span(teacher, keep, monkeypatch):
    student = delete_layers(teacher, keep)
    ref = copy.deepcopy(student)
    train, val = tokens(n=6, T=16, seed=5), tokens(n=2, T=16, seed=6)
    from come_fast import posttrain

    trained = []
    real = posttrain.distill

    def spy(forward, params, *a, **k):
        trained.append((k["phase"], {id(p) for p in params},
                        {id(p) for p in student.parameters() if p.requires_grad}))
        return real(forward, params, *a, **k)

    monkeypatch.setattr(posttrain, "distill", spy)
    rep = hierarchical_distill(adapter_for(student), adapter_for(teacher), train, keep, steps=5, lr=3e-3,
                               batch_size=2, val_tokens=val, schedule="layerwise", joint_steps=0)
    L = student.config.num_hidden_layers
    sp = spans(keep, 6)
    sp[0] = (0, sp[0][1])  # the first layer's input: the embeddings
    learn = [k for k in range(L) if sp[k][1] - sp[k][0] > 1]  # the others are the teacher's layer alone: skipped
    assert 2 <= len(learn) < L
    # one run per layer to learn, each on that layer's parameters only (nothing else takes gradients), no joint pass
    assert [t[0] for t in trained] == [f"layer {k}" for k in learn]
    for k, (_, ps, grads) in zip(learn, trained):
        assert ps == grads == {id(p) for p in student.model.layers[k].parameters()}
    assert rep["joint_steps"] == 0 and rep["schedule"] == "layerwise"
    assert [r["spans"][0] for r in rep["layers"]] == [list(s) for s in sp]
    for k, r in enumerate(rep["layers"]):
        if k not in learn:
            assert r["skipped"] and r["steps"] == 0 and layer_loss_by_hand(ref, teacher, val, keep, k, val) == 0
            assert all(torch.equal(p, q) for p, q in zip(ref.model.layers[k].parameters(),
                                                         student.model.layers[k].parameters()))
    rep["layers"] = [rep["layers"][k] for k in learn]
    for k, r in zip(learn, rep["layers"]):
        # before: the untrained layer on the teacher's input; after: the trained one; by hand
        assert r["validation"][0]["loss"] == pytest.approx(layer_loss_by_hand(ref, teacher, val, keep, k, val), rel=1e-4)
        assert r["validation"][-1]["loss"] == pytest.approx(
            layer_loss_by_hand(student, teacher, val, keep, k, val), rel=1e-4)
        assert r["validation"][-1]["loss"] < r["validation"][0]["loss"]
    assert rep["tokens"]["seen"] == len(learn) * 5 * 2 * 16
    # the report's loss is the joint loss on the validation rows, by hand
    assert rep["loss_after"] == pytest.approx(joint_loss_by_hand(student, teacher, val, keep), rel=1e-4)


def test_layerwise_groups_disk_cache_and_joint_pass(teacher):
    prov = [0, 2, 3, 5]  # groups [0, 1] and [2, 3], each with a layer whose span is longer than itself
    student = delete_layers(teacher, prov)
    train, val = tokens(n=4, T=16, seed=7), tokens(n=2, T=16, seed=8)
    runs = {}
    for cache in (None, 0):  # in memory; every boundary in a memory-mapped file
        s = copy.deepcopy(student)
        rep = hierarchical_distill(adapter_for(s), adapter_for(teacher), train, prov, steps=3, lr=1e-3, batch_size=2,
                                   val_tokens=val, schedule="layerwise", group=2, cache_bytes=cache)
        runs[cache] = (s, rep)
    (a, rep), (b, _) = runs[None], runs[0]
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert [r["layers"] for r in rep["layers"]] == [[0, 1], [2, 3]]
    assert rep["joint_steps"] == 1 and rep["steps"] == 3  # a tenth of the steps, rounded up
    assert rep["tokens"]["seen"] == (2 * 3 + 1) * 2 * 16
    # a group's first loss: both layers chained from the teacher's input, each to its span's end
    first = rep["layers"][0]["validation"][0]["loss"]
    x = boundaries(teacher, val)
    sp = spans(prov, 6)
    p = torch.arange(16)[None].expand(2, -1)
    with torch.inference_mode():
        y0 = student.model.layers[0](x[0], position_ids=p, position_embeddings=student.model.rotary_emb(x[0], p))
        y1 = student.model.layers[1](y0, position_ids=p, position_embeddings=student.model.rotary_emb(x[0], p))
    want = (F.mse_loss(y0, x[sp[0][1]]) / x[sp[0][1]].pow(2).mean()
            + F.mse_loss(y1, x[sp[1][1]]) / x[sp[1][1]].pow(2).mean()) / 2
    assert first == pytest.approx(float(want), rel=1e-4)


def test_compress_with_both_schedules_lowers_the_validation_loss(teacher):
    calib = tokens(n=8, T=16)
    data = tokens(n=12, T=16, seed=9)
    for schedule in ("joint", "layerwise"):
        res = come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=calib, compensate=None,
                                 distill_steps=8, distill_lr=3e-4, distill_data=data, distill_val_rows=2,
                                 distill_schedule=schedule)
        rep = res.report[-1]["distillation"]
        assert rep["loss_on"] == "validation rows" and rep["loss_after"] < rep["loss_before"], schedule
        assert res.settings["distill"]["schedule"] == schedule and res.settings["distill"]["val_rows"] == 2


# -- long runs --------------------------------------------------------------------------------

class Crash(Exception):
    pass


def crash_at(step, label=None):
    def progress(lab, done, total):
        if done == step and (label is None or lab.startswith(label)):
            raise Crash(f"{lab} {done}")
    return progress


@pytest.mark.parametrize("schedule, crash, label", [("joint", 5, None), ("layerwise", 2, "layer 2")])
def test_resume_after_a_crash_gives_the_uninterrupted_result_bitwise(teacher, merged, tmp_path, schedule, crash,
                                                                     label):
    if schedule == "joint":
        student, prov = merged
    else:  # layers 0 and 2 to learn (1 and 3 are the teacher's, alone in their spans): crash in the second
        prov = [0, 2, 3, 5]
        student = delete_layers(teacher, prov)
    train, val = tokens(n=6, T=16, seed=10), tokens(n=2, T=16, seed=11)
    kw = dict(steps=7, lr=2e-3, batch_size=2, val_tokens=val, eval_every=2, schedule=schedule, save_every=2)

    straight = copy.deepcopy(student)
    rep0 = hierarchical_distill(adapter_for(straight), adapter_for(teacher), train, prov, **kw)

    resumed = copy.deepcopy(student)
    with pytest.raises(Crash):
        hierarchical_distill(adapter_for(resumed), adapter_for(teacher), train, prov, resume=tmp_path / "ck",
                             progress=crash_at(crash, label), **kw)
    assert (tmp_path / "ck" / RunCheckpoint.FILE).is_file()
    assert not list((tmp_path / "ck").glob("*.tmp"))
    fresh = copy.deepcopy(student)  # a new process: the compressed model again, the trained state from the folder
    rep1 = hierarchical_distill(adapter_for(fresh), adapter_for(teacher), train, prov, resume=tmp_path / "ck", **kw)
    assert rep1["resumed"]
    for (n, a), b in zip(straight.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n
    assert rep1["loss_after"] == rep0["loss_after"] and rep1["validation"] == rep0["validation"]
    assert rep1["loss_before"] == rep0["loss_before"]
    if schedule == "layerwise":  # the interrupted phase continued from its checkpoint at step 2
        assert rep1["layers"][2]["resumed_from"] == 2 and rep1["layers"][0]["resumed_from"] is None
        assert rep1["layers"][0]["steps"] == 7 and rep1["layers"][1]["skipped"]
    # a finished run's folder: resuming again trains nothing and gives the same weights
    again = copy.deepcopy(student)
    hierarchical_distill(adapter_for(again), adapter_for(teacher), train, prov, resume=tmp_path / "ck", **kw)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), again.parameters()))


@pytest.mark.parametrize("schedule, crash", [("joint", crash_at(4, "distillation")), ("layerwise", crash_at(2, "layer 3"))])
def test_compress_resumes_an_interrupted_distillation(teacher, tmp_path, schedule, crash):
    calib = tokens(n=8, T=16)
    # keep_last=0: the merges (hence the layers the layerwise schedule trains, and the crash point) fixed
    kw = dict(target_layers=4, calib=calib, compensate=None, distill_steps=6, distill_lr=2e-3, keep_last=0,
              distill_data=tokens(n=10, T=16, seed=12), distill_val_rows=2, distill_schedule=schedule)
    straight = come_fast.compress(copy.deepcopy(teacher), **kw)
    model = copy.deepcopy(teacher)
    before = params_of(model)
    ck = dict(distill_resume=tmp_path / "r", distill_save_every=1)
    with pytest.raises(Crash):
        come_fast.compress(model, progress=crash, **ck, **kw)
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # the caller's model as given
    res = come_fast.compress(model, **ck, **kw)
    assert res.report[-1]["distillation"]["resumed"]
    sd = straight.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in res.model.state_dict().items())


def test_checkpoints_are_atomic(teacher, merged, tmp_path, monkeypatch):
    student, prov = merged
    train = tokens(n=4, T=16, seed=13)
    kw = dict(steps=4, lr=2e-3, batch_size=2, resume=tmp_path / "ck", save_every=1)
    real = torch.save
    calls = []

    def dying_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) in (1, 4):  # the first and the third checkpoint die half written
            f.write(b"half a checkpoint")
            raise Crash("killed while writing")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    s = copy.deepcopy(student)
    with pytest.raises(Crash):  # no checkpoint yet: the folder holds only the cut-off temporary file
        hierarchical_distill(adapter_for(s), adapter_for(teacher), train, prov, **kw)
    assert not (tmp_path / "ck" / RunCheckpoint.FILE).exists()
    s = copy.deepcopy(student)
    with pytest.raises(Crash):  # starts afresh, writes steps 1 and 2, dies writing step 3
        hierarchical_distill(adapter_for(s), adapter_for(teacher), train, prov, **kw)
    monkeypatch.setattr(torch, "save", real)
    st = torch.load(tmp_path / "ck" / RunCheckpoint.FILE, weights_only=True)
    assert st["phase_state"]["step"] == 2  # the last whole checkpoint, intact
    fresh = copy.deepcopy(student)
    hierarchical_distill(adapter_for(fresh), adapter_for(teacher), train, prov, **kw)
    straight = copy.deepcopy(student)
    hierarchical_distill(adapter_for(straight), adapter_for(teacher), train, prov, **{**kw, "resume": None})
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), fresh.parameters()))


def test_a_resume_folder_of_another_run_is_refused_before_anything_runs(teacher, merged, tmp_path, monkeypatch):
    student, prov = merged
    train = tokens(n=4, T=16, seed=14)
    folder = tmp_path / "ck"
    s = copy.deepcopy(student)
    hierarchical_distill(adapter_for(s), adapter_for(teacher), train, prov, steps=2, lr=1e-3, resume=folder)
    blob = (folder / RunCheckpoint.FILE).read_bytes()
    other = copy.deepcopy(student)
    ref = params_of(other)
    with pytest.raises(ResumeError, match="another run .*lr"):
        hierarchical_distill(adapter_for(other), adapter_for(teacher), train, prov, steps=2, lr=2e-3, resume=folder)
    assert (folder / RunCheckpoint.FILE).read_bytes() == blob
    assert all(torch.equal(v, ref[k]) for k, v in other.named_parameters())
    # through compress: refused before the compression runs
    monkeypatch.setitem(methods.REGISTRY, "come", lambda ctx, n: pytest.fail("compressed before the check"))
    with pytest.raises(ResumeError, match="another run"):
        come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=tokens(n=8, T=16), compensate=None,
                           distill_steps=2, distill_lr=1e-3, distill_resume=folder)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ResumeError, match="not empty"):
        come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=tokens(n=8, T=16), compensate=None,
                           distill_steps=2, distill_resume=junk)
    assert (folder / RunCheckpoint.FILE).read_bytes() == blob and (junk / "notes.txt").read_text() == "mine"


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(teacher, merged):
    student, prov = merged
    ids = tokens(n=2, T=16, seed=15)
    grads, kept = {}, {}
    for gc in (False, True):
        s = copy.deepcopy(student)
        a = adapter_for(s)
        j = _Joint(a, adapter_for(teacher), prov, 1.0, 1.0, gc, ids, 2)
        from come_fast.distill import LossWeights, loss_terms

        nbytes = []

        def pack(t):
            nbytes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = sum(loss_terms(j.forward_on(ids)(torch.arange(2)), LossWeights(mse=1, kl=1)).values())
        loss.backward()
        grads[gc] = {n: p.grad.clone() for n, p in s.model.layers.named_parameters()}
        kept[gc] = sum(nbytes)
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-6, atol=1e-7)
    assert kept[True] < 0.7 * kept[False]
    # and the trained model is the same
    calib = tokens(n=8, T=16)
    r = [come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=calib, compensate=None, distill_steps=3,
                            distill_lr=1e-3, distill_grad_checkpoint=gc).model for gc in (False, True)]
    for a, b in zip(r[0].parameters(), r[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- bad input: one clear error, nothing trained ------------------------------------------------

@pytest.mark.parametrize("opts, words", [
    ({"distill_schedule": "both"}, "distill_schedule"),
    ({"distill_tokens": 0}, "distill_tokens"),
    ({"distill_val_rows": -1}, "distill_val_rows"),
    ({"distill_eval_every": 0}, "distill_eval_every"),
    ({"distill_grad_checkpoint": "yes"}, "distill_grad_checkpoint"),
    ({"distill_resume": 3}, "distill_resume"),
    ({"distill_data": 5}, "distill_data"),
    ({"distill_joint_steps": 2}, "layerwise"),
    ({"distill_eval_every": 2}, "distill_val_rows"),
    ({"distill_val_rows": 8}, "no training rows"),
    ({"distill_tokens": 20}, "less than one batch"),
    ({"distill_data": []}, "distill_data.*empty"),
    ({"distill_data": ["w1 w2 w3"]}, "distill_data.*too short.*distill_steps"),
    ({"distill_data": tokens(n=2, T=16), "distill_val_rows": 2}, "no training rows"),
    ({"distill_save_every": 5}, "distill_resume"),
    ({"distill_mse": 0, "distill_kl": 0}, "no loss"),
    ({"distill_ce": -1}, "distill_ce"),
    ({"distill_temperature": 0}, "distill_temperature"),
    ({"distill_temperature": 2.0, "distill_kl": 0, "distill_ce": 1}, "distill_temperature.*KL"),
    ({"distill_autocast": "float16"}, "distill_autocast"),
])
def test_bad_distillation_input_is_one_clear_error_before_any_work(teacher, opts, words, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "come", lambda ctx, n: pytest.fail("compressed before the check"))
    model = copy.deepcopy(teacher)
    layers = list(model.model.layers)
    with pytest.raises(ValueError, match=words):
        come_fast.compress(model, target_layers=4, calib=tokens(n=8, T=16), compensate=None, distill_steps=2,
                           tokenizer=word_tokenizer(), seq_len=16, **opts)
    assert list(model.model.layers) == layers


def test_options_without_distillation_and_wrong_teachers_are_refused(teacher):
    ids = tokens(n=8, T=16)
    with pytest.raises(ValueError, match="distillation is off"):
        come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=ids, distill_data=ids)
    with pytest.raises(ValueError, match="vocabulary"):
        come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=ids, distill_steps=2,
                           teacher=tiny_model("llama", vocab_size=130))
    with pytest.raises(ValueError, match="teacher is a qwen2 model"):
        come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=ids, distill_steps=2,
                           teacher=tiny_model("qwen2"))
    with pytest.raises(DistillDataError, match="distill_data"):
        distill_rows(None, teacher, None, rows=2, seq_len=16)


def test_cli_distill_flags(tmp_path, capsys):
    from safetensors.torch import save_file

    from come_fast.cli import main

    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    save_file({"input_ids": tokens(n=8, T=32)}, str(tmp_path / "c.safetensors"))
    save_file({"input_ids": tokens(n=12, T=32, seed=3)}, str(tmp_path / "d.safetensors"))
    code = main(["compress", "--model", str(d), "--target-layers", "4", "--calib", str(tmp_path / "c.safetensors"),
                 "--distill-steps", "4", "--distill-lr", "1e-3", "--distill-data", str(tmp_path / "d.safetensors"),
                 "--distill-val-rows", "2", "--distill-eval-every", "2", "--distill-schedule", "layerwise",
                 "--distill-joint-steps", "2", "--distill-resume", str(tmp_path / "ck"), "--distill-grad-checkpoint",
                 "--option", "distill_temperature=2", "--option", "distill_autocast=bfloat16", "--out", str(tmp_path / "o"),
                 "--quiet", "--compensate", "none"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "distillation (layerwise)" in out and "validation loss by tokens seen: 0:" in out
    meta = json.loads((tmp_path / "o" / "come_fast.json").read_text())
    s = meta["settings"]["distill"]
    assert s["schedule"] == "layerwise" and s["joint_steps"] == 2 and s["grad_checkpoint"] and s["val_rows"] == 2
    assert s["temperature"] == 2.0 and s["autocast"] == "bfloat16"
    assert (tmp_path / "ck" / RunCheckpoint.FILE).is_file()
    code = main(["compress", "--model", str(d), "--target-layers", "4", "--calib", str(tmp_path / "c.safetensors"),
                 "--distill-steps", "2", "--distill-tokens", "0", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and "--distill-tokens" in capsys.readouterr().err
    for bad, words in (("distill_kl=-1", "distill_kl=-1"), ("distill_foo=1", "unknown distillation option")):
        code = main(["compress", "--model", str(d), "--target-layers", "4", "--calib", str(tmp_path / "c.safetensors"),
                     "--distill-steps", "2", "--option", bad, "--out", str(tmp_path / "y"), "--quiet"])
        assert code == 2 and words in capsys.readouterr().err
        assert not (tmp_path / "y").exists()
