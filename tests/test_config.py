import json

import pytest

from seerattn_hf import SeerAttentionConfig


def test_defaults_follow_the_paper():
    config = SeerAttentionConfig()
    assert (config.block_size, config.gate_hidden_size) == (64, 128)
    assert config.q_pooling == ["avg"] and config.k_pooling == ["max", "min", "avg"]
    assert config.sparsity_method == "threshold"


def test_json_round_trip(tmp_path):
    config = SeerAttentionConfig(block_size=32, gate_hidden_size=64, q_pooling=["avg", "max"], layers=[0, 3],
                                 sparsity_method="density", density=0.3, dense_last_query_blocks=2,
                                 base_model_name_or_path="org/model")
    config.save_json(tmp_path / "c.json", extra={"library_version": "x"})
    assert json.loads((tmp_path / "c.json").read_text())["library_version"] == "x"
    assert SeerAttentionConfig.from_json_file(tmp_path / "c.json") == config
    assert SeerAttentionConfig.from_dict(json.loads(config.to_json_string())) == config


def test_calibrated_thresholds_round_trip_through_json_with_layer_keys(tmp_path):
    config = SeerAttentionConfig(sparsity_method="calibrated_threshold", target_density=0.15,
                                 calibrated_thresholds={10: [0.02], 2: [0.01, 0.03]})
    assert config.calibrated_thresholds == ((2, (0.01, 0.03)), (10, (0.02,)))
    assert config.policy.label == "gate ct=0.15" and config.policy.value == 0.15
    config.save_json(tmp_path / "c.json")
    stored = json.loads((tmp_path / "c.json").read_text())["sparsity_policy"]
    assert stored["calibrated_thresholds"] == {"2": [0.01, 0.03], "10": [0.02]}
    assert SeerAttentionConfig.from_json_file(tmp_path / "c.json") == config


