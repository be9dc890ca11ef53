"""The depth-pruning baselines on tiny random models. Each method's defining
rule is checked against an independent computation: Hugging Face's own
``hidden_states`` and ``model(ids, labels=ids).loss``, layers deleted from a
deepcopy by hand, weights merged by hand, sublayers bypassed by zeroing their
output projections. Plus save/reload for every method, the trainer, and the
sweep's bookkeeping."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import come_fast
from come_fast import methods
from come_fast.adapters import adapter_for, count_parameters, renumber
from come_fast.merge import rdsc_merge
from tiny import FAMILIES, tiny_model, tokens

BASELINES = ["shortgpt", "reverse", "sleb", "taylor+", "magnitude+", "ppl", "laco", "slm", "streamline", "finercut"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest


def hidden_states(model, ids):
    with torch.inference_mode():
        return model(ids, output_hidden_states=True, use_cache=False).hidden_states


def lm_loss(model, ids) -> float:
    with torch.inference_mode():
        return float(model(ids, labels=ids, use_cache=False).loss)


def without_layers(model, drop):
    m = copy.deepcopy(model)
    keep = [l for i, l in enumerate(m.model.layers) if i not in set(drop)]
    m.model.layers = torch.nn.ModuleList(keep)
    renumber(adapter_for(m))
    return m


def logits(model, ids):
    with torch.inference_mode():
        return model(ids, use_cache=False).logits


# -- ShortGPT, Reverse -------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_shortgpt_deletes_the_lowest_block_influence(family):
    model = tiny_model(family, num_hidden_layers=8)
    ids = tokens()
    hs = hidden_states(model, ids)
    bi = [float((1 - F.cosine_similarity(hs[l].reshape(-1, 64), hs[l + 1].reshape(-1, 64), dim=-1)
                 .clamp(0, 1)).mean()) for l in range(8)]
    want = sorted(sorted(range(8), key=lambda l: bi[l])[:3])
    ref = copy.deepcopy(model)
    res = come_fast.compress(model, target_layers=5, method="shortgpt", calib=ids)
    assert res.report[0]["removed"] == want
    assert res.report[0]["block_influence"] == pytest.approx(bi, rel=1e-5)
    assert res.provenance == [l for l in range(8) if l not in want]
    assert torch.equal(logits(model, ids), logits(without_layers(ref, want), ids))


def test_reverse_deletes_the_last_layers():
    model = tiny_model("mistral", num_hidden_layers=7)
    ref = copy.deepcopy(model)
    ids = tokens()
    res = come_fast.compress(model, target_layers=4, method="reverse", calib=ids)
    assert res.provenance == [0, 1, 2, 3] and model.config.num_hidden_layers == 4
    assert torch.equal(logits(model, ids), logits(without_layers(ref, [4, 5, 6]), ids))


def test_reverse_recovery_trains_only_the_tail_and_lowers_the_loss():
    model = tiny_model("llama", num_hidden_layers=7)
    ids = tokens()
    res = come_fast.compress(model, target_layers=5, method="reverse", calib=ids, recover=True, recover_steps=30,
                             recover_lr=3e-3)
    ref = without_layers(tiny_model("llama", num_hidden_layers=7), [5, 6])
    rec = res.report[1]["recovery"]
    assert rec["trained_layers"] == [2, 3, 4]
    assert rec["loss_after"] < rec["loss_before"]
    for l in range(5):
        same = all(torch.equal(p, q) for p, q in zip(model.model.layers[l].parameters(),
                                                      ref.model.layers[l].parameters()))
        assert same == (l < 2), l
    assert not torch.equal(model.lm_head.weight, ref.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)  # untied here
    assert all(p.requires_grad for p in model.parameters())  # flags restored


class _PlainHead(torch.nn.Linear):
    """The same linear map with its own forward: the recovery then takes the
    materialised-logits loss instead of the fused linear + KL."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("ce", [0.0, 0.5])
