"""CoMe end to end on tiny random models: scores against hand computations,
incremental re-scoring against a fresh pass, CoMe-P's grid, API errors,
save/reload through stock transformers."""
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import come_fast
from come_fast.adapters import adapter_for, count_parameters
from come_fast.api import RatioError, removals_for_ratio
from come_fast.bench import LEGACY
from come_fast.calibration import CalibrationError, LayerStream, calibration_tokens
from come_fast.dispatch import Ops
from come_fast.methods.come import NoMergeablePairError, blocked_pairs
from come_fast.scoring import allocate, channel_scores, split_ratio, top_units
from tiny import FAMILIES, tiny_model, tokens

# the release's rules in the default mode (GQA grouping fixed, every lever off): what the
# tests of D, BI and the split below check; the levers have their own tests (test_levers.py)
RELEASE_RULES = LEGACY


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_boundaries_equal_hf_hidden_states(family):
    model = tiny_model(family)
    ids = tokens()
    s = LayerStream(adapter_for(model), ids, batch_size=2)
    s.run(0)
    with torch.inference_mode():
        hs = model.model(ids[:2], output_hidden_states=True).hidden_states
    for l, h in enumerate(hs):
        assert torch.equal(s.boundary[l][:2], h), l  # hidden_states[-1] is after the final norm


def test_scores_against_hand_computation():
    model = tiny_model("llama")
    a = adapter_for(model)
    ids = tokens(n=4, T=12)
    s = LayerStream(a, ids, batch_size=2)
    s.run(0)
    with torch.inference_mode():
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states
    # block influence
    for l in range(len(a.layers)):
        x, y = hs[l].reshape(-1, 64), hs[l + 1].reshape(-1, 64)
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(0, 1)
        assert s.stats[l].bi_sum == pytest.approx(float((1 - cos).sum()), rel=1e-5)
    # pair distance on last tokens
    d = s.pair_distance()
    for l in range(len(a.layers) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[l][:, -1], hs[l + 2][:, -1], dim=-1).clamp(0, 1)
        assert d[l] == pytest.approx(float((torch.arccos(cos) / math.pi).sum()), rel=1e-5, abs=1e-6)
    # channel sensitivities from captured activations
    layer = a.layers[3]
    cap = {}
    h1 = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: cap.__setitem__("o", args[0].clone()))
    h2 = layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: cap.__setitem__("a", args[0].clone()))
    with torch.inference_mode():
        layer(hs[3], position_embeddings=a.rotary(hs[3], torch.arange(12)[None]), attention_mask=None)
    h1.remove(), h2.remove()
    att, mlp = channel_scores(a, layer, s.stats[3], Ops("torch"))
    want_mlp = (cap["a"].abs() * layer.mlp.down_proj.weight.abs().sum(0)).mean((0, 1))
    torch.testing.assert_close(mlp, want_mlp, rtol=1e-5, atol=1e-6)
    per_ch = (cap["o"].abs() * layer.self_attn.o_proj.weight.abs().sum(0)).mean((0, 1))
    want_att = per_ch.reshape(2, 2 * 16).mean(1)  # 2 KV groups of g=2 heads x 16
    torch.testing.assert_close(att, want_att, rtol=1e-5, atol=1e-6)


