"""Gate adapters: save, load (folder or Hub id), strict checks, push."""

import json
from pathlib import Path

import pytest
import torch
from model_factory import tiny_model
from safetensors.torch import load_file, save_file

import seerattn_hf as sa
from seerattn_hf.adapter import CONFIG_NAME, WEIGHTS_NAME, gate_state_dict


def _patched(model_type="llama", **config):
    model = tiny_model(model_type)
    model.name_or_path = "org/tiny-" + model_type
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, gate_hidden_size=16, **config))
    return model


def test_save_and_load_round_trip_is_exact(tmp_path):
    model = _patched("qwen3", sparsity_method="density", density=0.4)
    with torch.no_grad():
        for parameter in sa.gate_parameters(model):
            parameter.normal_()
    folder = sa.save_gates(model, tmp_path / "gates")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    saved_config = json.loads((folder / CONFIG_NAME).read_text())
    assert saved_config["library_version"] == sa.__version__
    assert saved_config["base_model_name_or_path"] == "org/tiny-qwen3"
    assert saved_config["base_model_layout"]["num_key_value_heads"] == 2
    assert "library_name: seerattn_hf" in (folder / "README.md").read_text()
    assert "base_model: org/tiny-qwen3" in (folder / "README.md").read_text()

    fresh = tiny_model("qwen3")
    fresh.load_state_dict(model.state_dict(), strict=False)
    loaded = sa.from_pretrained(folder, model=fresh)
    original, reloaded = gate_state_dict(model), gate_state_dict(loaded)
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[key], reloaded[key]) for key in original)
    assert loaded.seer_config.density == 0.4 and loaded.seer_config.sparsity_method == "density"
    input_ids = torch.randint(0, 96, (1, 64))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)


def test_sparsity_overrides_at_load_time(tmp_path):
    folder = sa.save_gates(_patched(), tmp_path)
    loaded = sa.from_pretrained(folder, model=tiny_model("llama"), sparsity_method="density", density=0.2)
    assert (loaded.seer_config.sparsity_method, loaded.seer_config.density) == ("density", 0.2)
    with pytest.raises(ValueError, match="block_size"):
        sa.from_pretrained(folder, model=tiny_model("llama"), block_size=32)


def test_base_model_is_loaded_from_the_config_when_no_model_is_given(tmp_path, monkeypatch):
    folder = sa.save_gates(_patched(), tmp_path)
    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return tiny_model("llama")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", fake_from_pretrained)
    model = sa.from_pretrained(folder, model_kwargs={"dtype": torch.float32})
    assert calls == [("org/tiny-llama", {"dtype": torch.float32})]
    assert sa.get_sparsity_stats(model)["density"] is None


def test_embedded_base_model_name_resolves_to_its_gguf(tmp_path, monkeypatch):
    model = _patched(base_model_name_or_path="embedded:smollm2-135m")
    folder = sa.save_gates(model, tmp_path)
    calls = []
    monkeypatch.setattr("seerattn_hf.adapter.resolve_model_path", lambda name: ("/wheel/folder", "model.gguf"))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda name, **kwargs: calls.append((name, kwargs)) or tiny_model("llama"))
    sa.from_pretrained(folder)
    assert calls == [("/wheel/folder", {"gguf_file": "model.gguf"})]


def test_gates_for_another_model_fail_clearly(tmp_path):
    folder = sa.save_gates(_patched("llama"), tmp_path)
    with pytest.raises(ValueError, match="trained for another model.*model_type: gates 'llama', model 'qwen2'"):
        sa.from_pretrained(folder, model=tiny_model("qwen2"))
    with pytest.raises(ValueError, match="num_key_value_heads: gates 2, model 4"):
        sa.from_pretrained(folder, model=tiny_model("llama", num_kv_heads=4))


def test_corrupted_gate_files_fail_clearly_and_leave_the_model_unpatched(tmp_path):
    folder = sa.save_gates(_patched(), tmp_path)
    tensors = load_file(str(folder / WEIGHTS_NAME))
    del tensors["layers.1.k_weight"]
    save_file(tensors, str(folder / WEIGHTS_NAME))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"missing \['layers.1.k_weight'\]"):
        sa.from_pretrained(folder, model=model)
    assert not hasattr(model, "seer_config") and model.config._attn_implementation == "sdpa"

    tensors["layers.1.k_weight"] = torch.zeros(2, 48, 8)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"wrong shape: layers.1.k_weight: file \(2, 48, 8\), model \(2, 48, 16\)"):
        sa.from_pretrained(folder, model=tiny_model("llama"))