def test_reverse_recovery_fused_loss_matches_materialised_logits(ce):
    ids = tokens()
    runs = []
    for plain in (False, True):
        model = tiny_model("llama", num_hidden_layers=7)
        if plain:
            head = _PlainHead(model.lm_head.in_features, model.lm_head.out_features, bias=False)
            head.weight = model.lm_head.weight
            model.lm_head = head
        res = come_fast.compress(model, target_layers=5, method="reverse", calib=ids, recover=True,
                                 recover_steps=5, recover_lr=3e-3, recover_ce=ce)
        runs.append((res.report[1]["recovery"], model))
    (fused, m_fused), (plain, m_plain) = runs
    assert fused["loss_before"] == pytest.approx(plain["loss_before"], rel=1e-5)
    assert fused["loss_after"] == pytest.approx(plain["loss_after"], rel=1e-4)
    assert fused["loss_after"] < fused["loss_before"]
    torch.testing.assert_close(m_fused.lm_head.weight, m_plain.lm_head.weight, rtol=1e-4, atol=1e-5)


# -- loss-based: SLEB, PPL ----------------------------------------------------------------

def test_sleb_removes_the_argmin_of_a_plain_loss_loop_greedily():
    model = tiny_model("qwen2", num_hidden_layers=7)
    ids = tokens()
    plain = copy.deepcopy(model)
    res = come_fast.compress(model, target_layers=5, method="sleb", calib=ids)
    removed_orig = []
    for step in res.report:
        losses = [lm_loss(without_layers(plain, [l]), ids) for l in range(len(plain.model.layers))]
        assert step["loss_without"] == pytest.approx(losses, rel=1e-5)
        best = min(range(len(losses)), key=lambda l: losses[l])
        assert step["removed"] == best
        removed_orig.append(step["removed_original"])
        plain = without_layers(plain, [best])  # greedy: the next step scores the smaller model
    assert res.provenance == [l for l in range(7) if l not in removed_orig]
    assert torch.equal(logits(model, ids), logits(plain, ids))


def test_sleb_intermediate_steps_equal_separate_runs():
    """What the sweep relies on to take the 10% and 20% cells from one 30% run."""
    ids = tokens()
    x = tokens(n=1, T=7)
    snaps = {}
    come_fast.compress(tiny_model("llama", num_hidden_layers=7), target_layers=4, method="sleb", calib=ids,
                       on_step=lambda p: snaps.__setitem__(p.layers_after, (p.provenance, logits(p.model, x))))
    assert sorted(snaps) == [4, 5, 6]
    for k in (6, 5):
        model = tiny_model("llama", num_hidden_layers=7)
        res = come_fast.compress(model, target_layers=k, method="sleb", calib=ids)
        assert res.provenance == snaps[k][0]
        assert torch.equal(logits(model, x), snaps[k][1])


def test_ppl_removes_the_layers_whose_single_removal_hurts_least():
    model = tiny_model("llama", num_hidden_layers=7)
    ids = tokens()
    losses = [lm_loss(without_layers(model, [l]), ids) for l in range(7)]
    res = come_fast.compress(model, target_layers=4, method="ppl", calib=ids)
    assert res.report[0]["loss_without"] == pytest.approx(losses, rel=1e-5)
    assert res.report[0]["removed"] == sorted(sorted(range(7), key=lambda l: losses[l])[:3])


def test_score_rows_limits_the_scoring_data():
    model = tiny_model("llama", num_hidden_layers=6)
    ids = tokens(n=6)
    losses = [lm_loss(without_layers(model, [l]), ids[:2]) for l in range(6)]
    res = come_fast.compress(model, target_layers=5, method="ppl", calib=ids, score_rows=2)
    assert res.settings["score_rows"] == 2
    assert res.report[0]["loss_without"] == pytest.approx(losses, rel=1e-5)


# -- Taylor+ / Magnitude+ -------------------------------------------------------------------

def test_taylor_plus_scores_by_hand_and_protects_first_4_last_2():
    model = tiny_model("llama", num_hidden_layers=10)
    ids = tokens()
    ref = copy.deepcopy(model)
    ref.zero_grad()
    out = ref(ids, labels=ids, use_cache=False)
    out.loss.backward()
    want = [sum(float((p.detach() * p.grad).abs().sum()) for p in layer.parameters() if p.dim() == 2)
            for layer in ref.model.layers]
    res = come_fast.compress(model, target_layers=7, method="taylor+", calib=ids)
    st = res.report[0]
    assert st["scores"] == pytest.approx(want, rel=1e-4)
    assert st["protected"] == [0, 1, 2, 3, 8, 9]
    assert st["removed"] == sorted(sorted(range(4, 8), key=lambda l: want[l])[:3])
    assert all(p.grad is None for p in model.parameters())


