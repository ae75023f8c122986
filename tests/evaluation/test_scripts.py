"""Each script end to end on a tiny saved model at short length (called through its main(argv))."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seerattn_hf.evaluation.cli import ppl_main, prefill_main, retrieval_main

REPO = Path(__file__).resolve().parents[2]


def _read(output: Path) -> dict:
    for name in ("results.json", "results.md"):
        assert (output / name).is_file(), name
    return json.loads((output / "results.json").read_text())


def test_script_wrapper_runs_help():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_ppl.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--densities" in result.stdout


@pytest.mark.parametrize("main", [ppl_main, retrieval_main, prefill_main])
def test_help(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--output" in capsys.readouterr().out


def test_eval_ppl(tiny_checkpoint, text_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = ppl_main(["--model", str(tiny_checkpoint), "--data_files", str(text_files / "plays.jsonl"),
                        "--text_column", "body", "--lengths", "96", "160", "--block_size", "16",
                        "--methods", "dense", "oracle", "streaming", "--densities", "1.0", "0.3",
                        "--output", str(tmp_path)])
    assert (tmp_path / "ppl_vs_density.png").is_file()
    stored = _read(tmp_path)
    assert stored["results"] == json.loads(json.dumps(summary["results"]))
    rows = {(r["length"], r["label"]): r for r in stored["results"]}
    assert len(rows) == 2 * 5  # lengths x (dense + 2 selectors x 2 densities)
    for length in (96, 160):
        dense = rows[(length, "dense")]
        assert dense["num_documents"] == 2 and dense["num_tokens"] == 2 * (length - 1)
        assert rows[(length, "oracle d=1")]["ppl"] == pytest.approx(dense["ppl"], rel=1e-4)
        assert rows[(length, "oracle d=0.3")]["density"] < rows[(length, "oracle d=1")]["density"] == pytest.approx(1.0)
        for row in rows.values():
            assert {"ppl", "ppl_second_half", "density", "per_document", "method", "value"} <= set(row)

    # Dense perplexity equals the one computed directly from the plain model's logits.
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    nlls = []
    for line in (text_files / "plays.jsonl").read_text().splitlines():
        ids = [tokenizer.bos_token_id] + tokenizer(json.loads(line)["body"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids[:160]])
        with torch.no_grad():
            nlls.append(F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none"))
    assert rows[(160, "dense")]["ppl"] == pytest.approx(math.exp(torch.cat(nlls).mean().item()), rel=1e-5)
    assert "| oracle | density | 0.3 |" in (tmp_path / "results.md").read_text()


def test_eval_ppl_calibrates_thresholds_on_the_training_plays(tiny_checkpoint, text_files, tmp_path):
    summary = ppl_main(["--model", str(tiny_checkpoint), "--data_files", str(text_files / "plays.jsonl"),
                        "--text_column", "body", "--lengths", "160", "--block_size", "16", "--methods", "dense",
                        "oracle", "--calibrated_densities", "1.0", "0.4", "--calibration_documents", "2",
                        "--calibration_per_head", "--output", str(tmp_path)])
    rows = {r["label"]: r for r in summary["results"]}
    assert sorted(rows) == ["dense", "oracle ct=0.4", "oracle ct=1"]  # calibrated densities alone: no defaults
    assert rows["oracle ct=1"]["ppl"] == pytest.approx(rows["dense"]["ppl"], rel=1e-5)
    assert rows["oracle ct=1"]["density"] == 1.0
    # Fitted on other text, the share on the evaluation text is near the target, not exactly it.
    assert 0.25 < rows["oracle ct=0.4"]["density"] < 0.55
    thresholds = rows["oracle ct=0.4"]["calibrated_thresholds"]
    assert sorted(thresholds) == ["0", "1"] and all(len(t) == 4 for t in thresholds.values())
    assert summary["calibration"][160] == {"documents": 2, "per_head": True,
                                           "data_files": "embedded corpus, train split"}
    assert "| oracle | calibrated_threshold | 0.4 |" in (tmp_path / "results.md").read_text()


def test_eval_ppl_refuses_gate_without_gates(tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="--gates"):
        ppl_main(["--model", str(tiny_checkpoint), "--methods", "gate", "--densities", "0.5",
                  "--output", str(tmp_path)])


def test_eval_retrieval(tiny_checkpoint, tmp_path):
    retrieval_main(["--model", str(tiny_checkpoint), "--lengths", "512", "640", "--depths", "0", "1",
                    "--num_samples", "1", "--max_new_tokens", "3", "--block_size", "16",
                    "--methods", "dense", "streaming", "--densities", "0.3", "--output", str(tmp_path)])
    assert (tmp_path / "retrieval_heatmap.png").is_file()
    stored = _read(tmp_path)
    assert stored["chat_template"] is False
    cells = stored["results"]
    assert len(cells) == 2 * 2 * 2 * 2  # tasks x settings x lengths x depths
    for cell in cells:
        assert 0.0 <= cell["accuracy"] <= 1.0 and cell["num_samples"] == 1
        assert abs(cell["samples"][0]["prompt_tokens"] - cell["length"]) <= 2
    assert {c["density"] for c in cells if c["method"] == "dense"} == {1.0}
    assert all(c["density"] < 0.7 for c in cells if c["method"] == "streaming")


def test_bench_prefill(tmp_path):
    prefill_main(["--config_preset", "tiny-llama", "--num_layers", "1", "--lengths", "128", "256",
                  "--block_size", "16", "--warmup", "0", "--repeats", "1", "--densities", "0.5", "0.2",
                  "--output", str(tmp_path)])
    assert (tmp_path / "prefill.png").is_file()
    rows = _read(tmp_path)["results"]
    assert [(r["length"], r["label"]) for r in rows] == [(n, s) for n in (128, 256)
                                                         for s in ("dense", "gate d=0.5", "gate d=0.2")]
    for row in rows:
        assert row["ttft_s"] > 0 and row["ttft_no_attention_s"] > 0
        assert set(row["breakdown"]) == {"total_s", "gate_s", "attention_s", "other_s"}
        assert (row["breakdown"]["gate_s"] > 0) == (row["method"] == "gate")
    sparse = {(r["length"], r["value"]): r["density"] for r in rows if r["method"] == "gate"}
    assert sparse[(256, 0.2)] < sparse[(256, 0.5)] < 1.0


def test_bench_prefill_times_chunked_prompts(tmp_path):
    prefill_main(["--config_preset", "tiny-llama", "--num_layers", "1", "--lengths", "64", "200",
                  "--block_size", "16", "--warmup", "0", "--repeats", "1", "--densities", "0.3",
                  "--chunk_sizes", "72", "100", "--output", str(tmp_path)])
    rows = {(r["length"], r["label"]): r for r in _read(tmp_path)["results"]}
    # Chunks as long as the prompt or longer are one-shot runs, left out.
    assert sorted(rows) == sorted([(64, "dense"), (64, "gate d=0.3")] + [
        (200, s + c) for s in ("dense", "gate d=0.3") for c in ("", ", 72-token chunks", ", 100-token chunks")])
    chunked = rows[(200, "gate d=0.3, 72-token chunks")]
    assert chunked["chunk_size"] == 72 and chunked["ttft_s"] > 0 and chunked["density"] < 1.0
    assert chunked["paths"] == {"sparse": 1, "sparse_continued": 2}
    assert rows[(200, "dense, 100-token chunks")]["paths"] == {"dense": 2}
    assert "72-token chunks" in (tmp_path / "results.md").read_text()


def test_eval_ppl_with_a_gate_adapter(tiny_checkpoint, text_files, tmp_path):
    from transformers import AutoModelForCausalLM

    import seerattn_hf as sa

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, gate_hidden_size=16))
    sa.save_gates(model, tmp_path / "gates")
    summary = ppl_main(["--model", str(tiny_checkpoint), "--gates", str(tmp_path / "gates"),
                        "--data_files", str(text_files / "play.txt"), "--lengths", "128",
                        "--methods", "dense", "gate", "pooled_score", "--densities", "0.3", "--coverages", "0.5",
                        "--thresholds", "0.05",
                        "--output", str(tmp_path / "out")])
    assert summary["seer_config"]["block_size"] == 16  # from the adapter, not --block_size
    rows = {r["label"]: r for r in summary["results"]}
    assert rows["gate d=0.3"]["density"] < 0.6 and rows["gate p=0.5"]["density"] < 1.0
    assert len(rows) == 1 + 2 * 3 and 0.0 < rows["pooled_score t=0.05"]["density"] <= 1.0


def test_render_redraws_a_finished_run(tmp_path):
    from seerattn_hf.evaluation.render import render

    prefill_main(["--config_preset", "tiny-llama", "--num_layers", "1", "--lengths", "64", "--block_size", "16",
                  "--warmup", "0", "--repeats", "1", "--densities", "0.5", "--output", str(tmp_path)])
    (tmp_path / "prefill.png").unlink()
    (tmp_path / "results.md").unlink()
    assert sorted(p.name for p in render(tmp_path)) == ["prefill.png", "results.md"]
