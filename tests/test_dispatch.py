"""The backend switch: Triton (interpreted on CPU here) and PyTorch make the
same CoMe decisions and build bit-identical merged layers."""
import os

import pytest
import torch

import come_fast
from come_fast.dispatch import BackendUnavailableError, Ops, resolve_backend
from tiny import tiny_model, tokens

triton = pytest.importorskip("triton", reason="triton not installed")


def test_auto_is_torch_on_cpu_and_bad_names_fail():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        Ops("triton", "cpu")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_triton_and_torch_make_the_same_compression(family):
    ids = tokens(n=4, T=12)
    a = come_fast.compress(tiny_model(family), target_layers=4, calib=ids, backend="torch", compensate=None)
    b = come_fast.compress(tiny_model(family), target_layers=4, calib=ids, backend="triton", compensate=None)
    assert b.settings["backend"] == "triton"
    for x, y in zip(a.report, b.report):
        for key in ("pair", "kv_counts", "mlp_counts", "kv_a", "kv_b", "q_heads_a", "q_heads_b", "mlp_a", "mlp_b"):
            assert x[key] == y[key], key
        torch.testing.assert_close(torch.tensor(x["att_scores"]["mlp_a"]), torch.tensor(y["att_scores"]["mlp_a"]),
                                   rtol=1e-5, atol=1e-6)
        assert x["merged_sha256"] == y["merged_sha256"]  # gathers are copies: bit-identical
    assert a.provenance == b.provenance