def test_magnitude_plus_scores_by_hand_and_never_takes_protected_layers():
    model = tiny_model("qwen2", num_hidden_layers=10)
    with torch.no_grad():  # make the protected layers the smallest: they must still stay
        for l in (0, 1, 9):
            for p in model.model.layers[l].parameters():
                p.mul_(0.01)
    want = [sum(float(p.detach().abs().sum()) for p in layer.parameters() if p.dim() == 2) for layer in model.model.layers]
    res = come_fast.compress(model, target_layers=8, method="magnitude+", calib=tokens())
    st = res.report[0]
    assert st["scores"] == pytest.approx(want, rel=1e-6)
    assert st["removed"] == sorted(sorted(range(4, 8), key=lambda l: want[l])[:2])
    assert not set(st["removed"]) & {0, 1, 2, 3, 8, 9}
    with pytest.raises(ValueError, match="protected"):
        come_fast.compress(tiny_model("llama", num_hidden_layers=10), target_layers=5, method="magnitude+",
                           calib=tokens())


# -- LaCo, SLM --------------------------------------------------------------------------

def hand_rdsc(base, others):
    """theta_l + sum_k (theta_{l+k} - theta_l) on attention/MLP tensors, the base's norms."""
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    for k in sd:
        if k.startswith(("self_attn.", "mlp.")):
            sd[k] = base.state_dict()[k] + sum(o.state_dict()[k] - base.state_dict()[k] for o in others)
    return sd


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_rdsc_merge_is_the_paper_formula(family):
    model = tiny_model(family)
    a = adapter_for(model)
    layers = a.layers
    merged = rdsc_merge(a, layers[1], [layers[2], layers[3]])
    want = hand_rdsc(layers[1], [layers[2], layers[3]])
    got = merged.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    # not the public code's in-place variant, which ends up as the last layer
    assert not torch.allclose(got["mlp.up_proj.weight"], layers[3].state_dict()["mlp.up_proj.weight"])


def test_laco_merges_by_the_rule_and_accepts_on_final_state_similarity():
    model = tiny_model("llama", num_hidden_layers=8)
    orig = copy.deepcopy(model)
    ids = tokens(n=4)
    # C = 4: the scan starts at l = 7 - 4 = 3 and folds layers 4, 5, 6 into 3
    res = come_fast.compress(model, target_layers=5, method="laco", calib=ids, laco_threshold=-1.0,
                             laco_sentences=3)
    first = res.report[0]
    assert first["base"] == 3 and first["absorbed"] == [4, 5, 6] and first["accepted"]
    assert res.provenance == [0, 1, 2, [3, 4, 5, 6], 7]
    want = hand_rdsc(orig.model.layers[3], [orig.model.layers[k] for k in (4, 5, 6)])
    for k, v in model.model.layers[3].state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    # similarity: per-sentence cosine of flattened final hidden states (after the norm), averaged
    h0 = hidden_states(orig, ids[:3])[-1]
    h1 = hidden_states(model, ids[:3])[-1]
    sim = float(F.cosine_similarity(h0.reshape(3, -1), h1.reshape(3, -1), dim=-1).mean())
    assert first["similarity"] == pytest.approx(sim, rel=1e-5)


def test_laco_rejects_below_threshold_and_relaxes_to_reach_the_target():
    model = tiny_model("llama", num_hidden_layers=8)
    res = come_fast.compress(model, target_layers=6, method="laco", calib=tokens(n=4), laco_threshold=1.5,
                             laco_relax=0.25)
    rejected = [s for s in res.report if not s["accepted"]]
    assert rejected and all(s["similarity"] <= s["threshold"] for s in rejected)
    assert all(s["similarity"] > s["threshold"] for s in res.report if s["accepted"])
    assert res.settings["passes"] > 1 and res.layers_after == 6


def test_slm_grows_a_window_from_the_top_while_similar():
    model = tiny_model("qwen3", num_hidden_layers=8)
    orig = copy.deepcopy(model)
    ids = tokens(n=4)
    res = come_fast.compress(model, target_layers=5, method="slm", calib=ids, slm_threshold=-1.0)
    # always similar enough: one window from the top, as large as the target allows
    st = res.report[0]
    assert st["merged"] == [4, 5, 6, 7] and [t["window"] for t in st["tried"]] == [[6, 7], [5, 7], [4, 7]]
    assert res.provenance == [0, 1, 2, 3, [4, 5, 6, 7]]
    want = hand_rdsc(orig.model.layers[4], [orig.model.layers[k] for k in (5, 6, 7)])
    for k, v in model.model.layers[4].state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    # a window stops growing at the first merge below the threshold; the last good one is merged
    model = tiny_model("qwen3", num_hidden_layers=8)
    res = come_fast.compress(model, target_layers=6, method="slm", calib=ids, slm_threshold=0.0)
    for s in res.report:
        sims = [t["similarity"] for t in s["tried"]]
        passed = [x >= s["threshold"] for x in sims]
        assert passed == sorted(passed, reverse=True)  # a run of passes, then at most one failure
        if "merged" in s:
            assert s["merged"][0] == s["tried"][sum(passed) - 1]["window"][0]


