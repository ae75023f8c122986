"""Thresholds calibrated to a share of blocks: fitting, the share they keep, persistence, validation."""

import json

import pytest
import torch
from model_factory import tiny_model

import seerattn_hf as sa
from seerattn_hf.patching import patched_attention_modules
from seerattn_hf.selectors import fit_thresholds, select_blocks

BLOCK = 16


def _patched(num_layers=3, **policy):
    model = tiny_model("llama", num_layers=num_layers)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=BLOCK, gate_hidden_size=16, **policy))
    with torch.no_grad():  # untrained gates are near uniform: spread their scores so thresholds matter
        for parameter in sa.gate_parameters(model):
            parameter.normal_(std=0.5)
    return model


def _kept_shares(model, input_ids):
    """Per layer, the `[HQ]` shares of causal blocks kept by one forward of `input_ids`."""
    sa.reset_sparsity_stats(model)
    with torch.no_grad():
        model(input_ids)
    return [(a.seer_state.kept_blocks / a.seer_state.causal_blocks) for a in patched_attention_modules(model)]


def _random_probs(batch, heads, blocks):
    causal = torch.ones(blocks, blocks, dtype=torch.bool).tril()
    return torch.randn(batch, heads, blocks, blocks).masked_fill(~causal, float("-inf")).softmax(-1)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("target", [0.5, 0.7])
def test_fitted_thresholds_keep_the_target_share_forced_blocks_included(per_head, target):
    probs = _random_probs(2, 3, 12)
    row_valid = torch.tensor([[True] * 12, [True] * 8 + [False] * 4])
    # The diagonal and the first block: a third of the causal blocks are forced.
    policy = sa.SparsityPolicy(sparsity_method="calibrated_threshold", target_density=target, keep_first_blocks=1)
    thresholds = fit_thresholds(policy, probs, row_valid, per_head=per_head)
    assert thresholds.shape == (3 if per_head else 1,)
    mask = select_blocks(policy, probs, row_valid, thresholds=thresholds) & row_valid[:, None, :, None]
    causal = torch.ones(12, 12, dtype=torch.bool).tril() & row_valid[:, None, :, None]
    kept, total = mask.sum(dim=(0, 2, 3)), causal.expand_as(mask).sum(dim=(0, 2, 3))
    # Random probabilities have no ties: the share is the target to the nearest block.
    if per_head:
        assert torch.equal(kept, torch.round(target * total).long())
    else:
        assert int(kept.sum()) == round(target * int(total.sum()))


def test_forced_blocks_beyond_the_target_and_a_full_target_give_the_extreme_thresholds():
    probs = _random_probs(1, 2, 8)
    policy = sa.SparsityPolicy(sparsity_method="calibrated_threshold", target_density=0.1, keep_recent_blocks=3)
    assert fit_thresholds(policy, probs).tolist() == [1.0]
    assert fit_thresholds(policy.replace(target_density=1.0), probs, per_head=True).tolist() == [-1.0, -1.0]


@pytest.mark.parametrize("selector, per_head, sharing", [
    ("gate", False, "head"), ("gate", True, "head"), ("oracle", True, "head"), ("gate", True, "kv_group"),
])
def test_calibrated_layers_keep_the_target_share_of_the_calibration_text(selector, per_head, sharing):
    model = _patched(selector=selector, mask_sharing=sharing, keep_first_blocks=1)
    input_ids = torch.randint(0, 96, (2, 256))
    policy = sa.calibrate_thresholds(model, input_ids, 0.4, per_head=per_head)
    heads = (4 if sharing == "head" else 2) if per_head else 1
    assert [layer for layer, _ in policy.calibrated_thresholds] == [0, 1, 2]
    assert all(len(thresholds) == heads for _, thresholds in policy.calibrated_thresholds)
    thresholds = dict(policy.calibrated_thresholds)
    assert len({thresholds[layer] for layer in thresholds}) == 3  # each layer its own threshold
    sa.update_sparsity_config(model, policy)
    for shares in _kept_shares(model, input_ids):
        # 272 causal blocks per head: one block is 0.4%; kv_group heads keep their group's blocks.
        if per_head:
            assert shares.tolist() == pytest.approx([0.4] * 4, abs=0.005)
        else:
            assert float(shares.mean()) == pytest.approx(0.4, abs=0.002)


def test_calibrating_leaves_the_model_as_it_was():
    model = _patched(sparsity_method="density", density=0.3)
    input_ids = torch.randint(0, 96, (1, 128))
    before = _kept_shares(model, input_ids)
    stats = sa.get_sparsity_stats(model)
    sa.set_attention_mode(model, "dense")
    sa.calibrate_thresholds(model, input_ids, 0.5)
    assert model.seer_config.sparsity_method == "density"
    assert all(a.seer_state.mode == "dense" for a in patched_attention_modules(model))
    assert sa.get_sparsity_stats(model) == stats
    sa.set_attention_mode(model, "sparse")
    assert all(torch.equal(a, b) for a, b in zip(before, _kept_shares(model, input_ids)))


