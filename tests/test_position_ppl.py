"""benchmarks/position_ppl.py's per-position losses (the diagnosis in the README's
distillation section) against HF's own loss and a hand-computed position."""
import importlib.util
import math
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


def test_token_kinds_of_wikitext_pieces():
    kind, K = _script().token_kind, _script().KINDS
    assert [kind(p) for p in (" @-@", " =", "@", " ,", " .", " 's", "\n\n", " ", ".", ")\"", " Boulter", "ter", "2000")] \
        == [K[0], K[0], K[0], K[1], K[1], K[1], K[2], K[2], K[3], K[3], K[4], K[4], K[4]]


def test_seen_pair_marks_only_pairs_that_occurred_earlier_in_the_same_row():
    x = torch.tensor([[5, 6, 7, 5, 6, 5, 7],
                      [1, 2, 1, 2, 1, 2, 3]])
    # row 0: pairs (5,6) (6,7) (7,5) (5,6)* (6,5) (5,7); row 1: (1,2) (2,1) (1,2)* (2,1)* (1,2)* (2,3)
    assert _script().seen_pair(x).tolist() == [[False, False, False, True, False, False],
                                               [False, False, True, True, True, False]]


def test_excess_shares_of_a_partition_sum_to_one_and_match_by_hand():
    loss = torch.tensor([3.0, 2.0, 5.0, 1.0], dtype=torch.float64)
    dense = torch.tensor([1.0, 1.0, 2.0, 1.5], dtype=torch.float64)  # excess 2, 1, 3, -0.5: total 5.5
    a = torch.tensor([True, False, True, False])
    got = _script().excess_shares(loss, dense, {"a": a, "b": ~a, "none": torch.zeros(4, dtype=torch.bool)})
    assert set(got) == {"a", "b"}  # an empty part is left out
    assert abs(got["a"]["share_of_excess"] - 5 / 5.5) < 1e-12 and abs(got["b"]["share_of_excess"] - 0.5 / 5.5) < 1e-12
    assert abs(got["a"]["excess_per_token"] - 2.5) < 1e-12 and got["b"]["tokens"] == 2
    assert abs(got["a"]["ppl"] - math.exp(4.0)) < 1e-9 and abs(got["a"]["dense_ppl"] - math.exp(1.5)) < 1e-9