# -- LLM-Streamline ------------------------------------------------------------------------

def test_streamline_replaces_the_most_similar_block_and_training_lowers_the_mse():
    model = tiny_model("llama", num_hidden_layers=8)
    orig = copy.deepcopy(model)
    ids = tokens()
    hs = hidden_states(orig, ids)
    b = 3  # n_remove = 2 -> a block of 3 layers becomes 1
    sims = [float(F.cosine_similarity(hs[j].reshape(-1, 64), hs[j + b].reshape(-1, 64), dim=-1).mean())
            for j in range(8 - b + 1)]
    j = max(range(len(sims)), key=lambda k: sims[k])
    res = come_fast.compress(model, target_layers=6, method="streamline", calib=ids, streamline_steps=40,
                             streamline_lr=1e-3)
    st = res.report[0]
    assert st["similarity"] == pytest.approx(sims, rel=1e-5)
    assert st["block"] == list(range(j, j + b))
    assert res.provenance == list(range(j)) + [list(range(j, j + b))] + list(range(j + b, 8))
    # MSE to the block's output, by hand, before (copy of the first layer) and after training
    a = adapter_for(orig)
    x = hs[j]
    pos = torch.arange(x.shape[1])[None]
    pe = a.rotary(x, pos)
    with torch.inference_mode():
        y = x
        for k in range(j, j + b):
            y = orig.model.layers[k](y, position_embeddings=pe, attention_mask=None)
        before = F.mse_loss(orig.model.layers[j](x, position_embeddings=pe, attention_mask=None), y)
        after = F.mse_loss(model.model.layers[j](x, position_embeddings=pe, attention_mask=None), y)
    assert float(after) < float(before)
    assert st["mse_before"] == pytest.approx(float(before), rel=1e-4)
    assert st["mse_after"] == pytest.approx(float(after), rel=1e-4)


# -- FinerCut ------------------------------------------------------------------------------

