"""benchmarks/position_ppl.py's per-position losses (the diagnosis in the README's
distillation section) against HF's own loss and a hand-computed position."""
import importlib.util
from pathlib import Path

import torch

from tiny import tiny_model, tokens

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "position_ppl.py"


def _script():
    spec = importlib.util.spec_from_file_location("position_ppl", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_position_losses_average_to_hf_loss_and_match_one_position():
    model = tiny_model("llama")
    x = tokens(n=5, T=16)  # 5 rows in batches of 2: the last batch is short
    pos = _script().position_losses(model, x, batch=2)
    assert pos.shape == (15,)
    with torch.no_grad():
        hf = float(model(x, labels=x).loss)  # the mean over all 5 x 15 predicted tokens
        logp = torch.log_softmax(model(x).logits.double(), -1)
    assert abs(float(pos.mean()) - hf) < 1e-5
    j = 6  # the loss at position j predicts token j + 1, averaged over the rows
    by_hand = -logp[torch.arange(5), j, x[:, j + 1]].mean()
    assert abs(float(pos[j]) - float(by_hand)) < 1e-5
