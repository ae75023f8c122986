import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_training.py"


def test_bench_training_trains_gates_and_writes_json(tmp_path):
    output = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--config_preset", "tiny-llama", "--seq_lens", "96", "200",
                             "--steps", "2", "--dtype", "fp32", "--device", "cpu", "--output", str(output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(output.read_text())
    assert [row["seq_len"] for row in rows] == [96, 200]
    assert all(row["tokens_per_s"] > 0 and row["step_seconds"] > 0 for row in rows)
    assert "| 200 | 1 |" in result.stdout


def test_bench_training_of_decode_gates(tmp_path):
    output = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--config_preset", "tiny-llama", "--seq_lens", "150",
                             "--steps", "1", "--dtype", "fp32", "--device", "cpu", "--block_size", "16",
                             "--gate_type", "decode", "--output", str(output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(output.read_text())
    assert rows[0]["gate_type"] == "decode" and rows[0]["tokens_per_s"] > 0
    assert "decode gate parameters" in result.stdout