def bypassed(model, attention=(), mlp=()):
    """Independent bypass: zero the output projection (and its bias) of each sublayer."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for l in attention:
            o = m.model.layers[l].self_attn.o_proj
            o.weight.zero_()
            if o.bias is not None:
                o.bias.zero_()
        for l in mlp:
            m.model.layers[l].mlp.down_proj.weight.zero_()
    return m


def js(p_logits, q_logits):
    lp, lq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    m = (0.5 * (lp.exp() + lq.exp())).log()
    return float((0.5 * (lp.exp() * (lp - m)).sum(-1) + 0.5 * (lq.exp() * (lq - m)).sum(-1)).mean())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_finercut_first_choice_is_the_argmin_js_divergence(family):
    model = tiny_model(family, num_hidden_layers=5)
    ids = tokens(n=4)
    ref = logits(model, ids)
    div = {}
    for l in range(5):
        div[(l, "attention")] = js(ref, logits(bypassed(model, attention=[l]), ids))
        div[(l, "mlp")] = js(ref, logits(bypassed(model, mlp=[l]), ids))
    res = come_fast.compress(model, ratio=0.2, method="finercut", calib=ids)
    first = res.report[0]
    best = min(div, key=div.get)
    assert tuple(first["removed"]) == best
    assert first["divergence"] == pytest.approx(div[best], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("family", ["llama-mha", "qwen3"])
def test_finercut_meets_the_parameter_target_and_reloads_skipping_exactly_its_sublayers(family, tmp_path):
    model = tiny_model(family, num_hidden_layers=6)
    orig = copy.deepcopy(model)
    ids = tokens()
    total = count_parameters(orig)
    res = come_fast.compress(model, ratio=0.2, method="finercut", calib=ids)
    target = res.settings["target_parameters"]
    assert target == round(0.2 * total)
    removed = total - count_parameters(model)
    assert removed == res.report[-1]["removed_total"]
    layer = orig.model.layers[0]
    sizes = [sum(p.numel() for m in (layer.self_attn, layer.input_layernorm) for p in m.parameters()),
             sum(p.numel() for m in (layer.mlp, layer.post_attention_layernorm) for p in m.parameters())]
    assert {s["parameters"] for s in res.report} <= set(sizes)
    assert abs(removed - target) <= max(sizes) / 2  # "nearest": no remaining sublayer would get closer
    spec = res.settings["removed_sublayers_original"]
    assert spec["attention"] or spec["mlp"]
    hand = bypassed(orig, attention=spec["attention"], mlp=spec["mlp"])
    x = tokens(n=2, T=9)
    torch.testing.assert_close(logits(model, x), logits(hand, x), rtol=0, atol=1e-5)
    out = come_fast.save(res, tmp_path / "fc")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["come_fast_sublayers"] == res.settings["sublayers"]
    re, _, meta = come_fast.load(out)
    assert meta["method"] == "finercut"
    assert count_parameters(re) == count_parameters(model)
    torch.testing.assert_close(logits(re, x), logits(hand, x), rtol=0, atol=1e-5)
    assert torch.equal(logits(re, x), logits(model, x))
    # stock transformers reads it through the remote code the folder carries
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert torch.equal(logits(stock, x), logits(model, x))
    with torch.inference_mode():
        g = re.generate(x[:1], max_new_tokens=4, do_sample=False)
        g0 = re.generate(x[:1], max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(g, g0)


def test_finercut_replay_of_a_longer_run_equals_a_separate_run():
    from come_fast.methods.finercut import replay

    ids = tokens(n=4)
    x = tokens(n=1, T=7)
    long = come_fast.compress(tiny_model("qwen2", num_hidden_layers=5), ratio=0.45, method="finercut", calib=ids)
    model = tiny_model("qwen2", num_hidden_layers=5)
    short = come_fast.compress(model, ratio=0.2, method="finercut", calib=ids)
    assert len(long.report) > len(short.report)
    rebuilt = tiny_model("qwen2", num_hidden_layers=5)
    outcome, k = replay(rebuilt, long.report, short.settings["target_parameters"])
    assert k == len(short.report)
    assert outcome.settings["sublayers"] == short.settings["sublayers"]
    assert outcome.provenance == short.provenance
    assert torch.equal(logits(rebuilt, x), logits(model, x))


def test_a_layer_without_attention_keeps_the_kv_cache_length():
    from come_fast.sublayers import remove_sublayer

    model = tiny_model("llama", num_hidden_layers=3)
    remove_sublayer(model.model.layers[0], "attention")  # layer 0's cache entry gives generate its position
    remove_sublayer(model.model.layers[1], "mlp")
    x = tokens(n=1, T=6)
    with torch.inference_mode():
        g = model.generate(x, max_new_tokens=5, do_sample=False)
        g0 = model.generate(x, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(g, g0)
    hand = bypassed(tiny_model("llama", num_hidden_layers=3), attention=[0], mlp=[1])
    assert torch.equal(logits(model, x), logits(hand, x))


# -- every method: registry, save/reload ----------------------------------------------------

def test_every_baseline_is_registered():
    assert set(BASELINES) <= set(methods.available())


@pytest.mark.parametrize("method", BASELINES)
def test_save_reload_every_method(method, tmp_path):
    family = FAMILIES[BASELINES.index(method) % len(FAMILIES)]
    model = tiny_model(family, num_hidden_layers=8)
    ids = tokens(n=4)
    opts = {"streamline_steps": 3} if method == "streamline" else {}
    res = come_fast.compress(model, target_layers=6, method=method, calib=ids, **opts)
    if method != "finercut":
        assert res.layers_after == 6 and model.config.num_hidden_layers == 6
    out = come_fast.save(res, tmp_path / "m")
    re, _, meta = come_fast.load(out)
    assert meta["method"] == method and meta["provenance"] == json.loads(json.dumps(res.provenance))
    x = tokens(n=1, T=7)
    assert torch.equal(logits(re, x), logits(model, x))
    if method != "finercut":  # whole layers: a plain checkpoint for stock transformers
        stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert torch.equal(logits(stock, x), logits(model, x))
        with torch.inference_mode():
            assert torch.equal(stock.generate(x, max_new_tokens=4, do_sample=False),
                               stock.generate(x, max_new_tokens=4, do_sample=False, use_cache=False))


# -- the trainer -----------------------------------------------------------------------------

def test_distill_weights_and_terms():
    from come_fast.distill import LossWeights, distill, evaluate_loss, loss_terms

    torch.manual_seed(0)
    x = torch.randn(16, 5, 8)
    teacher = torch.nn.Linear(8, 8)
    student = torch.nn.Linear(8, 8)
    with torch.no_grad():
        y = teacher(x)

    def fwd(idx):
        h = student(x[idx])
        return {"hidden": h, "hidden_target": y[idx], "logits": h, "logits_target": y[idx],
                "labels": y[idx].argmax(-1)}

    w = LossWeights(mse=1.0, kl=0.5, ce=0.25, temperature=2.0)
    with torch.no_grad():
        out = fwd(torch.arange(4))
        terms = loss_terms(out, w)
    assert set(terms) == {"mse", "kl", "ce"}
    lp, lt = F.log_softmax(out["logits"] / 2, -1), F.log_softmax(out["logits_target"] / 2, -1)
    kl = float((lt.exp() * (lt - lp)).sum(-1).mean()) * 4 * 0.5
    assert float(terms["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(terms["ce"]) == pytest.approx(0.25 * float(F.cross_entropy(out["logits"].reshape(-1, 8),
                                                                             out["labels"].reshape(-1))), rel=1e-5)
    before = evaluate_loss(fwd, 16, w, 4)
    rep = distill(fwd, student.parameters(), 16, steps=60, lr=1e-2, batch_size=4, weights=w)
    assert evaluate_loss(fwd, 16, w, 4) < before and len(rep.history) == 60
    with pytest.raises(ValueError, match="no loss term"):
        loss_terms({"hidden": out["hidden"], "hidden_target": y[:4]}, LossWeights(mse=0.0, kl=1.0))


# -- the sweep's bookkeeping --------------------------------------------------------------------

def test_bench_cells_resume_and_tables(tmp_path):
    from come_fast import bench

    sw = bench.Sweep(methods="shortgpt,come-faithful", ratios=(0.1, 0.3), tasks_at=[0.3], out=tmp_path,
                     data_dir=tmp_path, progress=False)
    assert len(sw.pending()) == 5 + 3  # dense + 4 cells to compress, dense + 2 cells with tasks
    assert bench._method_call("come-faithful", {}) == ("come", {"faithful": True})
    assert bench._method_call("come+distill", {}) == ("come", {"distill_steps": 100})
    assert bench._method_call("sleb+distill", {}) == ("sleb", {"score_rows": 8, "distill_steps": 100})
    assert bench._method_call("sleb", {"sleb": {"score_rows": 3}}) == ("sleb", {"score_rows": 3})
    task = {"acc": 0.6, "acc_norm": 0.7, "headline": "acc_norm", "chance": 0.25, "n": 200, "seconds": 1.0}
    base = {"model": "m", "ppl": 30.0, "layers": 30, "params": 100, "compress_seconds": 0.0, "eval_seconds": 1.0,
            "achieved_ratio": 0.0, "provenance": None}
    sw.write({**base, "method": "dense", "ratio_asked": 0.0, "tasks": {t: task for t in sw.zero_shot}})
    low = {**task, "acc_norm": 0.475}
    sw.write({**base, "method": "shortgpt", "ratio_asked": 0.3, "ppl": 300.0, "achieved_ratio": 0.31,
              "tasks": {t: low for t in sw.zero_shot}})
    left = sw.pending()
    assert ("dense", 0.0, "compress+ppl") not in left and ("dense", 0.0, "tasks") not in left
    assert ("shortgpt", 0.3, "tasks") not in left and ("shortgpt", 0.1, "compress+ppl") in left
    # a cell another process finished is not loaded or compressed again
    sw._compress = lambda *a, **k: pytest.fail("must not compress a finished cell")
    sw.run_tasks("shortgpt", 0.3)
    recs = sw.report()
    assert [r["method"] for r in recs] == ["dense", "shortgpt"]
    md = (tmp_path / "quality.md").read_text()
    assert "| shortgpt | 0.3 | 31.0% |" in md and "50%" in md  # (0.475 - 0.25) / (0.7 - 0.25)
    assert "Wall time per method" in md
    # summary: the perplexity per ratio asked (no 10% cell yet), the task average, the wall time summed
    assert "| method | PPL 30% | Avg 30% | PIQA/HS/ARC-e 30% | compress s | eval s | wall s |" in md
    assert "| shortgpt | 300.00 | 47.5 | 47.5 | 0 | 1 | 1 |" in md
    rows = (tmp_path / "quality.csv").read_text().splitlines()
    assert rows[0].startswith("method,ratio_asked,achieved_ratio") and len(rows) == 3
    assert (tmp_path / "quality.png").stat().st_size > 1000


def test_cli_bench_quality_arguments(tmp_path):
    from come_fast.cli import _parse_option, _ratios, build_parser

    args = build_parser().parse_args(["bench", "quality", "--methods", "all", "--ratios", "0.1,0.3", "--tasks-at",
                                      "none", "--option", "sleb:score_rows=4", "--out", "x"])
    assert args.fn.__name__ == "_bench_quality" and args.threads == 1 and args.limit == 200
    assert _ratios(args.ratios) == [0.1, 0.3] and _ratios(args.tasks_at) == [] and _ratios(None) is None
    assert _parse_option("sleb:score_rows=4") == ("sleb", "score_rows", 4)
    assert _parse_option("laco:laco_threshold=0.5") == ("laco", "laco_threshold", 0.5)
    with pytest.raises(ValueError, match="METHOD:KEY=VALUE"):
        _parse_option("sleb=4")
    from come_fast import bench

    with pytest.raises(ValueError, match="unknown option.*score_row for method 'sleb'"):
        bench.Sweep(methods="sleb", options={"sleb": {"score_row": 4}}, out="unused", progress=False)
    with pytest.raises(ValueError, match="unknown distillation option.*distill_lrr"):
        bench.Sweep(methods="come+distill", options={"come+distill": {"distill_lrr": 1e-3}}, out="unused",
                    progress=False)
    bench.Sweep(methods="come+distill,come-faithful", options={"come+distill": {"distill_lr": 1e-3}}, out=tmp_path,
                progress=False)  # compress's own arguments (distill_steps, faithful) and known options pass
    with pytest.raises(ValueError, match="not in this sweep: ppl"):
        bench.Sweep(methods="sleb", options={"ppl": {"score_rows": 4}}, out="unused", progress=False)


def test_bench_held_out_slice_and_task_subset(tmp_path, monkeypatch):
    """--start/--tasks: the sweep scores the named tasks on examples start.. (outside the dev slice) and says so."""
    import come_fast.eval as ev
    from come_fast import bench
    from come_fast.cli import build_parser

    args = build_parser().parse_args(["bench", "quality", "--tasks", "piqa,arc_easy", "--start", "200"])
    assert args.tasks == "piqa,arc_easy" and args.start == 200
    sw = bench.Sweep(methods="shortgpt", ratios=(0.2,), out=tmp_path, data_dir=tmp_path, progress=False,
                     tasks="piqa,arc_easy", start=200, limit=300)
    assert sw.zero_shot == ["piqa", "arc_easy"] and len(sw.pending()) == 2 + 2
    base = {"model": "m", "ppl": 30.0, "layers": 30, "params": 100, "compress_seconds": 0.0, "eval_seconds": 1.0,
            "achieved_ratio": 0.0, "provenance": None, "tasks": {}}
    sw.write({**base, "method": "dense", "ratio_asked": 0.0})
    seen = []

    def fake_task(model, tok, name, data_dir, limit=None, start=0, progress=True):
        seen.append((name, limit, start))
        return {"acc": 0.5, "acc_norm": 0.5, "headline": "acc_norm", "chance": 0.5, "n": limit, "seconds": 0.0}

    monkeypatch.setattr(ev, "evaluate_task", fake_task)
    monkeypatch.setattr(sw, "_load_dense", lambda: (None, None))
    sw.run_tasks("dense", 0.0)
    assert seen == [("piqa", 300, 200), ("arc_easy", 300, 200)]
    assert {t: r["start"] for t, r in sw.read("dense", 0.0)["tasks"].items()} == {"piqa": 200, "arc_easy": 200}
    md = bench.to_markdown(sw.records(), sw)
    assert "Zero-shot tasks (PIQA, ARC-e): examples 200..499 of each (outside the dev slice)" in md
    assert "With 300 examples per task the standard error is about 2.9 points" in md
    with pytest.raises(ValueError, match="unknown task.*'wikitext2'; known tasks: piqa, hellaswag, winogrande"):
        bench.Sweep(methods="shortgpt", out=tmp_path, tasks="piqa,wikitext2", progress=False)
    with pytest.raises(ValueError, match="start must be a non-negative integer"):
        bench.Sweep(methods="shortgpt", out=tmp_path, start=-1, progress=False)


def test_compress_refuses_unknown_method_options_before_any_work():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"unknown option\(s\) grid_steps for method 'come'; its own options: "
                                         "beam, keep_last, last_boundary, mlp_select, norms"):
        come_fast.compress(model, target_layers=4, calib=tokens(), grid_steps=4)  # a come-p option
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="its own options: none"):
        come_fast.compress(model, target_layers=4, calib=tokens(), method="shortgpt", score_rows=2)


def test_bench_rebuilds_a_finercut_cell_from_its_record(tmp_path, monkeypatch):
    """A FinerCut cell whose saved model is gone is rebuilt from the sublayers
    its record lists (not searched again) and equals the compressed model."""
    from come_fast import bench

    ids = tokens(n=4)
    model = tiny_model("llama", num_hidden_layers=6)
    res = come_fast.compress(model, ratio=0.3, method="finercut", calib=ids)
    sw = bench.Sweep(methods="finercut", ratios=(0.3,), out=tmp_path, data_dir=tmp_path, progress=False)
    rec = {"method": "finercut", "ratio_asked": 0.3, **bench._info(res, {})}
    monkeypatch.setattr(sw, "_load_dense", lambda: (tiny_model("llama", num_hidden_layers=6), None))
    monkeypatch.setattr(sw, "_compress", lambda *a, **k: pytest.fail("the search must not run again"))
    rebuilt, _ = sw._rebuild_finercut(json.loads(json.dumps(rec)))
    assert count_parameters(rebuilt) == count_parameters(model)
    x = tokens(n=1, T=7)
    assert torch.equal(logits(rebuilt, x), logits(model, x))
    rec["provenance"] = rec["provenance"][:-1]
    with pytest.raises(RuntimeError, match="differs from its record"):
        sw._rebuild_finercut(json.loads(json.dumps(rec)))


def test_every_option_a_method_reads_is_declared():
    """The declared option lists (which refuse misspelt options) must not refuse
    an option the code reads: every literal ``.get("name"`` on the options in a
    method's module (and the shared helpers it calls) is declared for it."""
    import inspect
    import re

    from come_fast import layerops

    methods.available()
    shared = set(re.findall(r'options\.get\("(\w+)"', inspect.getsource(layerops)))
    assert shared == {"score_rows", "max_cache_bytes", "ratio"}  # score_rows: only calibration_slice's users declare it
    for name, fn in methods.REGISTRY.items():
        src = inspect.getsource(inspect.getmodule(fn))
        read = set(re.findall(r'(?:\bo|opts|options)\.get\("(\w+)"', src)) - {"distill_steps"}
        if "calibration_slice(ctx)" in src:
            read.add("score_rows")
        assert read <= methods.OPTIONS[name] | methods.COMMON_OPTIONS | ({"grid_steps"} if name == "come" else set()), name


def test_summary_table_flags_methods_with_old_hellaswag_prompts():
    from come_fast import bench

    tasks = ["piqa", "hellaswag"]

    def cell(method, ratio, ppl, hs, **extra):
        t = {"acc": hs, "acc_norm": hs, "headline": "acc_norm", "n": 200, "chance": 0.25}
        return {"method": method, "ratio_asked": ratio, "ppl": ppl, "compress_seconds": 1.0, "eval_seconds": 2.0,
                "tasks": {"piqa": {**t, "chance": 0.5, "acc_norm": 0.6}, "hellaswag": t}, **extra}

    recs = [cell("dense", 0.0, 30.0, 0.47), cell("come", 0.3, 134.0, 0.4),
            cell("laco", 0.3, 1e9, 0.3, hellaswag_prompt=bench.OLD_HELLASWAG_PROMPT)]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in bench.summary_table(recs, tasks) if line.startswith("| ")}
    assert "laco †" in rows and "come" in rows and "come †" not in rows
    assert "| 50.0 |" in rows["come"]  # (60 + 40) / 2
    text = "\n".join(bench.summary_table(recs, tasks))
    assert "†: HellaSwag scored with the prompt before lm-eval's" in text
    assert "†" not in "\n".join(bench.summary_table(recs[:2], tasks))