def test_a_full_target_equals_dense_attention():
    model = _patched()
    input_ids = torch.randint(0, 96, (1, 200))
    sa.update_sparsity_config(model, sa.calibrate_thresholds(model, input_ids, 1.0, per_head=True))
    with torch.no_grad():
        sparse = model(input_ids).logits
        assert sa.get_sparsity_stats(model)["density"] == 1.0
        sa.set_attention_mode(model, "dense")
        dense = model(input_ids).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_thresholds_survive_policy_changes_and_an_adapter_round_trip(tmp_path):
    model = _patched()
    model.name_or_path = "org/tiny-llama"
    input_ids = torch.randint(0, 96, (1, 192))
    policy = sa.calibrate_thresholds(model, input_ids, 0.3, per_head=True)
    sa.update_sparsity_config(model, policy)
    sa.update_sparsity_config(model, sparsity_method="density", density=0.5)
    config = sa.update_sparsity_config(model, sparsity_method="calibrated_threshold", backend="torch")
    assert config.calibrated_thresholds == policy.calibrated_thresholds and config.target_density == 0.3
    with torch.no_grad():
        logits = model(input_ids).logits

    folder = sa.save_gates(model, tmp_path / "gates")
    stored = json.loads((folder / "seer_config.json").read_text())["sparsity_policy"]
    assert stored["sparsity_method"] == "calibrated_threshold"
    assert stored["calibrated_thresholds"] == {str(layer): list(t) for layer, t in policy.calibrated_thresholds}
    fresh = tiny_model("llama", num_layers=3)
    fresh.load_state_dict(model.state_dict(), strict=False)
    loaded = sa.from_pretrained(folder, model=fresh)
    assert loaded.seer_config.policy == model.seer_config.policy
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, logits)


@pytest.mark.parametrize("field, value", [
    ("target_density", 0.0), ("target_density", 1.5), ("target_density", True),
    ("calibrated_thresholds", {0: [1.5]}), ("calibrated_thresholds", {0: []}), ("calibrated_thresholds", {-1: [0.1]}),
    ("calibrated_thresholds", {"first": [0.1]}), ("calibrated_thresholds", [0.1, 0.2]), ("calibrated_thresholds", {}),
    ("calibrated_thresholds", {0: [float("nan")]}),
])
def test_invalid_calibration_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SparsityPolicy\.{field}: expected .* found"):
        sa.SparsityPolicy(**{field: value})


def test_a_model_refuses_calibrated_thresholds_that_do_not_fit_its_layers():
    model = _patched(num_layers=2)
    with pytest.raises(ValueError, match=r"calibrated_thresholds: expected thresholds for the gated layers \[0, 1\]"
                                         r".*found None"):
        sa.update_sparsity_config(model, sparsity_method="calibrated_threshold")
    with pytest.raises(ValueError, match=r"found 'no thresholds for layers \[1\]"):
        sa.update_sparsity_config(model, sparsity_method="calibrated_threshold", calibrated_thresholds={0: [0.1]})
    with pytest.raises(ValueError, match=r"1 or 4 per layer.*per-layer counts \{1: 3\}"):
        sa.update_sparsity_config(model, sparsity_method="calibrated_threshold",
                                  calibrated_thresholds={0: [0.1], 1: [0.1, 0.2, 0.3]})
    per_query_head = {0: [0.1] * 4, 1: [0.1] * 4}
    sa.update_sparsity_config(model, sparsity_method="calibrated_threshold", calibrated_thresholds=per_query_head)
    with pytest.raises(ValueError, match=r"1 or 2 per layer"):  # kv_group masks have one threshold per KV head
        sa.update_sparsity_config(model, mask_sharing="kv_group")
    assert model.seer_config.mask_sharing == "head"
    with pytest.raises(ValueError, match="calibrated_thresholds"):
        sa.apply_seer_attention(tiny_model("llama", num_layers=2),
                                sa.SeerAttentionConfig(block_size=BLOCK, sparsity_method="calibrated_threshold"))


def test_calibrate_thresholds_checks_its_arguments():
    model = _patched(num_layers=1)
    input_ids = torch.randint(0, 96, (1, 64))
    with pytest.raises(ValueError, match=r"calibrate_thresholds\.target_density: expected a number in \(0, 1\]"):
        sa.calibrate_thresholds(model, input_ids, 0.0)
    with pytest.raises(ValueError, match=r"calibrate_thresholds\.per_head: expected a bool, found 'yes'"):
        sa.calibrate_thresholds(model, input_ids, 0.5, per_head="yes")
    with pytest.raises(ValueError, match=r"expected input_ids of shape \[B, T\], found \[64\]"):
        sa.calibrate_thresholds(model, input_ids[0], 0.5)
    sa.update_sparsity_config(model, min_sparse_length=1000)
    with pytest.raises(ValueError, match=r"layers \[0\] ran dense attention"):
        sa.calibrate_thresholds(model, input_ids, 0.5)
    with pytest.raises(ValueError, match="no SeerAttention gates"):
        sa.calibrate_thresholds(tiny_model("llama"), input_ids, 0.5)


def test_chunked_prefill_selects_with_the_calibrated_thresholds():
    from transformers import DynamicCache

    model = _patched()
    input_ids = torch.randint(0, 96, (1, 150))

    def chunked_logits():
        cache, logits = DynamicCache(), []
        with torch.no_grad():
            for start, end in ((0, 61), (61, 150)):  # the second chunk starts inside a block
                logits.append(model(input_ids=input_ids[:, start:end], past_key_values=cache, use_cache=True).logits)
        return torch.cat(logits, dim=1)

    sa.update_sparsity_config(model, sa.calibrate_thresholds(model, input_ids, 1.0))
    sa.reset_sparsity_stats(model)
    full = chunked_logits()
    assert sa.get_sparsity_stats(model)["paths"]["sparse_continued"] == 3
    with torch.no_grad():
        sa.set_attention_mode(model, "dense")
        torch.testing.assert_close(full, model(input_ids).logits, rtol=1e-5, atol=1e-5)
        sa.set_attention_mode(model, "sparse")
    sa.update_sparsity_config(model, sa.calibrate_thresholds(model, input_ids, 0.4))
    sa.reset_sparsity_stats(model)
    chunked_logits()
    assert sa.get_sparsity_stats(model)["density"] < 0.6