def test_missing_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="seer_config.json is missing"):
        sa.from_pretrained(tmp_path, model=tiny_model("llama"))
    folder = sa.save_gates(_patched(), tmp_path / "gates")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="holds no seer_gates.safetensors"):
        sa.from_pretrained(folder, model=tiny_model("llama"))
    with pytest.raises(ValueError, match="adapter folder or a Hub repo id"):
        sa.from_pretrained(folder / CONFIG_NAME, model=tiny_model("llama"))
    with pytest.raises(ValueError, match="no SeerAttention gates"):
        sa.save_gates(tiny_model("llama"), tmp_path / "none")


def test_hub_ids_resolve_through_huggingface_hub(tmp_path, monkeypatch):
    folder = sa.save_gates(_patched(), tmp_path / "gates")
    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    sa.from_pretrained("org/gates", model=tiny_model("llama"), revision="v1", local_files_only=True)
    assert seen["repo_id"] == "org/gates" and seen["revision"] == "v1" and seen["local_files_only"] is True
    # Either format's files: ours, or the published config.json and attn_gate_weights.pth.
    assert set(seen["allow_patterns"]) == {CONFIG_NAME, WEIGHTS_NAME, "README.md", "config.json", "attn_gate_weights.pth"}


def test_offline_hub_id_without_cache_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(Exception, match="(?i)offline|cannot find|local"):
        sa.from_pretrained("org/not-cached", model=tiny_model("llama"), local_files_only=True)


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
            from pathlib import Path

            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            return "https://hub/commit/1"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    url = sa.push_gates_to_hub(_patched(), "me/gates", private=True, token="t")
    assert url == "https://hub/commit/1"
    assert uploaded["repo"] == ("me/gates", True, True) and uploaded["token"] == "t"
    assert uploaded["files"] == ["README.md", CONFIG_NAME, WEIGHTS_NAME]


def test_saving_over_an_adapter_leaves_no_temporary_files(tmp_path):
    model = _patched()
    sa.save_gates(model, tmp_path)
    sa.save_gates(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]


FIXTURE_0_1_0 = Path(__file__).parent / "fixtures" / "adapter-0.1.0"


def test_an_adapter_written_by_release_0_1_0_still_loads():
    # Written by release 0.1.0 (flat seer_config.json) for tiny_model("llama"): gates on layer 1 only.
    model = sa.from_pretrained(FIXTURE_0_1_0, model=tiny_model("llama"))
    config = model.seer_config
    assert (config.block_size, config.gate_hidden_size, config.q_pooling, config.layers) == (16, 16, ["avg", "max"], [1])
    assert (config.sparsity_method, config.density, config.keep_first_blocks, config.mask_sharing) == \
        ("density", 0.4, 1, "kv_group")
    stored = load_file(str(FIXTURE_0_1_0 / WEIGHTS_NAME))
    loaded = gate_state_dict(model)
    assert sorted(loaded) == sorted(stored) == ["layers.1.k_weight", "layers.1.q_weight"]
    assert all(torch.equal(loaded[key], stored[key]) for key in stored)
    logits = model(input_ids=torch.randint(0, 96, (1, 50))).logits
    assert torch.isfinite(logits).all()
    assert 0.0 < sa.get_sparsity_stats(model)["density"] < 1.0


def test_adapter_from_a_newer_release_warns(tmp_path):
    folder = sa.save_gates(_patched(), tmp_path / "gates")
    values = json.loads((folder / CONFIG_NAME).read_text())
    values["library_version"] = "99.0"
    (folder / CONFIG_NAME).write_text(json.dumps(values))
    with pytest.warns(UserWarning, match="written by seerattn_hf 99.0, newer than this"):
        sa.from_pretrained(folder, model=tiny_model("llama"))


def test_a_peft_model_saves_and_loads_gates(tmp_path):
    from peft import LoraConfig, get_peft_model

    def lora_model():
        torch.manual_seed(0)
        return get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))

    source = sa.apply_seer_attention(lora_model(), sa.SeerAttentionConfig(block_size=16, gate_hidden_size=16))
    folder = sa.save_gates(source, tmp_path / "gates")
    target = sa.from_pretrained(folder, model=lora_model())
    assert all(torch.equal(a, b) for a, b in zip(sa.gate_parameters(source), sa.gate_parameters(target)))


