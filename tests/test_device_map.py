"""compress on a model dispatched by accelerate (a device map: several GPUs,
CPU memory or disk offload) gives the model a plain single-device copy gives.

Here (CPU only) the dispatched models run every layer on the CPU with
accelerate's own hooks: some decoder layers offloaded to disk
(``dispatch_model(..., offload_dir=)``), some to CPU memory (the hooks
``dispatch_model`` attaches for ``"cpu"`` entries when the main device is a
GPU, attached here with ``attach_align_device_hook_on_blocks``), or all
resident with hooks (``force_hooks=True``). The reference is the same model
without hooks, compressed with the same calibration. Results are compared
with ``torch.equal``: both runs do the same float32 CPU operations in the same
order on the same values (offloading only changes where a weight waits
between uses), so nothing but bit-identical output is right. The tests on
CUDA devices (skipped without them) compare within float tolerance instead:
GPU kernels may round differently from the CPU reference.
"""
import copy
import glob
import os

import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook, attach_align_device_hook_on_blocks
from accelerate.utils import OffloadedWeightsLoader, extract_submodules_state_dict
from accelerate.utils.modeling import get_state_dict_offloaded_model
from safetensors.torch import load_file

from come_fast import api
from come_fast.devicemap import DeviceMapError
from come_fast.merge import first_leaf
from tiny import tiny_model, tokens

LAYERS = 6
OFFLOADED = (1, 3, 4)  # layers a merge joins to resident ones, and one pair both offloaded


def device_map(layer_value):
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu"}
    dm.update({f"model.layers.{i}": layer_value(i) for i in range(LAYERS)})
    dm.update({"model.norm": "cpu", "lm_head": "cpu"})
    return dm


def dispatched(model, kind, tmp_path):
    """``model`` with accelerate hooks: ``kind`` "disk" (layers OFFLOADED on
    disk), "cpu" (the same layers offloaded to CPU memory), "hooks" (all
    resident, hooks only) or "cpu_offload" (``accelerate.cpu_offload``: every
    weight offloaded to CPU memory, no device map)."""
    if kind == "cpu_offload":
        from accelerate import cpu_offload

        return cpu_offload(model, execution_device="cpu")
    if kind == "disk":
        return dispatch_model(model, device_map(lambda i: "disk" if i in OFFLOADED else "cpu"),
                              offload_dir=str(tmp_path / "offload"))
    if kind == "hooks":
        return dispatch_model(model, device_map(lambda i: "cpu"), force_hooks=True)
    assert kind == "cpu"
    # what dispatch_model attaches for "cpu" entries when the main device is a GPU, executing on the CPU here
    dm = device_map(lambda i: "cpu")
    off = {k: k in {f"model.layers.{i}" for i in OFFLOADED} for k in dm}
    sd = extract_submodules_state_dict(model.state_dict(), [k for k, v in off.items() if v])
    attach_align_device_hook_on_blocks(model, execution_device={**{k: "cpu" for k in dm}, "": "cpu"}, offload=off,
                                       weights_map=OffloadedWeightsLoader(state_dict=sd))
    model.hf_device_map = dm
    return model


def expected_offloaded(kind):
    return {"hooks": (), "cpu_offload": tuple(range(LAYERS))}.get(kind, OFFLOADED)


def offloaded_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if any(p.is_meta for p in layer.parameters())]


def state(model):
    return {k: v.clone() for k, v in get_state_dict_offloaded_model(model).items()}


def assert_same(ref, got, ids):
    """Same tensors (materialised through accelerate's own utility), same logits."""
    a, b = state(ref.model), state(got.model)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(ref.model(ids).logits, got.model(ids).logits)


CASES = [("come", {}), ("shortgpt", {}), ("shortgpt", {"compensate": "ls"}), ("laco", {})]


