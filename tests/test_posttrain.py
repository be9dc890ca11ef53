"""Hierarchical distillation along the provenance (come_fast.posttrain) on tiny
random models. The teacher targets are checked against forward hooks on the
teacher's own decoder layers, the student's training forward against the
model's own logits, the loss definition against a hand computation, and the
result against a stock reload."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import come_fast
from come_fast.adapters import adapter_for
from come_fast.posttrain import _run_layers, hierarchical_distill, last_original, teacher_targets
from tiny import tiny_model, tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest


def layer_outputs(model, ids):
    """Every decoder layer's output, captured by forward hooks (independent of our layer loop)."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    try:
        with torch.inference_mode():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_last_original():
    assert last_original(4) == 4
    assert last_original([2, 3]) == 3
    assert last_original([[5, 6], 7]) == 7
    assert last_original([7, [5, 9]]) == 9


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_teacher_targets_are_the_teacher_layer_outputs_named_by_the_provenance(family):
    teacher = tiny_model(family)
    ids = tokens(n=5)
    prov = [0, [1, 2], [[3, 4]], 5]
    targets, final = teacher_targets(adapter_for(teacher), ids, prov, batch_size=2)
    ref = layer_outputs(teacher, ids)
    for t, j in zip(targets, [0, 2, 4, 5]):
        torch.testing.assert_close(t, ref[j], rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        hs = teacher(ids, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(final, hs[-1], rtol=1e-5, atol=1e-5)  # HF's last entry is after the final norm
    with pytest.raises(ValueError, match="original layer 9"):
        teacher_targets(adapter_for(teacher), ids, [0, 9])


def test_training_forward_is_the_model_forward():
    model = tiny_model("mistral")
    ids = tokens(n=3)
    a = adapter_for(model)
    with torch.inference_mode():
        outs, last = _run_layers(a, a.embed(ids), torch.arange(ids.shape[1])[None])
        ours = a.lm_head(a.final_norm(last))
        ref = model(ids, use_cache=False).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # causal masking included
    torch.testing.assert_close(outs[2], layer_outputs(model, ids)[2], rtol=1e-5, atol=1e-5)


def test_loss_is_the_scaled_layer_mse_plus_kl_by_hand():
    teacher = tiny_model("llama")
    ids = tokens(n=4)
    res = come_fast.compress(copy.deepcopy(teacher), target_layers=4, calib=ids, compensate=None)
    student = res.model
    prov = res.provenance
    rep = hierarchical_distill(adapter_for(student), adapter_for(teacher), ids, prov, steps=1, lr=0.0,
                               mse=0.7, kl=0.3, batch_size=4)
    # by hand: per student layer the MSE to the teacher output after its last original layer, over that
    # target's mean square, averaged over layers; plus KL(teacher || student) of the output distributions
    s_out = layer_outputs(student, ids)
    t_out = layer_outputs(teacher, ids)
    mse = sum(F.mse_loss(s, t_out[last_original(p)]) / t_out[last_original(p)].pow(2).mean()
              for s, p in zip(s_out, prov)) / len(prov)
    with torch.inference_mode():
        ls = F.log_softmax(student(ids, use_cache=False).logits, -1)
        lt = F.log_softmax(teacher(ids, use_cache=False).logits, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    assert rep["loss_before"] == pytest.approx(float(0.7 * mse + 0.3 * kl), rel=1e-4)
    assert rep["loss_after"] == pytest.approx(rep["loss_before"], rel=1e-6)  # lr 0: nothing moved
    assert rep["matched_teacher_layers"] == [last_original(p) for p in prov]


@pytest.mark.parametrize("method", ["come", "shortgpt"])  # merged layers, and deleted ones (the sweep's fair pair)
def test_compress_with_distillation_lowers_the_loss_trains_only_decoder_layers_and_reloads(tmp_path, method):
    ids = tokens(n=8)
    model = tiny_model("qwen2")
    plain = come_fast.compress(tiny_model("qwen2"), target_layers=4, calib=ids, method=method, compensate=None)
    res = come_fast.compress(model, target_layers=4, calib=ids, method=method, distill_steps=30, distill_lr=1e-3,
                             compensate=None)
    assert res.provenance == plain.provenance  # the same merges or deletions, then training
    d = res.report[-1]["distillation"]
    assert d["matched_teacher_layers"] == [last_original(p) for p in plain.provenance]
    assert d["loss_after"] < 0.8 * d["loss_before"]
    assert res.settings["distill"]["steps"] == 30 and res.settings["distill"]["lr"] == 1e-3
    sd, sp = res.model.state_dict(), plain.model.state_dict()
    changed = {k for k in sd if not torch.equal(sd[k], sp[k])}
    assert changed and all(k.startswith("model.layers.") for k in changed)
    assert all(p.requires_grad for p in res.model.parameters())  # flags restored: all True, as HF made them
    out = come_fast.save(res, tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = tokens(n=1, T=7)
    with torch.inference_mode():
        assert torch.equal(stock(x).logits, res.model(x).logits)


def test_distillation_errors():
    ids = tokens(n=4)
    with pytest.raises(ValueError, match="unknown distillation option"):
        come_fast.compress(tiny_model("llama"), target_layers=4, calib=ids, distill_steps=2, distill_lrr=1e-3)
    with pytest.raises(ValueError, match="non-negative integer"):
        come_fast.compress(tiny_model("llama"), target_layers=4, calib=ids, distill_steps=-1)
    with pytest.raises(ValueError, match="teacher has 4 layers"):
        come_fast.compress(tiny_model("llama"), target_layers=4, calib=ids, distill_steps=2,
                           teacher=tiny_model("llama", num_hidden_layers=4))
    with pytest.raises(ValueError, match="sublayers"):
        come_fast.compress(tiny_model("llama"), ratio=0.2, calib=ids, method="finercut", distill_steps=2)
    with pytest.raises(ValueError, match="distill_lr"):
        come_fast.compress(tiny_model("llama"), target_layers=4, calib=ids, distill_steps=3, distill_lr=1e30)


def test_diverged_distillation_is_refused_and_the_model_restored(monkeypatch):
    """A distillation that ends in NaN raises, and the caller's model comes back
    as it was given: its layer objects untouched, the layer count and its outputs."""
    from come_fast import distill as trainer

    real = trainer.distill

    def diverging(forward, params, *args, **kwargs):
        rep = real(forward, params, *args, **kwargs)
        with torch.no_grad():
            params[0].fill_(float("nan"))
        return rep

    monkeypatch.setattr("come_fast.posttrain.distill", diverging)
    model = tiny_model("llama")
    ids = tokens(n=8, T=32)
    x = tokens(n=1, T=7)
    with torch.inference_mode():
        before = model(x).logits
    layers = list(model.model.layers)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("come", "shortgpt"):
        with pytest.raises(FloatingPointError, match="distillation diverged .*lower distill_lr"):
            come_fast.compress(model, target_layers=4, method=method, calib=ids, distill_steps=2)
        assert list(model.model.layers) == layers and model.config.num_hidden_layers == 6
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
        with torch.inference_mode():
            assert torch.equal(model(x).logits, before)
