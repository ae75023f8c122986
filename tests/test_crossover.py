"""min_sparse_length="auto": the cost model, its per-device cache and the path it makes layers take."""

import json
import math

import pytest
import torch
from model_factory import tiny_model

import seerattn_hf as sa
from seerattn_hf import crossover
from seerattn_hf.crossover import CostModel
from seerattn_hf.validation import InvalidSetting

H200 = "NVIDIA H200|block64|heads32x8|dim128|bfloat16"


def test_the_crossover_is_where_the_sparse_cost_meets_the_dense_cost():
    model = CostModel(fixed_s=2e-3, sparse_slope=1.5, dense_s_per_token2=1e-11)
    length = model.crossover(0.2)
    dense = model.dense_s_per_token2 * length**2
    sparse = model.fixed_s + model.sparse_slope * 0.2 * dense
    assert sparse == pytest.approx(dense)
    assert model.crossover(0.1) < length < model.crossover(0.4)
    assert model.crossover(1 / 1.5) == math.inf and model.crossover(0.9) == math.inf


def test_against_fa4_dense_the_crossover_is_where_the_sparse_cost_meets_fa4s():
    model = CostModel(fixed_s=2e-3, sparse_slope=1.5, dense_s_per_token2=1e-11, fa4_dense_ratio=0.8)
    length = model.crossover(0.2, fa4_dense=True)
    sparse = model.fixed_s + model.sparse_slope * 0.2 * model.dense_s_per_token2 * length**2
    assert sparse == pytest.approx(0.8 * model.dense_s_per_token2 * length**2)
    assert length > model.crossover(0.2), "a faster dense pass moves the crossover to longer prompts"
    assert model.crossover(0.8 / 1.5, fa4_dense=True) == math.inf
    unmeasured = CostModel(fixed_s=2e-3, sparse_slope=1.5, dense_s_per_token2=1e-11)
    assert unmeasured.crossover(0.2, fa4_dense=True) == unmeasured.crossover(0.2)


@pytest.mark.parametrize("backend, fa4_runs, against_fa4", [
    ("auto", True, True), ("fa4", True, True), ("triton", True, False), ("auto", False, False)])
def test_auto_compares_with_the_dense_pass_the_backend_runs(monkeypatch, backend, fa4_runs, against_fa4):
    from seerattn_hf.ops.block_sparse_attn import fa4 as fa4_module

    model = CostModel(fixed_s=2e-3, sparse_slope=1.5, dense_s_per_token2=1e-11, fa4_dense_ratio=0.8)
    monkeypatch.setattr(crossover, "cost_model_for", lambda *args: model)
    monkeypatch.setattr(fa4_module, "fa4_unsupported_reason", lambda *args: None if fa4_runs else "not installed")
    policy = sa.SparsityPolicy(sparsity_method="density", density=0.2, backend=backend)
    length = crossover.auto_min_sparse_length(policy, torch.device("cuda", 0), 64, 32, 8, 128, torch.bfloat16)
    assert length == model.crossover(0.2, fa4_dense=against_fa4)


def test_the_h200_table_reproduces_the_measured_prefill_speeds():
    """The table's crossover at density 0.1 lies between 8k (sparse measured 0.97x of dense) and 32k
    (1.37x), and higher densities need longer prompts."""
    model = crossover.DEFAULT_COST_MODELS[H200]
    assert 8192 < model.crossover(0.1) < 32768
    assert model.crossover(0.1) < model.crossover(0.3) < model.crossover(crossover.UNKNOWN_DENSITY)


@pytest.fixture
def fake_measurement(monkeypatch, tmp_path):
    """Measurements that count themselves, cached under tmp_path."""
    monkeypatch.setenv("SEERATTN_CACHE_DIR", str(tmp_path))
    calls = []

    def measure(device, block_size, num_heads, num_kv_heads, head_dim, dtype):
        calls.append((device, block_size, num_heads, num_kv_heads, head_dim, dtype))
        return CostModel(1e-3, 2.0, 1e-11)

    monkeypatch.setattr(crossover, "measure_cost_model", measure)
    crossover._cuda_cost_model.cache_clear()
    yield calls
    crossover._cuda_cost_model.cache_clear()


