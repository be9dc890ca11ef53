"""Faithful mode against the recorded run of the authors' release
(shared/fixtures/come_reference, SmolLM2-135M, 30 -> 21, float32).

Decisions must match exactly. Where one does not, the assertion message shows
the recorded margin of that decision, so a float near-tie is told apart from a
bug at once.
"""
import hashlib
import json

import numpy as np
import pytest
import torch

import come_fast
from conftest import need_fixtures

pytestmark = pytest.mark.real_model


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def trace():
    return json.loads((need_fixtures() / "trace_A_30to21.json").read_text())


@pytest.fixture(scope="module")
def faithful_run(smollm2, trace):
    from safetensors.torch import load_file

    fresh, tok = smollm2
    ids = load_file(str(need_fixtures() / "calib_tokens.safetensors"))["input_ids"]
    assert tuple(ids.shape) == (32, 256)
    model = fresh()
    res = come_fast.compress(model, target_layers=trace["command_args"]["target_layers"], calib=ids,
                             tokenizer=tok, faithful=True, allow_repeat=False, backend="torch")
    return res


def test_same_pair_every_step(faithful_run, trace):
    got = [s["pair"][0] for s in faithful_run.report]
    want = [s["idx"] for s in trace["steps"]]
    margins = [s["diag_pair_margin"] for s in trace["steps"]]
    assert got == want, f"pairs {got} != reference {want}; recorded pair margins {margins}"


def test_scores_match_reference_values(faithful_run, trace):
    """Our running-sum statistics against the release's per-token products."""
    for mine, ref in zip(faithful_run.report, trace["steps"]):
        L = mine["layers_before"]
        # the release divides both score lists by their length; only ratios matter
        bi = np.array(mine["bi_sum"]) / L
        pair = np.array(mine["pair_distance_sum"]) / (L - 1)
        np.testing.assert_allclose(bi, ref["bi"], rtol=1e-5)
        np.testing.assert_allclose(pair, ref["pair_scores_raw"], rtol=1e-5, atol=1e-7)
        l = mine["pair"][0]
        np.testing.assert_allclose(mine["att_scores"]["att_a"], ref["headgroup_importance"][l], rtol=1e-4)
        np.testing.assert_allclose(mine["att_scores"]["att_b"], ref["headgroup_importance"][l + 1], rtol=1e-4)
        ni = ref["neuron_importance_of_merged_layers"]
        np.testing.assert_allclose(mine["att_scores"]["mlp_a"], ni[str(l)], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(mine["att_scores"]["mlp_b"], ni[str(l + 1)], rtol=1e-4, atol=1e-7)


def test_same_split_counts_and_selected_units(faithful_run, trace):
    for mine, ref in zip(faithful_run.report, trace["steps"]):
        step = ref["step"]
        assert mine["ratio"][0] == pytest.approx(ref["r"], rel=1e-6)
        assert mine["kv_counts"] == ref["merge"]["heads"]["merge_num"], f"step {step}"
        assert mine["mlp_counts"] == ref["merge"]["mlp"]["merge_num"], f"step {step}"
        # per_layer lists only the layers that contribute, in concatenation order
        kv = [x for x in (mine["kv_a"], mine["kv_b"]) if x]
        q = [x for x in (mine["q_heads_a"], mine["q_heads_b"]) if x]
        mlp = [x for x in (mine["mlp_a"], mine["mlp_b"]) if x]
        for got, pl in zip(kv, ref["merge"]["heads"]["per_layer"]):
            assert got == pl["kv_groups_in_concat_order"], f"step {step} layer {pl['layer']} margin {pl['diag_boundary_margin']}"
        for got, pl in zip(q, ref["merge"]["heads"]["per_layer"]):
            assert got == pl["q_heads_in_concat_order"], f"step {step} layer {pl['layer']}"
        for got, pl in zip(mlp, ref["merge"]["mlp"]["per_layer"]):
            assert got == pl["channels_in_concat_order"], f"step {step} layer {pl['layer']} margin {pl['diag_boundary_margin']}"


def test_same_provenance(faithful_run, trace):
    assert faithful_run.provenance == trace["final"]["layer_provenance"]
    for mine, ref in zip(faithful_run.report, trace["steps"]):
        assert mine["provenance"] == ref["layer_info_after"]


def test_merged_weights_bit_identical(faithful_run, trace):
    for mine, ref in zip(faithful_run.report, trace["steps"]):
        assert mine["merged_sha256"] == ref["merged_layer_sha256"], f"step {ref['step']}"
    sd = faithful_run.model.state_dict()
    want = trace["final"]["state_dict_sha256"]
    assert sorted(sd) == sorted(want)
    bad = [k for k, v in want.items() if sha(sd[k]) != v["sha256"]]
    assert not bad, f"{len(bad)} tensors differ from the reference, first: {bad[:3]}"


def test_achieved_ratio_and_layers(faithful_run):
    r = faithful_run
    assert r.layers_before == 30 and r.layers_after == 21
    assert len(r.model.model.layers) == 21 and r.model.config.num_hidden_layers == 21
    assert [l.self_attn.layer_idx for l in r.model.model.layers] == list(range(21))
    per_layer = sum(p.numel() for p in r.model.model.layers[0].parameters())
    assert r.params_before - r.params_after == 9 * per_layer
    assert r.achieved_ratio == pytest.approx(9 * per_layer / r.params_before)


def test_save_reload_identical_logits_and_generate(faithful_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = come_fast.save(faithful_run, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # stock, no custom code
    assert reloaded.config.num_hidden_layers == 21
    assert reloaded.config.come_fast["provenance"] == faithful_run.provenance
    x = torch.tensor([[20990, 2776, 34014, 65, 5397, 14985, 9373, 281]])
    with torch.inference_mode():
        a = faithful_run.model(x).logits
        b = reloaded(x).logits
    assert torch.equal(a, b)
    with torch.inference_mode():
        g1 = reloaded.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
        g2 = reloaded.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert g1.shape == (1, 14) and torch.equal(g1, g2)  # the KV cache path agrees with the uncached one
    m2, tok2, meta = come_fast.load(out)
    assert meta["provenance"] == faithful_run.provenance and tok2 is not None