def test_pair_distance_on_all_tokens_and_raw_last_boundary_by_hand():
    model = tiny_model("qwen2")
    a = adapter_for(model)
    ids = tokens(n=4, T=12)
    L = len(a.layers)
    cap = {}
    hook = a.layers[-1].register_forward_hook(lambda m, args, out: cap.__setitem__("raw", out[0] if isinstance(out, tuple) else out))
    with torch.inference_mode():
        hs = list(model(ids, output_hidden_states=True).hidden_states)
    hook.remove()

    def angle(x, y):  # per token, [n, T]
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(0, 1)
        return torch.arccos(cos) / math.pi

    for normed in (True, False):
        if not normed:
            hs[-1] = cap["raw"]  # the last layer's own output, before the final norm
        s = LayerStream(a, ids, batch_size=2, final_norm_last=normed)
        s.run(0)
        d = s.pair_distance("all")
        for l in range(L - 1):
            assert d[l] == pytest.approx(float(angle(hs[l], hs[l + 2]).mean(1).sum()), rel=1e-5, abs=1e-6)
        cos = torch.nn.functional.cosine_similarity(hs[L - 1], hs[L], dim=-1).clamp(0, 1)
        assert s.stats[L - 1].bi_sum == pytest.approx(float((1 - cos).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="cached"):
        s = LayerStream(a, ids, batch_size=2, max_cache_bytes=1)
        s.run(0)
        s.pair_distance("all")


def test_come_pair_tokens_all_merges_the_argmin_of_the_all_token_distance():
    ids = tokens(n=4, T=12)
    model = tiny_model("llama")
    s = LayerStream(adapter_for(model), ids, batch_size=2)
    s.run(0)
    want = s.pair_distance("all")
    res = come_fast.compress(model, target_layers=5, calib=ids, pair_tokens="all", **RELEASE_RULES)
    st = res.report[0]
    assert st["pair_distance_sum"] == pytest.approx(want, rel=1e-6)
    assert st["pair"][0] == min(range(len(want)), key=want.__getitem__)
    assert res.settings["pair_tokens"] == "all" and res.settings["last_boundary"] == "final_norm"
    with pytest.raises(ValueError, match="faithful mode keeps"):
        come_fast.compress(tiny_model("llama"), target_layers=5, calib=ids, faithful=True, last_boundary="raw")
    with pytest.raises(ValueError, match="pair_tokens"):
        come_fast.compress(tiny_model("llama"), target_layers=5, calib=ids, pair_tokens="first")


def test_split_allocation_selection_rules():
    r = split_ratio(3.0, 1.0)
    assert r == pytest.approx((0.75, 0.25))
    assert allocate(3, r) == (3, 0)          # floor(3 * 0.25) = 0 goes to the minor layer
    assert allocate(1536, (0.48010856031328386, 0.5198914396867161)) == (737, 799)  # trace step 0
    assert allocate(4, (0.5, 0.5)) == (2, 2)
    assert top_units(torch.tensor([0.5, 0.1, 0.9, 0.3]), 2) == [0, 2]
    assert top_units(torch.tensor([0.5, 0.1]), 0) == []
    assert blocked_pairs([0, [1, 2], 3, 4]) == {0, 1}
    assert blocked_pairs([[0, 1], 2, 3]) == {0}


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_rescoring_equals_a_fresh_pass(family):
    """After a merge only layers l.. are re-run: their statistics must equal a
    fresh full pass over the merged model."""
    model = tiny_model(family)
    ids = tokens()
    res = come_fast.compress(model, target_layers=4, calib=ids, backend="torch", **RELEASE_RULES)
    assert res.layers_after == 4 and model.config.num_hidden_layers == 4
    # re-run the last step's decision function on a fresh stream: same scores
    fresh = LayerStream(adapter_for(model), ids, batch_size=2)
    fresh.run(0)
    model2 = tiny_model(family)
    s = LayerStream(adapter_for(model2), ids, batch_size=2)
    s.run(0)
    from come_fast.merge import replace_pair
    a2 = adapter_for(model2)
    for step in res.report:
        idx = step["pair"][0]
        replace_pair(a2, idx, _merged_like(model, step, a2))
        s.merged(idx)
        s.run(idx)
    for l in range(4):
        assert s.stats[l].bi_sum == pytest.approx(fresh.stats[l].bi_sum, rel=1e-6)
        torch.testing.assert_close(s.stats[l].mlp_abs, fresh.stats[l].mlp_abs)


def _merged_like(model, step, a2):
    """Rebuild the step's merged layer on the second copy from the recorded selection."""
    from come_fast.merge import Selection, concat_merge

    idx = step["pair"][0]
    sel = Selection(step["kv_a"], step["kv_b"], step["mlp_a"], step["mlp_b"], step["q_heads_a"], step["q_heads_b"])
    return concat_merge(a2, a2.layers[idx], a2.layers[idx + 1], sel, step["ratio"][0], Ops("torch"))


def test_decisions_follow_the_scores():
    model = tiny_model("llama")
    ids = tokens()
    res = come_fast.compress(model, target_layers=4, calib=ids, backend="torch", **RELEASE_RULES)
    for st in res.report:
        d = [math.inf if i in st["blocked"] else v for i, v in enumerate(st["pair_distance_sum"])]
        assert st["pair"][0] == int(np.argmin(d))
        l = st["pair"][0]
        bi = st["bi_sum"]
        assert st["ratio"][0] == pytest.approx(bi[l] / (bi[l] + bi[l + 1]))
        assert sum(st["kv_counts"]) == 2 and sum(st["mlp_counts"]) == 96
        sc = st["att_scores"]
        assert st["mlp_a"] == sorted(np.argsort(sc["mlp_a"])[::-1][:st["mlp_counts"][0]].tolist())
    assert all(isinstance(p, (int, list)) for p in res.provenance)


def test_repeat_protection_and_allow_repeat():
    ids = tokens()
    rules = {**RELEASE_RULES, "allow_repeat": None}
    with pytest.raises(RatioError, match="allow_repeat"):
        come_fast.compress(tiny_model("llama"), target_layers=2, calib=ids, **{**rules, "allow_repeat": False})
    with pytest.raises(RatioError, match="allow_repeat"):  # faithful mode: the release's --wo-repeat by default
        come_fast.compress(tiny_model("llama"), target_layers=2, calib=ids, faithful=True)
    res = come_fast.compress(tiny_model("llama"), target_layers=2, calib=ids, **{**rules, "allow_repeat": True})
    assert res.layers_after == 2
    flat = []

    def leaves(p):
        for q in p:
            leaves(q) if isinstance(q, list) else flat.append(q)

    leaves(res.provenance)
    assert sorted(flat) == list(range(6))
    assert any(isinstance(q, list) and any(isinstance(x, list) for x in q) for q in res.provenance)


def test_no_mergeable_pair_is_an_error():
    from come_fast import methods
    from come_fast.methods import Context

    model = tiny_model("llama", num_hidden_layers=4)
    ctx = Context(adapter_for(model), tokens(), Ops("torch"),
                  options={"allow_repeat": False, **{k: v for k, v in RELEASE_RULES.items() if k != "compensate"}})
    with pytest.raises(NoMergeablePairError):
        methods.get("come")(ctx, 3)


def test_come_p_picks_the_grid_minimum():
    model = tiny_model("qwen2")
    ids = tokens()
    res = come_fast.compress(model, target_layers=5, calib=ids, method="come-p", grid_steps=4)
    st = res.report[0]
    losses = st["grid_losses"]
    assert len(losses) == 5
    best = min(losses, key=losses.get)
    assert st["ratio"][0] == best
    # the recorded loss of the chosen split is the merged model's own calibration loss
    with torch.inference_mode():
        out = model(ids, labels=ids)
    assert float(out.loss) == pytest.approx(losses[best], rel=1e-5)


def test_ratio_to_layers_and_errors():
    model = tiny_model("llama")
    total = count_parameters(model)
    per = sum(p.numel() for p in model.model.layers[0].parameters())
    k = removals_for_ratio(model, 0.3)
    assert k == round(0.3 * total / per)
    assert removals_for_ratio(model, 0.3, "down") == math.floor(0.3 * total / per)
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(RatioError):
            removals_for_ratio(model, bad)
    with pytest.raises(RatioError, match="not reachable"):
        removals_for_ratio(model, 0.99)
    with pytest.raises(RatioError, match="exactly one"):
        come_fast.compress(model, ratio=0.2, target_layers=3)
    res = come_fast.compress(tiny_model("llama"), ratio=0.3, calib=tokens(), compensate=None)
    assert res.achieved_ratio == pytest.approx(k * per / total)


def test_unsupported_architecture_and_nan():
    from transformers import GPT2Config, GPT2LMHeadModel

    from come_fast.adapters import UnsupportedArchitectureError

    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        come_fast.compress(m, target_layers=1)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        come_fast.compress(model, target_layers=4, calib=tokens())


def test_calibration_inputs(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match="integer tensor"):
        calibration_tokens(torch.zeros(3, 4), model, None)
    with pytest.raises(CalibrationError, match="vocabulary"):
        calibration_tokens(torch.full((2, 4), 500), model, None)
    with pytest.raises(CalibrationError, match="does not exist"):
        calibration_tokens(tmp_path / "nope.safetensors", model, None)
    from safetensors.torch import save_file

    save_file({"input_ids": tokens(n=3, T=8)}, str(tmp_path / "c.safetensors"))
    assert torch.equal(calibration_tokens(tmp_path / "c.safetensors", model, None), tokens(n=3, T=8))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_stock_transformers(family, tmp_path):
    model = tiny_model(family)
    res = come_fast.compress(model, target_layers=4, calib=tokens(n=8, T=32))  # the default mode, refit included
    assert res.settings["compensate"]["mode"] == "ls"
    out = come_fast.save(res, tmp_path / "m")
    with pytest.raises(FileExistsError):
        come_fast.save(res, tmp_path / "m")
    re = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert re.config.num_hidden_layers == 4
    x = tokens(n=1, T=7)
    with torch.inference_mode():
        assert torch.equal(model(x).logits, re(x).logits)
        g = re.generate(x, max_new_tokens=5, do_sample=False)
        g0 = re.generate(x, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(g, g0)
    assert not list(tmp_path.glob(".m.tmp-*"))  # no leftovers of the atomic write


def test_embedded_default_calibration_is_sampled_cached_and_deterministic(tmp_path, monkeypatch):
    from come_fast.calibration import sample_from_model

    monkeypatch.setenv("COME_FAST_CACHE", str(tmp_path))
    model = tiny_model("llama")
    a = calibration_tokens(None, model, None, n_samples=3, seq_len=10)
    assert a.shape == (3, 10) and a.dtype == torch.long
    assert list(tmp_path.glob("calibration/*.safetensors"))
    assert torch.equal(a, sample_from_model(model, None, 3, 10, seed=0))  # the cache holds what sampling gives
    assert not torch.equal(a, sample_from_model(model, None, 3, 10, seed=1))
    # the first sampled token follows the model's next-token distribution after BOS (id 0 here):
    # the sample must be a token the model gives non-negligible probability
    with torch.inference_mode():
        p = torch.softmax(model(torch.zeros(1, 1, dtype=torch.long)).logits[0, -1], -1)
    assert float(p[a[:, 0]].min()) > 1e-6


@pytest.mark.parametrize("method,opts", [("come", {}), ("come", RELEASE_RULES), ("come-p", {"grid_steps": 3})])
def test_progressive_snapshots_equal_shorter_runs(method, opts):
    """CoMe and CoMe-P are progressive: the state after k steps of a longer run
    is the result of a k-step run (what on_step snapshots, and the sweep's
    one-run-for-all-ratios, rely on)."""
    ids = tokens(n=8, T=32)
    saved = {}

    def keep(partial):
        saved[partial.layers_after] = (partial.provenance, {k: v.clone() for k, v in partial.model.state_dict().items()})

    come_fast.compress(tiny_model("mistral"), target_layers=3, calib=ids, on_step=keep, method=method, **opts)
    assert sorted(saved) == [3, 4, 5]
    short = come_fast.compress(tiny_model("mistral"), target_layers=5, calib=ids, method=method, **opts)
    prov, sd = saved[5]
    assert prov == short.provenance
    assert all(torch.equal(sd[k], v) for k, v in short.model.state_dict().items())