def test_an_unknown_device_is_measured_once_and_cached(fake_measurement, tmp_path):
    with pytest.warns(UserWarning, match="measuring the dense/sparse crossover"):
        model = crossover._cuda_cost_model("Fake GPU", 0, 64, 32, 8, 128, torch.bfloat16)
    assert model.fixed_s == 1e-3 and len(fake_measurement) == 1
    written = json.loads((tmp_path / "crossover.json").read_text())
    assert written == {"Fake GPU|block64|heads32x8|dim128|bfloat16":
                       {"fixed_s": 1e-3, "sparse_slope": 2.0, "dense_s_per_token2": 1e-11, "fa4_dense_ratio": None}}
    crossover._cuda_cost_model.cache_clear()  # a new process: read back, not measured again
    again = crossover._cuda_cost_model("Fake GPU", 0, 64, 32, 8, 128, torch.bfloat16)
    assert (again.fixed_s, again.sparse_slope) == (1e-3, 2.0) and len(fake_measurement) == 1
    # Another dtype is another entry; the first stays.
    crossover._cuda_cost_model("Fake GPU", 0, 64, 32, 8, 128, torch.float16)
    assert len(json.loads((tmp_path / "crossover.json").read_text())) == 2 and len(fake_measurement) == 2


def test_the_h200_uses_its_table_unless_a_measurement_is_cached(fake_measurement, tmp_path):
    model = crossover._cuda_cost_model("NVIDIA H200", 0, 64, 32, 8, 128, torch.bfloat16)
    assert model is crossover.DEFAULT_COST_MODELS[H200] and not fake_measurement
    (tmp_path / "crossover.json").write_text(json.dumps({H200: {"fixed_s": 5e-3, "sparse_slope": 1.0,
                                                                "dense_s_per_token2": 1e-11}}))
    crossover._cuda_cost_model.cache_clear()
    assert crossover._cuda_cost_model("NVIDIA H200", 0, 64, 32, 8, 128, torch.bfloat16).fixed_s == 5e-3


def test_an_unreadable_cache_fails_clearly(fake_measurement, tmp_path):
    (tmp_path / "crossover.json").write_text("{not json")
    with pytest.raises(ValueError, match="crossover.json.*delete the file"):
        crossover._cuda_cost_model("Fake GPU", 0, 64, 32, 8, 128, torch.bfloat16)


def test_the_expected_density_follows_the_policy():
    policy = sa.SeerAttentionConfig(sparsity_method="density", density=0.2, min_sparse_length="auto").policy
    assert crossover.expected_density(policy) == 0.2
    assert crossover.expected_density(policy.replace(sparsity_method="nz_ratio", nz_ratio=0.3)) == 0.3
    assert crossover.expected_density(policy.replace(sparsity_method="threshold")) == crossover.UNKNOWN_DENSITY
    assert crossover.auto_min_sparse_length(policy, torch.device("cpu"), 64, 32, 8, 128, torch.float32) == math.inf


@pytest.mark.parametrize("value", ["fast", -1, 2.5, True, None])
def test_bad_min_sparse_length_values_are_refused(value):
    with pytest.raises(InvalidSetting, match=r"min_sparse_length: expected an integer >= 0 or 'auto'"):
        sa.SeerAttentionConfig(min_sparse_length=value)


def test_auto_takes_the_sparse_path_from_the_crossover_on(monkeypatch):
    model = tiny_model("llama", num_heads=4, num_kv_heads=2)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=0.5,
                                                          min_sparse_length="auto"))
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        model(input_ids=torch.randint(0, 96, (1, 80)))
    assert sa.get_sparsity_stats(model)["paths"] == {"dense": layers}, "auto runs dense on the CPU"

    seen = []

    def crossover_at_64(policy, device, block_size, num_heads, num_kv_heads, head_dim, dtype):
        seen.append((policy.density, block_size, num_heads, num_kv_heads, head_dim, dtype))
        return 64

    monkeypatch.setattr("seerattn_hf.attention.auto_min_sparse_length", crossover_at_64)
    for length, path in ((40, "dense"), (80, "sparse")):
        sa.reset_sparsity_stats(model)
        with torch.no_grad():
            model(input_ids=torch.randint(0, 96, (1, length)))
        assert sa.get_sparsity_stats(model)["paths"] == {path: layers}
    assert seen[0] == (0.5, 16, 4, 2, 16, torch.float32)


def test_a_new_measurement_replaces_the_cached_one(fake_measurement, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    crossover._cuda_cost_model("Fake GPU", 0, 64, 32, 8, 128, torch.bfloat16)
    monkeypatch.setattr(crossover, "measure_cost_model", lambda *args: CostModel(7e-4, 1.0, 1e-11))
    assert crossover.measure_and_cache(torch.device("cuda"), 64, 32, 8, 128, torch.bfloat16).fixed_s == 7e-4
    assert crossover._cuda_cost_model("Fake GPU", 0, 64, 32, 8, 128, torch.bfloat16).fixed_s == 7e-4
