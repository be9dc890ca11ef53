"""ReplaceMe (come_fast/methods/replaceme.py) on tiny random models, each part
checked against an independent computation: the block choice against
Hugging Face's own ``hidden_states``, the map against ``torch.linalg.lstsq``
on activations taken with forward hooks on the uncompressed model, the result
against a model edited by hand, plus save/reload and the end-to-end API."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import come_fast
from come_fast import methods
from come_fast.adapters import adapter_for, renumber
from come_fast.calibration import LayerStream
from come_fast.methods import replaceme as rm
from tiny import tiny_model, tokens

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest

D = 64  # hidden size of the tiny models


def logits(model, ids):
    with torch.inference_mode():
        return model(ids, use_cache=False).logits


def hand_distances(model, ids, n, which="all", kind="cosine"):
    """D[s] between HF hidden_states[s] and [s+n] (the last one after the final norm)."""
    with torch.inference_mode():
        hs = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    out = []
    for s in range(len(hs) - n):
        x, y = hs[s], hs[s + n]
        if which == "last":
            x, y = x[:, -1], y[:, -1]
        cos = F.cosine_similarity(x.reshape(-1, D), y.reshape(-1, D), dim=-1).double()
        dist = 1 - cos if kind == "cosine" else torch.arccos(cos.clamp(-1, 1)) / math.pi
        out.append(float(dist.mean()))
    return out


def hand_argmin(dist):
    return min(range(1, len(dist)), key=lambda s: (dist[s], s))  # start 0: no layer to fold into


def hand_fit_data(model, ids, start, n):
    """M (MLP output of layer start-1), Y (its residual stream after attention,
    = layer output - M) and the teacher (raw output of layer start+n-1), from
    forward hooks on the whole uncompressed HF model; float64 [tokens, d]."""
    layers = model.model.layers
    f, last = start - 1, start + n - 1
    got = {}

    def keep(name):
        def hook(module, args, out):
            got[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    hs = [layers[f].mlp.register_forward_hook(keep("m")), layers[f].register_forward_hook(keep("out")),
          layers[last].register_forward_hook(keep("teacher"))]
    try:
        with torch.inference_mode():
            model(ids, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    m = got["m"].reshape(-1, D).double()
    y = (got["out"] - got["m"]).reshape(-1, D).double()
    return m, y, got["teacher"].reshape(-1, D).double()


def hand_lstsq(model, ids, start, n):
    m, y, teacher = hand_fit_data(model, ids, start, n)
    return torch.linalg.lstsq(m, teacher - y).solution


def hand_model(model, start, n, t):
    """A copy with down_proj of layer start-1 <- T^T W and layers start..start+n-1 deleted."""
    h = copy.deepcopy(model)
    down = h.model.layers[start - 1].mlp.down_proj
    with torch.no_grad():
        down.weight.copy_((t.T @ down.weight.double()).float())
    h.model.layers = torch.nn.ModuleList([l for i, l in enumerate(h.model.layers) if not start <= i < start + n])
    renumber(adapter_for(h))
    return h


def near_identity_block(family, L=8, block=(3, 4), seed=0):
    """A model whose layers ``block`` barely change the residual stream, so a
    block in the middle (not at the end) is the closest pair of boundaries."""
    model = tiny_model(family, num_hidden_layers=L, seed=seed)
    with torch.no_grad():
        for l in block:
            model.model.layers[l].self_attn.o_proj.weight.mul_(0.02)
            model.model.layers[l].mlp.down_proj.weight.mul_(0.02)
    return model


def stream_of(model, ids):
    s = LayerStream(adapter_for(model), ids, batch_size=2)
    s.run(0, collect=False)
    return s


# -- (1) the block choice ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_chosen_block_is_the_argmin_of_hand_distances(family):
    model = tiny_model(family, num_hidden_layers=8)
    ids = tokens(n=6, T=16)
    n = 3
    dist = hand_distances(model, ids, n)
    want = hand_argmin(dist)
    res = come_fast.compress(copy.deepcopy(model), target_layers=8 - n, method="replaceme", calib=ids)
    step = res.report[0]
    assert step["start"] == want and step["removed"] == list(range(want, want + n))
    assert step["fold_layer"] == want - 1 and step["refused"] == [0]
    assert step["distances"] == pytest.approx(dist, rel=1e-5, abs=1e-6)
    assert res.provenance == [l for l in range(8) if not want <= l < want + n]


@pytest.mark.parametrize("which,kind", [("all", "angular"), ("last", "cosine"), ("last", "angular")])
def test_release_distance_options_choose_by_hand(which, kind):
    model = near_identity_block("llama", block=(2, 3))
    ids = tokens(n=6, T=16)
    dist = hand_distances(model, ids, 2, which, kind)
    res = come_fast.compress(copy.deepcopy(model), target_layers=6, method="replaceme", calib=ids,
                             replaceme_tokens=which, replaceme_distance=kind)
    assert res.report[0]["start"] == hand_argmin(dist)
    assert res.report[0]["distances"] == pytest.approx(dist, rel=1e-5, abs=1e-6)
    assert res.settings["tokens"] == which and res.settings["distance"] == kind


def test_a_nearly_identity_middle_block_is_chosen_with_or_without_a_cache_bound():
    model = near_identity_block("qwen2", block=(3, 4))
    ids = tokens(n=6, T=16)
    bounded = copy.deepcopy(model)
    res = come_fast.compress(model, target_layers=6, method="replaceme", calib=ids)
    assert res.report[0]["removed"] == [3, 4] and res.provenance == [0, 1, 2, 5, 6, 7]
    # every third boundary cached: the others are recomputed, same decision and map
    one = ids.shape[0] * ids.shape[1] * D * 4
    res2 = come_fast.compress(bounded, target_layers=6, method="replaceme", calib=ids, max_cache_bytes=3 * one)
    assert res2.report[0]["distances"] == pytest.approx(res.report[0]["distances"], rel=1e-6)
    x = tokens(n=1, T=7)
    torch.testing.assert_close(logits(bounded, x), logits(model, x), rtol=1e-5, atol=1e-5)


def test_block_at_layer_0_is_refused_and_the_end_block_fits_the_raw_last_output():
    """n = L-1: start 0 (which would delete layer 0) is refused even where it
    is the closest, so the only candidate is 1..L-1; its teacher is the last
    layer's raw output, not HF's final-normed hidden_states[-1]."""
    model = tiny_model("llama", num_hidden_layers=4)
    ids = tokens(n=8, T=32)
    t_hand = hand_lstsq(model, ids, 1, 3)
    res = come_fast.compress(copy.deepcopy(model), target_layers=1, method="replaceme", calib=ids)
    step = res.report[0]
    assert len(step["distances"]) == 2 and step["start"] == 1 and res.provenance == [0]
    fit = rm.fit_block(stream_of(model, ids), 1, 3)
    torch.testing.assert_close(fit.T, t_hand, rtol=1e-4, atol=1e-4 * float(t_hand.abs().max()))


# -- (2) the map ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_map_is_lstsq_of_hooked_activations_and_is_folded_as_t_transpose_w(family):
    model = near_identity_block(family, block=(3, 4))
    ids = tokens(n=8, T=32)  # 256 rows for d = 64
    start, n = 3, 2
    t_hand = hand_lstsq(model, ids, start, n)
    fit = rm.fit_block(stream_of(model, ids), start, n)
    assert fit.cholesky and fit.rows == 256
    torch.testing.assert_close(fit.T, t_hand, rtol=1e-4, atol=1e-4 * float(t_hand.abs().max()))
    w = model.model.layers[start - 1].mlp.down_proj.weight.detach().clone()
    res = come_fast.compress(copy.deepcopy(model), target_layers=6, method="replaceme", calib=ids)
    assert res.report[0]["start"] == start and res.report[0]["solver"] == "cholesky"
    new = res.model.model.layers[start - 1].mlp.down_proj.weight.detach()
    assert torch.equal(new, (fit.T.T @ w.double()).float())
    torch.testing.assert_close(new, (t_hand.T @ w.double()).float(), rtol=1e-4, atol=1e-4 * float(new.abs().max()))


def test_solve_falls_back_to_the_pseudo_inverse_and_applies_the_ridge():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(50, 8, generator=g, dtype=torch.float64)
    r = torch.randn(50, 8, generator=g, dtype=torch.float64)
    t, ok = rm.solve(m.T @ m, m.T @ r)
    assert ok
    torch.testing.assert_close(t, torch.linalg.lstsq(m, r).solution)
    t, ok = rm.solve(m.T @ m, m.T @ r, ridge=3.0)
    assert ok
    torch.testing.assert_close(t, torch.linalg.solve(m.T @ m + 3.0 * torch.eye(8, dtype=torch.float64), m.T @ r))
    m[:, 3] = 0  # singular M^T M: Cholesky fails, the minimum-norm solution instead
    t, ok = rm.solve(m.T @ m, m.T @ r)
    assert not ok
    torch.testing.assert_close(t, torch.linalg.lstsq(m, r, driver="gelsd").solution)


def test_too_few_tokens_report_the_pinv_fallback_and_stay_finite():
    model = tiny_model("llama", num_hidden_layers=6)
    ids = tokens(n=2, T=8)  # 16 rows < d = 64: M^T M is singular
    original = copy.deepcopy(model)
    res = come_fast.compress(model, target_layers=4, method="replaceme", calib=ids)
    step = res.report[0]
    assert step["solver"] == "pinv" and not step["cholesky"] and step["fit_rows"] == 16
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert step["residual_after"] < 1e-8 < step["residual_before"]  # 16 rows are fitted exactly
    m, y, teacher = hand_fit_data(original, ids, step["start"], 2)
    t_min_norm = torch.linalg.lstsq(m, teacher - y, driver="gelsd").solution
    w = original.model.layers[step["fold_layer"]].mlp.down_proj.weight.detach().double()
    new = model.model.layers[step["fold_layer"]].mlp.down_proj.weight.detach()
    torch.testing.assert_close(new, (t_min_norm.T @ w).float(), rtol=1e-3, atol=1e-3 * float(new.abs().max()))


# -- (3) the compressed model -------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compressed_model_equals_layers_deleted_and_down_proj_replaced_by_hand(family):
    model = near_identity_block(family, block=(3, 4))
    ids = tokens(n=8, T=32)
    start, n = 3, 2
    fit = rm.fit_block(stream_of(model, ids), start, n)
    t_hand = hand_lstsq(model, ids, start, n)
    res = come_fast.compress(copy.deepcopy(model), target_layers=6, method="replaceme", calib=ids)
    assert res.report[0]["removed"] == [3, 4]
    x = tokens(n=2, T=9, seed=5)
    got = logits(res.model, x)
    assert torch.equal(got, logits(hand_model(model, start, n, fit.T), x))
    torch.testing.assert_close(got, logits(hand_model(model, start, n, t_hand), x), rtol=1e-3, atol=1e-3)


# -- (4) save / reload --------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_reload_gives_identical_logits(family, tmp_path):
    model = tiny_model(family, num_hidden_layers=6)
    res = come_fast.compress(model, target_layers=4, method="replaceme", calib=tokens(n=4))
    out = come_fast.save(res, tmp_path / "m")
    re, _, meta = come_fast.load(out)
    assert meta["method"] == "replaceme" and meta["provenance"] == json.loads(json.dumps(res.provenance))
    x = tokens(n=1, T=7)
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert stock.config.num_hidden_layers == 4
    assert torch.equal(logits(stock, x), logits(model, x))
    assert torch.equal(logits(re, x), logits(model, x))
    with torch.inference_mode():
        assert torch.equal(stock.generate(x, max_new_tokens=4, do_sample=False),
                           stock.generate(x, max_new_tokens=4, do_sample=False, use_cache=False))


# -- (5) end to end -----------------------------------------------------------------------

def test_compress_by_ratio_lowers_the_calibration_residual_measured_by_hand():
    """The fold layer's output in the compressed model is closer to the
    original output after the block than plain deletion's: the report's
    residuals, recomputed from hooks on the HF models."""
    model = near_identity_block("llama", L=6, block=(2, 3))
    ids = tokens(n=8, T=32)
    original = copy.deepcopy(model)
    res = come_fast.compress(model, ratio=0.3, method="replaceme", calib=ids)  # 2 of 6 layers
    step = res.report[0]
    s, n = step["start"], len(step["removed"])
    assert n == 2 and res.layers_after == 4 and model.config.num_hidden_layers == 4
    assert res.achieved_ratio == pytest.approx(0.3, abs=0.05)
    m, y, teacher = hand_fit_data(original, ids, s, n)
    r = teacher - y

    def fold_output(mdl):
        got = {}
        h = mdl.model.layers[s - 1].register_forward_hook(lambda mod, a, o: got.__setitem__("o", o))
        try:
            logits(mdl, ids)
        finally:
            h.remove()
        return got["o"].reshape(-1, D).double()

    before = float(((teacher - (y + m)) ** 2).sum() / (r ** 2).sum())
    after = float(((teacher - fold_output(model)) ** 2).sum() / (r ** 2).sum())
    deleted = hand_model(original, s, n, torch.eye(D, dtype=torch.float64))
    assert float(((teacher - fold_output(deleted)) ** 2).sum() / (r ** 2).sum()) == pytest.approx(before, rel=1e-4)
    assert step["residual_before"] == pytest.approx(before, rel=1e-4)
    assert step["residual_after"] == pytest.approx(after, rel=1e-3)
    assert after < before


def test_options_are_declared_and_bad_values_refused():
    assert methods.OPTIONS["replaceme"] == {"replaceme_tokens", "replaceme_distance", "replaceme_ridge"}
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown option"):
        come_fast.compress(model, target_layers=4, method="replaceme", calib=tokens(), score_rows=2)
    with pytest.raises(ValueError, match="replaceme_tokens"):
        come_fast.compress(model, target_layers=4, method="replaceme", calib=tokens(), replaceme_tokens="first")
    with pytest.raises(ValueError, match="replaceme_ridge"):
        come_fast.compress(model, target_layers=4, method="replaceme", calib=tokens(), replaceme_ridge=-1)