def test_written_files_follow_the_umask(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        folder = sa.save_gates(_patched(), tmp_path / "gates")
    finally:
        os.umask(previous)
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


def test_a_readme_of_someone_else_is_never_overwritten(tmp_path):
    folder = tmp_path / "gates"
    folder.mkdir()
    (folder / "README.md").write_text("# My project\n")
    with pytest.warns(UserWarning, match="not written by seerattn_hf"):
        sa.save_gates(_patched(), folder)
    assert (folder / "README.md").read_text() == "# My project\n"
    (folder / "README.md").unlink()
    sa.save_gates(_patched(), folder)
    sa.save_gates(_patched(), folder)  # its own card is rewritten without a warning
    assert "seerattn_hf" in (folder / "README.md").read_text()


def test_names_that_are_neither_folder_nor_hub_repo_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="expected a gate adapter folder at .*found no such folder"):
        sa.from_pretrained(str(tmp_path / "no" / "such"), model=tiny_model("llama"))
    with pytest.raises(FileNotFoundError, match="found no such folder"):
        sa.from_pretrained("./gates-typo", model=tiny_model("llama"))
    with pytest.raises(ValueError, match="neither a folder here nor a valid repo id"):
        sa.from_pretrained("not a repo id", model=tiny_model("llama"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="neither a folder here nor a Hub repo that could be reached"):
        sa.from_pretrained("org/gates-not-cached", model=tiny_model("llama"), local_files_only=True)


def test_a_corrupted_safetensors_file_is_named(tmp_path):
    folder = sa.save_gates(_patched(), tmp_path / "gates")
    (folder / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} is not a readable safetensors file"):
        sa.from_pretrained(folder, model=model)
    assert "seer_config" not in vars(model)


def test_gate_shapes_are_checked_before_the_gates_exist(tmp_path, monkeypatch):
    folder = sa.save_gates(_patched(), tmp_path / "gates")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    tensors["layers.0.q_weight"] = torch.zeros(4, 16, 8)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    monkeypatch.setattr("seerattn_hf.adapter.apply_seer_attention",
                        lambda *a, **k: pytest.fail("gates were allocated before the file was checked"))
    with pytest.raises(ValueError, match=r"wrong shape: layers.0.q_weight: file \(4, 16, 8\), model \(4, 16, 16\)"):
        sa.from_pretrained(folder, model=tiny_model("llama"))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("the base model was loaded before the gate file was checked"))
    with pytest.raises(ValueError, match="wrong shape"):
        sa.from_pretrained(folder)


def test_an_adapter_holds_decode_gates_beside_prefill_gates(tmp_path):
    from seerattn_hf.decode_gate import DecodeGateConfig

    decode_gate = DecodeGateConfig(block_size=16, gate_hidden_size=8, q_head_map="mean", layers=[1])
    model = _patched("qwen3", decode_gate=decode_gate, decode_selector="gate", decode_token_budget=32)
    with torch.no_grad():
        for parameter in sa.gate_parameters(model):
            parameter.normal_()
    folder = sa.save_gates(model, tmp_path / "gates")
    stored = load_file(str(folder / WEIGHTS_NAME))
    assert {k for k in stored if ".decode." in k} == {"layers.1.decode.q_weight", "layers.1.decode.k_weight",
                                                       "layers.1.decode.q_norm_weight", "layers.1.decode.k_norm_weight"}
    assert stored["layers.1.decode.q_weight"].shape == (2, 16, 8)
    loaded = sa.from_pretrained(folder, model=tiny_model("qwen3"))
    assert loaded.seer_config.decode_gate == decode_gate and loaded.seer_config.decode_selector == "gate"
    assert all(torch.equal(a, b) for a, b in zip(sa.gate_parameters(model), sa.gate_parameters(loaded)))
    # A policy change keeps the decode gate in the model's config, and so in what it saves.
    sa.update_sparsity_config(model, decode_selector="quest")
    assert model.seer_config.decode_gate == decode_gate
    resaved = sa.from_pretrained(sa.save_gates(model, tmp_path / "resaved"), model=tiny_model("qwen3"))
    assert resaved.seer_config.decode_gate == decode_gate and resaved.seer_config.decode_selector == "quest"
    del stored["layers.1.decode.k_norm_weight"]
    save_file(stored, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing \['layers.1.decode.k_norm_weight'\]"):
        sa.from_pretrained(folder, model=tiny_model("qwen3"))
