"""CoMe and CoMe-P on bfloat16 and float16 models (issue 12: the step report hashed
tensors through numpy, which has no bfloat16, and the model was left half merged).
The result keeps the model's dtype, its outputs are finite, and it reloads exactly."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import come_fast
from come_fast.bench import LEGACY  # every lever off
from tiny import tiny_model, tokens



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method,opts", [("come", {}), ("come", {"faithful": True}), ("come", LEGACY),
                                         ("come-p", {"grid_steps": 2})])
def test_tiny_half_precision(dtype, method, opts, tmp_path):
    tiny_model("qwen3").save_pretrained(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=dtype)  # as a user loads it
    res = come_fast.compress(model, target_layers=4, calib=tokens(n=8, T=32), method=method, **opts)
    assert res.layers_after == 4 and {p.dtype for p in model.parameters()} == {dtype}
    steps = [st for st in res.report if "pair" in st]
    assert steps and all(len(h) == 64 for st in steps for h in st["merged_sha256"].values())
    x = tokens(n=1, T=7)
    out = come_fast.save(res, tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    with torch.inference_mode():
        logits = model(x).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(back(x).logits, logits)


def test_hashes_of_float32_are_the_numpy_bytes():
    """The dtype-free hash is the one faithful mode's trace compares with (float32 bytes)."""
    import hashlib

    from come_fast.methods.come import _hashes

    layer = tiny_model("llama").model.layers[0]
    want = {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
            for k, v in layer.state_dict().items()}
    assert _hashes(layer) == want


@pytest.mark.parametrize("method,opts", [("come", {"compensate": None}), ("come-p", {"grid_steps": 2})])
def test_smollm2_in_bfloat16(smollm2, method, opts):
    fresh, tok = smollm2
    model = fresh().to(torch.bfloat16)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 40, return_tensors="pt").input_ids[:, :256]
    calib = ids.reshape(4, 64)
    res = come_fast.compress(model, target_layers=29, calib=calib, method=method, **opts)
    assert res.layers_after == 29 and next(model.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        assert torch.isfinite(model(calib[:1]).logits).all()