@pytest.mark.parametrize("field, value", [
    ("block_size", 8), ("block_size", 256), ("block_size", 64.0), ("gate_hidden_size", 0), ("gate_hidden_size", 33),
    ("q_pooling", []), ("q_pooling", ["median"]), ("k_pooling", ["max", "max"]), ("layers", [-1]), ("layers", []),
    ("selector", "magic"), ("sparsity_method", "topk"), ("threshold", 1.0), ("threshold", -0.1),
    ("density", 0.0), ("density", 1.2), ("coverage", 0), ("keep_first_blocks", -1), ("mask_sharing", "all"),
    ("backend", "cuda"), ("dense_last_query_blocks", True), ("dense_last_query_blocks", -1), ("density", True),
    ("nz_ratio", 0.0), ("nz_ratio", 1.5), ("keep_diagonal", "no"), ("q_projection", 0), ("k_projection", "head"),
    ("compute_dtype", "bfloat16"), ("target_density", 0.0), ("calibrated_thresholds", {0: [2.0]}),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SeerAttentionConfig\.{field}: expected .* found"):
        SeerAttentionConfig(**{field: value})


def test_replace_rejects_unknown_fields_and_validates():
    config = SeerAttentionConfig()
    assert config.replace(density=0.2).density == 0.2 and config.density == 0.5
    with pytest.raises(ValueError, match="Unknown SeerAttentionConfig field"):
        config.replace(sparsity=0.2)
    with pytest.raises(ValueError, match="threshold"):
        config.replace(threshold=2)


def test_bad_json_file(tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        SeerAttentionConfig.from_json_file(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        SeerAttentionConfig.from_json_file(tmp_path / "broken.json")


def test_config_is_a_gate_config_and_a_policy():
    from seerattn_hf import GateConfig, SparsityPolicy

    config = SeerAttentionConfig(block_size=32, layers=[3, 1], density=0.3, sparsity_method="density")
    assert config.gate == GateConfig(block_size=32, layers=(1, 3))
    assert config.policy == SparsityPolicy(sparsity_method="density", density=0.3)
    assert SeerAttentionConfig(gate=config.gate, policy=config.policy) == config
    assert config.layers == [1, 3] and config.gate.q_pooling == ("avg",)


@pytest.mark.parametrize("make", [
    lambda: SeerAttentionConfig().gate, lambda: SeerAttentionConfig().policy, lambda: SeerAttentionConfig(),
])
def test_configs_are_immutable(make):
    config = make()
    with pytest.raises(AttributeError):
        config.density = 7
    with pytest.raises(AttributeError):
        config.block_size = 32


@pytest.mark.parametrize("field, value", [
    ("block_size", 48), ("block_size", 96), ("layers", "0,1"), ("layers", [0.0, 1.0]), ("layers", [True]),
    ("q_pooling", "avg"), ("k_pooling", "max"),
])
def test_gate_fields_the_kernels_or_the_gate_cannot_take(field, value):
    from seerattn_hf import GateConfig

    with pytest.raises(ValueError, match=rf"GateConfig\.{field}: expected .* found"):
        GateConfig(**{field: value})


def test_policy_checks_cross_field_rules_on_construction():
    from seerattn_hf import SparsityPolicy

    with pytest.raises(ValueError, match=r"SparsityPolicy\.sparsity_method: expected one of \['density', "
                                         r"'nz_ratio'\] with selector='streaming'"):
        SparsityPolicy(selector="streaming")
    assert SparsityPolicy(selector="streaming", sparsity_method="nz_ratio", nz_ratio=0.3).label == "streaming nz=0.3"
    with pytest.raises(ValueError, match="SeerAttentionConfig.sparsity_method"):
        SeerAttentionConfig(selector="streaming", sparsity_method="coverage")
    policy = SparsityPolicy(selector="streaming", sparsity_method="density", density=0.2)
    assert policy.label == "streaming d=0.2" and policy.value == 0.2
    with pytest.raises(ValueError, match="Unknown SparsityPolicy field"):
        policy.replace(block_size=32)


def test_release_0_1_0_flat_json_still_reads(tmp_path):
    flat = {"block_size": 16, "gate_hidden_size": 16, "q_pooling": ["avg"], "k_pooling": ["max"], "layers": None,
            "base_model_name_or_path": None, "selector": "oracle", "sparsity_method": "coverage", "threshold": 0.002,
            "density": 0.5, "coverage": 0.8, "keep_first_blocks": 0, "keep_recent_blocks": 0,
            "dense_last_query_block": False, "mask_sharing": "head", "backend": "auto", "min_sparse_length": 0,
            "library_version": "0.1.0"}
    config = SeerAttentionConfig.from_dict(flat)
    assert (config.block_size, config.k_pooling, config.selector, config.coverage) == (16, ["max"], "oracle", 0.8)
    assert json.loads(config.to_json_string())["sparsity_policy"]["coverage"] == 0.8
    assert config.dense_last_query_blocks == 0 and config.keep_diagonal


def test_the_old_dense_last_query_block_flag_reads_as_one_row():
    stored = json.loads(SeerAttentionConfig().to_json_string())
    del stored["sparsity_policy"]["dense_last_query_blocks"]
    stored["sparsity_policy"]["dense_last_query_block"] = True
    assert SeerAttentionConfig.from_dict(stored).dense_last_query_blocks == 1
    stored["sparsity_policy"]["dense_last_query_block"] = "yes"
    with pytest.raises(ValueError, match=r"dense_last_query_blocks: expected an integer >= 0, found 'yes'"):
        SeerAttentionConfig.from_dict(stored)


def test_gate_layout_fields_default_to_the_original_layout_and_round_trip():
    config = SeerAttentionConfig()
    assert (config.q_projection, config.k_projection, config.compute_dtype) == (True, "kv_head", "float32")
    published = config.replace(gate_hidden_size=64, q_projection=False, k_projection="query_head",
                               compute_dtype="model", sparsity_method="nz_ratio", nz_ratio=0.3,
                               keep_diagonal=False, dense_last_query_blocks=2)
    assert SeerAttentionConfig.from_dict(json.loads(published.to_json_string())) == published
    assert published.gate_shape_fields["k_projection"] == "query_head"


def test_unknown_json_keys_are_named_in_a_warning():
    values = json.loads(SeerAttentionConfig().to_json_string())
    values["gate_kind"] = "decode"
    values["sparsity_policy"]["decode_budget"] = 2048
    with pytest.warns(UserWarning, match=r"unknown keys \['gate_kind', 'decode_budget'\]"):
        assert SeerAttentionConfig.from_dict(values) == SeerAttentionConfig()