@pytest.mark.parametrize("kind", ["disk", "cpu", "hooks", "cpu_offload"])
@pytest.mark.parametrize("method,kw", CASES, ids=[m + "-ls" * bool(k) for m, k in CASES])
def test_dispatched_matches_single_device(tmp_path, kind, method, kw):
    calib, ids = tokens(8, 16), tokens(2, 12, seed=5)
    plain = tiny_model("llama", num_hidden_layers=LAYERS)
    model = dispatched(copy.deepcopy(plain), kind, tmp_path)
    before = getattr(model, "hf_device_map", None)
    assert offloaded_layers(model) == list(expected_offloaded(kind))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)

    ref = api.compress(plain, ratio=0.3, method=method, calib=calib, **kw)
    got = api.compress(model, ratio=0.3, method=method, calib=calib, **kw)
    assert got.model is model and got.provenance == ref.provenance
    assert len(ref.provenance) < LAYERS
    assert (got.params_before, got.params_after) == (ref.params_before, ref.params_after)
    if method == "come":  # the default merges (CoMe with its default "ls" compensation)
        assert any(isinstance(p, list) for p in got.provenance)
        assert got.settings["compensate"]["mode"] == "ls"
    assert_same(ref, got, ids)

    # every layer where the first layer of its span was, with consistent hooks; the map renumbered
    hmap = getattr(model, "hf_device_map", None)
    if before is None:
        assert hmap is None  # no map given (cpu_offload): none made up
    else:
        layer_keys = [k for k in hmap if k.startswith("model.layers.")]
        assert layer_keys == [f"model.layers.{i}" for i in range(len(got.provenance))]
        assert {k: v for k, v in hmap.items() if k not in layer_keys} == \
            {k: v for k, v in before.items() if not k.startswith("model.layers.")}
    want_off = []
    for i, (item, layer) in enumerate(zip(got.provenance, model.model.layers)):
        src = first_leaf(item)
        if before is not None:
            assert hmap[f"model.layers.{i}"] == before[f"model.layers.{src}"]
        hooks = [m._hf_hook for m in layer.modules() if hasattr(m, "_hf_hook")]
        assert hooks and all(isinstance(h, AlignDevicesHook) and torch.device(h.execution_device) ==
                             torch.device("cpu") for h in hooks)
        assert layer.self_attn.layer_idx == i
        if src in expected_offloaded(kind):
            want_off.append(i)
    assert offloaded_layers(model) == want_off
    # generation through the hooks (the KV cache is addressed by the renumbered layers)
    out = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref.model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("kind", ["disk", "cpu"])
def test_save_materialises_offloaded_weights(tmp_path, kind):
    calib = tokens(8, 16)
    plain = tiny_model("llama", num_hidden_layers=LAYERS)
    model = dispatched(copy.deepcopy(plain), kind, tmp_path)
    ref = api.compress(plain, ratio=0.3, calib=calib)
    got = api.compress(model, ratio=0.3, calib=calib)
    assert offloaded_layers(model)  # some result layers are still offloaded
    api.save(ref, tmp_path / "ref")
    api.save(got, tmp_path / "got")
    a, b = ({k: v for f in glob.glob(os.path.join(tmp_path / d, "*.safetensors")) for k, v in load_file(f).items()}
            for d in ("ref", "got"))
    assert set(a) == set(b) and len(a) > 0
    for k in a:
        assert a[k].device.type == "cpu" and not b[k].is_meta and torch.equal(a[k], b[k]), k
    loaded, _, meta = api.load(tmp_path / "got")
    assert meta["provenance"] == ref.provenance
    assert loaded.config.num_hidden_layers == len(ref.provenance)
    ids = tokens(2, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref.model(ids).logits)


def test_from_pretrained_device_map(tmp_path):
    """The user's way in: ``from_pretrained(..., device_map=..., offload_folder=...)``."""
    from transformers import AutoModelForCausalLM

    calib, ids = tokens(8, 16), tokens(2, 12, seed=5)
    plain = tiny_model("llama", num_hidden_layers=LAYERS)
    plain.save_pretrained(tmp_path / "src")
    dm = device_map(lambda i: "disk" if i in OFFLOADED else "cpu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", device_map=dm, dtype=torch.float32,
                                                 offload_folder=str(tmp_path / "offload"))
    assert model.hf_device_map == dm and offloaded_layers(model) == list(OFFLOADED)
    ref = api.compress(plain, ratio=0.3, calib=calib)
    got = api.compress(model, ratio=0.3, calib=calib)
    assert got.provenance == ref.provenance
    assert_same(ref, got, ids)
    assert offloaded_layers(model) == [i for i, p in enumerate(got.provenance) if first_leaf(p) in OFFLOADED]
    api.save(got, tmp_path / "out")
    loaded, _, _ = api.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref.model(ids).logits)


def _fingerprint(model):
    """The layer objects, every module's hook object, every resident parameter
    object (an offloaded one is a fresh meta tensor after each forward: its
    place and shape), the map and the layer count."""
    return ([id(m) for m in model.model.layers],
            {n: id(m.__dict__.get("_hf_hook")) for n, m in model.named_modules()},
            {n: ("meta", tuple(p.shape)) if p.is_meta else (id(p), p.device.type) for n, p in model.named_parameters()},
            dict(getattr(model, "hf_device_map", {})), model.config.num_hidden_layers)


