"""The distillation options of issue 15: the block-mass target and the recall loss (arguments, the
loss by hand, its gradient, and training that lowers each option's own loss on a tiny model)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from model_factory import tiny_model  # tests/ is on sys.path
from training_helpers import tiny_run_args

import seerattn_hf as sa
from seerattn_hf.attention import DistillRecord
from seerattn_hf.patching import set_distill_targets
from seerattn_hf.training.arguments import build_parser, parse_arguments
from seerattn_hf.training.cli import run
from seerattn_hf.training.metrics import distillation_loss, layer_missed_mass, row_budget_recall

NEG_INF = float("-inf")


def causal_log_probs(scores: torch.Tensor) -> torch.Tensor:
    blocks = scores.shape[-1]
    return scores.masked_fill(torch.ones(blocks, blocks, dtype=torch.bool).triu(1), NEG_INF).log_softmax(-1)


def test_defaults_and_yaml_and_help(tmp_path):
    train = parse_arguments([]).train
    assert (train.distill_target, train.distill_loss, train.recall_loss_densities) == ("block_max", "kl",
                                                                                         [0.5, 0.3, 0.1])
    assert train.decode_distill_target == "block_max"
    config = tmp_path / "run.yaml"
    config.write_text("distill_target: block_mass\ndistill_loss: recall\nrecall_loss_densities: [0.2]\n")
    train = parse_arguments(["--config", str(config)]).train
    assert (train.distill_target, train.distill_loss, train.recall_loss_densities) == ("block_mass", "recall", [0.2])
    config.write_text("gate_type: decode\ndecode_distill_target: block_mass\n")
    assert parse_arguments(["--config", str(config)]).train.decode_distill_target == "block_mass"
    text = " ".join(build_parser().format_help().split())
    assert "'block_max', 'block_mass'" in text and "'kl', 'recall'" in text and "--decode_distill_target" in text


def test_both_targets_are_recorded_with_the_run_settings():
    from seerattn_hf.training.run_log import tracker_config

    arguments = parse_arguments(["--gate_type", "both", "--distill_target", "block_mass",
                                 "--decode_distill_target", "block_mass"])
    for values in (arguments.to_dict(), tracker_config(arguments)):
        assert (values["distill_target"], values["decode_distill_target"]) == ("block_mass", "block_mass")


@pytest.mark.parametrize("flags, message", [
    (["--distill_target", "block_sum"], "--distill_target: expected one of ['block_max', 'block_mass'], "
                                        "found 'block_sum'"),
    (["--distill_loss", "mse"], "--distill_loss: expected one of ['kl', 'recall'], found 'mse'"),
    (["--recall_loss_densities", "0.3", "1.5"], "--recall_loss_densities: expected a non-empty list of numbers"),
    (["--gate_type", "decode", "--distill_loss", "recall"], "--distill_loss: expected 'kl' with gate_type 'decode'"),
    (["--gate_type", "both", "--distill_loss", "recall"], "--distill_loss: expected 'kl' with gate_type 'both'"),
    (["--gate_type", "decode", "--distill_target", "block_mass"],
     "--distill_target: expected 'block_max' with gate_type 'decode' (it is the prefill gates' target; decode "
     "gates: --decode_distill_target), found 'block_mass'"),
    (["--gate_type", "decode", "--decode_distill_target", "block_sum"],
     "--decode_distill_target: expected one of ['block_max', 'block_mass'], found 'block_sum'"),
    (["--decode_distill_target", "block_mass"],
     "--decode_distill_target: expected 'block_max' with gate_type 'prefill' (it is the decode gates' target: "
     "gate_type 'decode' or 'both'; prefill gates: --distill_target), found 'block_mass'"),
])
def test_bad_values_name_the_field(flags, message):
    with pytest.raises(ValueError) as error:
        parse_arguments(flags)
    assert message in str(error.value)


def test_budget_recall_by_hand_and_bounded_by_the_oracle():
    # One row of 4 causal blocks (row index 3), target mass [0.1, 0.2, 0.3, 0.4].
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 3] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    gate = torch.zeros(1, 1, 4, 4)
    gate[0, 0, 3] = torch.tensor([0.1, 0.1, 0.2, 0.6])
    log_gate = gate.log()
    # density 0.5: k = 2 blocks; kept shares min(1, 2 g) = [0.2, 0.2, 0.4, 1]
    assert float(row_budget_recall(target, log_gate, 0.5)[0, 0, 3]) == pytest.approx(
        0.1 * 0.2 + 0.2 * 0.2 + 0.3 * 0.4 + 0.4)
    # Half the probability on each of the two best blocks reaches the oracle's top-2 mass, 0.7.
    gate[0, 0, 3] = torch.tensor([0.0, 0.0, 0.5, 0.5])
    assert float(row_budget_recall(target, gate.log(), 0.5)[0, 0, 3]) == pytest.approx(0.7)
    torch.manual_seed(0)
    for _ in range(20):
        scores = torch.randn(2, 3, 7, 7) * 3
        target = causal_log_probs(torch.randn(2, 3, 7, 7) * 2).exp()
        for density in (0.1, 0.3, 0.5):
            recall = row_budget_recall(target, causal_log_probs(scores), density)
            k = torch.ceil(density * torch.arange(1, 8, dtype=torch.float64)).long()
            oracle = torch.stack([target[:, :, i].topk(int(k[i]), dim=-1).values.sum(-1) for i in range(7)], -1)
            assert (recall <= oracle + 1e-6).all()


def test_recall_loss_rows_budgets_and_scale():
    torch.manual_seed(1)
    target = causal_log_probs(torch.randn(1, 2, 8, 8)).exp()
    log_gate = causal_log_probs(torch.randn(1, 2, 8, 8))
    valid = torch.ones(1, 8, dtype=torch.bool)
    missed = [1 - row_budget_recall(target, log_gate, d)[..., 2:] for d in (0.5, 0.1)]
    expected = float(torch.stack(missed).mean())
    assert float(layer_missed_mass(target, log_gate, valid, (0.5, 0.1), 0.25)) == pytest.approx(expected)
    records = [DistillRecord(0, target, log_gate, valid)] * 2
    loss, per_layer = distillation_loss(records, 10.0, 0.25, "recall", (0.5, 0.1))
    assert float(loss) == pytest.approx(20 * expected) and per_layer.shape == (2,)
    with pytest.raises(ValueError, match="expected one of \\['kl', 'recall'\\], found 'l2'"):
        distillation_loss(records, loss="l2")


def distilling_model(target: str):
    """A tiny Qwen2 (4 query heads, 2 KV heads) with fresh gates in distillation mode; every weight
    requires grad, so a gradient reaching the base model would show."""
    torch.manual_seed(0)
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, gate_hidden_size=16))
    sa.set_attention_mode(model, "distill")
    set_distill_targets(model, ("prefill",), prefill_target=target)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def left_padded_batch():
    input_ids = torch.randint(0, 96, (2, 90))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :21] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("target", ["block_max", "block_mass"])
def test_recall_gradient_reaches_only_the_gates(target):
    model = distilling_model(target)
    input_ids, attention_mask = left_padded_batch()
    model(input_ids=input_ids, attention_mask=attention_mask)
    records = sa.pop_distill_records(model)
    assert all(not record.target.requires_grad for record in records)
    loss, _ = distillation_loss(records, loss="recall")
    loss.backward()
    gates = {id(p) for p in sa.gate_parameters(model)}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sa.gate_parameters(model))
    assert all(p.grad is None for p in model.parameters() if id(p) not in gates)


def test_block_mass_target_of_a_padded_batch_is_the_reference():
    model = distilling_model("block_mass")
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    for record in sa.pop_distill_records(model):
        sums = record.target.sum(-1)  # [B, HQ, NB]: 6 blocks, the padded sequence has 5 (69 tokens)
        assert torch.allclose(sums[0], torch.ones(())) and torch.allclose(sums[1, :, :5], torch.ones(()))
        assert (sums[1, :, 5] == 0).all() and record.row_valid[1].tolist() == [True] * 5 + [False]
    assert sa.get_sparsity_stats(model)["backends"] == {"distill:torch": 2}  # the torch reference, 2 layers


def oracle_missed_mass(record, densities) -> float:
    """The least missed mass a gate can reach: 1 - the mass of each row's k best target blocks,
    averaged like `layer_missed_mass`."""
    target, valid = record.target, record.row_valid
    missed = []
    for density in densities:
        rows = [1 - target[:, :, i].topk(math.ceil(density * (i + 1)), dim=-1).values.sum(-1)
                for i in range(target.shape[-1])]
        missed.append(torch.stack(rows, -1))
    weights = valid[:, None, :].expand_as(missed[0]).double()
    return float((torch.stack(missed).mean(0) * weights).sum() / weights.sum())


@pytest.mark.parametrize("target, loss", [("block_max", "kl"), ("block_mass", "kl"), ("block_max", "recall"),
                                          ("block_mass", "recall")])
def test_a_few_steps_lower_the_options_own_loss(target, loss):
    model = distilling_model(target)
    # The recall loss's gradients are smaller (a block's share of a budget moves by k * g * t).
    optimizer = torch.optim.Adam(sa.gate_parameters(model), lr=1e-2 if loss == "kl" else 5e-2)
    input_ids, attention_mask = left_padded_batch()
    losses, floor = [], 0.0
    for _ in range(10):
        model(input_ids=input_ids, attention_mask=attention_mask)
        records = sa.pop_distill_records(model)
        if loss == "recall":  # the base model is frozen: the targets, hence the floor, never change
            floor = 10.0 * sum(oracle_missed_mass(r, (0.5, 0.3, 0.1)) for r in records)
        value, _ = distillation_loss(records, loss=loss, skip_fraction=0.0)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    # KL's floor is 0; the recall loss's, the oracle's missed mass, is far above 0 on a random model's
    # flat attention, and no gate goes below it. Ten steps close most of the gap to the floor.
    assert min(losses) >= floor - 1e-4
    assert losses[-1] - floor < 0.6 * (losses[0] - floor), (losses, floor)


def test_trainer_runs_the_options_and_logs_the_missed_mass(tiny_checkpoint, jsonl_corpus, tmp_path):
    summary = run(tiny_run_args(tiny_checkpoint, jsonl_corpus, tmp_path / "run", max_steps=2, save_steps=0,
                                eval_steps=0, distill_target="block_mass", distill_loss="recall"))
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    assert len(steps) == 2 and all("missed_mass" in r and "kl" not in r for r in steps)
    assert len(steps[0]["missed_mass_per_layer"]) == 2 and 0 < steps[0]["missed_mass"] < 1
    assert summary["step"] == 2 and "kl" in summary["eval"]
