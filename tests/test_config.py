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
                                 sparsity_method="density", density=0.3, dense_last_query_block=True,
                                 base_model_name_or_path="org/model")
    config.save_json(tmp_path / "c.json", extra={"library_version": "x"})
    assert json.loads((tmp_path / "c.json").read_text())["library_version"] == "x"
    assert SeerAttentionConfig.from_json_file(tmp_path / "c.json") == config
    assert SeerAttentionConfig.from_dict(json.loads(config.to_json_string())) == config


@pytest.mark.parametrize("field, value", [
    ("block_size", 8), ("block_size", 256), ("block_size", 64.0), ("gate_hidden_size", 0), ("gate_hidden_size", 33),
    ("q_pooling", []), ("q_pooling", ["median"]), ("k_pooling", ["max", "max"]), ("layers", [-1]), ("layers", []),
    ("selector", "magic"), ("sparsity_method", "topk"), ("threshold", 1.0), ("threshold", -0.1),
    ("density", 0.0), ("density", 1.2), ("coverage", 0), ("keep_first_blocks", -1), ("mask_sharing", "all"),
    ("backend", "cuda"), ("dense_last_query_block", "yes"), ("density", True),
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