def test_meta_layer_without_offload_refused_before_any_work(tmp_path):
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    # "meta" in the device map: layer 2's weights dropped, no hook able to load them
    dispatch_model(model, device_map(lambda i: "meta" if i == 2 else "cpu"), main_device="cpu")
    before = _fingerprint(model)
    with pytest.raises(DeviceMapError, match=r"model\.layers\.2\..*meta device.*no accelerate offload hook"):
        api.compress(model, ratio=0.3, calib=tokens(8, 16))
    with pytest.raises(ValueError, match="meta device"):  # the default calibration would sample from it: not reached
        api.compress(model, ratio=0.3)
    assert _fingerprint(model) == before


def test_layer_split_over_devices_refused(tmp_path):
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    dm = device_map(lambda i: "cpu")
    del dm["model.layers.2"]
    dm.update({"model.layers.2.self_attn": "cpu", "model.layers.2.mlp": "disk",
               "model.layers.2.input_layernorm": "cpu", "model.layers.2.post_attention_layernorm": "cpu"})
    dispatch_model(model, dm, offload_dir=str(tmp_path / "offload"))
    before = _fingerprint(model)
    with pytest.raises(DeviceMapError, match="splits a decoder layer"):
        api.compress(model, ratio=0.3, calib=tokens(8, 16))
    assert _fingerprint(model) == before


@pytest.mark.parametrize("kw,match", [({"method": "taylor+"}, "needs the weights of the whole model"),
                                      ({"distill_steps": 2}, "distillation"),
                                      ({"calib": None}, "calibration data")])
def test_offloaded_requests_refused(tmp_path, kw, match):
    model = dispatched(tiny_model("llama", num_hidden_layers=LAYERS), "disk", tmp_path)
    before = _fingerprint(model)
    with pytest.raises(DeviceMapError, match=match):
        api.compress(model, ratio=0.3, **{"calib": tokens(8, 16), **kw})
    assert _fingerprint(model) == before


@pytest.mark.parametrize("kind", ["disk", "hooks", "cpu_offload"])
def test_failed_call_leaves_dispatched_model_as_given(tmp_path, monkeypatch, kind):
    import come_fast.compensate as comp

    model = dispatched(tiny_model("llama", num_hidden_layers=LAYERS), kind, tmp_path)
    ids = tokens(2, 12, seed=5)
    with torch.no_grad():
        logits = model(ids).logits
    before = _fingerprint(model)

    def boom(*a, **k):  # after the merges: the layer list has changed by now
        raise RuntimeError("injected")

    monkeypatch.setattr(comp, "compensate_model", boom)
    with pytest.raises(RuntimeError, match="injected"):
        api.compress(model, ratio=0.3, calib=tokens(8, 16))
    assert _fingerprint(model) == before
    assert offloaded_layers(model) == list(expected_offloaded(kind))
    assert "_come_fast_offload" not in model.__dict__ and type(model.model.layers) is torch.nn.ModuleList
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def _cuda_case(devices, tmp_path):
    calib, ids = tokens(8, 16), tokens(2, 12, seed=5)
    plain = tiny_model("llama", num_hidden_layers=LAYERS)
    half = LAYERS // 2
    dm = device_map(lambda i: devices[0] if i < half else devices[1])
    dm["model.layers.4"] = "disk"
    # with a "cpu" entry the CPU is the main device: those layers (and the disk one) execute on the CPU
    main = "cpu" if "cpu" in devices else devices[0]
    model = dispatch_model(copy.deepcopy(plain), dm, offload_dir=str(tmp_path / "offload"), main_device=main)
    # layers executing on the CPU and on a GPU: the PyTorch ops (the Triton ones need CUDA tensors)
    backend = "torch" if "cpu" in devices else "auto"
    ref = api.compress(plain, ratio=0.3, calib=calib)
    got = api.compress(model, ratio=0.3, calib=calib, backend=backend)
    assert got.provenance == ref.provenance
    a, b = state(ref.model), state(got.model)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(got.model(ids).logits.cpu(), ref.model(ids).logits, rtol=1e-4, atol=1e-4)
    for i, item in enumerate(got.provenance):
        assert model.hf_device_map[f"model.layers.{i}"] == dm[f"model.layers.{first_leaf(item)}"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (cuda:0 and cuda:1)")
def test_two_gpus(tmp_path):
    _cuda_case((0, 1), tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (layers on cuda:0 and the CPU)")
def test_gpu_and_cpu_execution(tmp_path):
    _cuda_case((0, "cpu"), tmp_path)
