"""Loss and gate-quality metrics against hand-computed values; held-out perplexity and its report."""

from __future__ import annotations

import math

import pytest
import torch
from model_factory import tiny_model  # tests/ is on sys.path

from seerattn_hf.attention import DistillRecord
from seerattn_hf.config import SeerAttentionConfig
from seerattn_hf.evaluation.perplexity import batch_token_nll
from seerattn_hf.training.evaluation import format_perplexity_report, perplexity
from seerattn_hf.training.metrics import (
    GateQuality,
    block_recall,
    distillation_loss,
    layer_kl,
    loss_rows,
    row_kl,
)

NEG_INF = float("-inf")


def hand_example():
    """One sequence, one head, 3 blocks. Rows of the target sum to 1 and are 0 above the diagonal."""
    target = torch.tensor([[1.0, 0.0, 0.0],
                           [0.75, 0.25, 0.0],
                           [0.5, 0.0, 0.5]])[None, None]
    gate = torch.tensor([[1.0, 0.0, 0.0],
                         [0.5, 0.5, 0.0],
                         [0.25, 0.25, 0.5]])[None, None]
    log_gate = gate.log().masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), NEG_INF).requires_grad_(True)
    return target, log_gate


def test_row_kl_by_hand_and_no_nan_from_zero_times_inf():
    target, log_gate = hand_example()
    kl = row_kl(target, log_gate)
    expected = [0.0, 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5),
                0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.5)]
    assert kl[0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    kl.sum().backward()
    assert torch.isfinite(log_gate.grad).all()
    # d KL / d log_gate = -target: zero where the target is zero, including above the diagonal.
    assert torch.allclose(log_gate.grad, -target)


def test_loss_rows_skip_the_first_fraction():
    valid = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    rows = loss_rows(valid, 0.25)
    assert rows[0].tolist() == [False, False] + [True] * 6
    assert rows[1].tolist() == [True, True, True] + [False] * 5  # floor(3 * 0.25) = 0 rows skipped
    assert loss_rows(torch.tensor([[True, False]]), 0.9).tolist() == [[True, False]]  # one row always kept


def test_layer_kl_and_scaled_sum_over_layers():
    target, log_gate = hand_example()
    valid = torch.ones(1, 3, dtype=torch.bool)
    log_gate = log_gate.detach()
    row = row_kl(target, log_gate)[0, 0]
    assert float(layer_kl(target, log_gate, valid)) == pytest.approx(float(row.mean()))
    # skip fraction 0.4 of 3 blocks -> floor(1.2) = 1 row left out
    assert float(layer_kl(target, log_gate, valid, 0.4)) == pytest.approx(float(row[1:].mean()))
    records = [DistillRecord(0, target, log_gate, valid), DistillRecord(1, target, log_gate, valid)]
    loss, per_layer = distillation_loss(records, loss_scale=10.0, skip_fraction=0.4)
    assert float(loss) == pytest.approx(10.0 * 2 * float(row[1:].mean()))
    assert per_layer.shape == (2,) and not per_layer.requires_grad


def test_block_recall_by_hand():
    target, _ = hand_example()
    mask = torch.tensor([[True, False, False], [False, True, False], [False, False, True]])[None, None]
    valid = torch.ones(1, 3, dtype=torch.bool)
    assert float(block_recall(target, mask, valid)) == pytest.approx((1.0 + 0.25 + 0.5) / 3)
    valid_two = torch.tensor([[True, True, False]])
    assert float(block_recall(target, mask, valid_two)) == pytest.approx((1.0 + 0.25) / 2)


def test_gate_quality_of_a_perfect_gate():
    torch.manual_seed(0)
    blocks = 6
    scores = torch.randn(2, 3, blocks, blocks).masked_fill(torch.ones(blocks, blocks, dtype=torch.bool).triu(1),
                                                           NEG_INF)
    target = scores.softmax(-1)
    record = DistillRecord(0, target, target.log(), torch.ones(2, blocks, dtype=torch.bool))
    quality = GateQuality(SeerAttentionConfig(block_size=16, threshold=0.0), densities=(1.0, 0.5))
    quality.add([record])
    result = quality.result()
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["recall@density=1"] == pytest.approx(1.0)
    assert result["recall@threshold=0"] == pytest.approx(1.0) and result["density@threshold=0"] == pytest.approx(1.0)
    assert 0.5 < result["recall@density=0.5"] < 1.0


def test_density_at_thresholds_by_hand():
    # Gate row probabilities [1], [0.7, 0.3], [0.5, 0.3, 0.2]; the diagonal is always kept:
    # threshold 0.4 keeps 1 + 2 + 2 of the 6 causal blocks, threshold 0.6 keeps 1 + 2 + 1.
    gate = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.5, 0.3, 0.2]])[None, None]
    log_gate = gate.log().masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), NEG_INF)
    target, _ = hand_example()
    quality = GateQuality(SeerAttentionConfig(block_size=16), densities=(), thresholds=[0.4, 0.6])
    quality.add([DistillRecord(0, target, log_gate, torch.ones(1, 3, dtype=torch.bool))])
    result = quality.result()
    assert result["density@threshold=0.4"] == pytest.approx(5 / 6)
    assert result["density@threshold=0.6"] == pytest.approx(4 / 6)
    # recall at 0.6: rows keep {0}, {0, 1}, {2} -> target mass 1, 1, 0.5
    assert result["recall@threshold=0.6"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_held_out_perplexity_is_exp_of_the_mean_token_nll():
    model = tiny_model()
    sequences = torch.randint(0, 96, (3, 64), dtype=torch.int32)
    expected = math.exp(batch_token_nll(model, sequences).double().mean().item())
    # Three sequences in batches of 2 and 1; the model alone (lm head in chunks) and called as a whole.
    assert perplexity(model, sequences, batch_size=2) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, sequences, batch_size=2, forward=model) == pytest.approx(expected, rel=1e-6)


def test_perplexity_report_is_a_markdown_table():
    rows = [{"setting": "dense", "perplexity": 29.6012, "density": 1.0},
            {"setting": "gate t=0.01", "perplexity": 30.6149, "density": 0.16721}]
    assert format_perplexity_report(rows, "Held-out perplexity:").splitlines() == [
        "Held-out perplexity:", "", "| attention | perplexity | density |", "|---|---|---|",
        "| dense | 29.6 | 1 |", "| gate t=0.01 | 30.61 | 0.1672 |"]
