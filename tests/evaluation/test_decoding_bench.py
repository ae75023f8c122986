import json

import pytest

from seerattn_hf.evaluation.decoding import decode_main


def test_decode_benchmark_writes_its_table_for_every_setting(tmp_path):
    summary = decode_main(["--config_preset", "tiny-llama", "--device", "cpu", "--dtype", "fp32", "--batch_sizes", "2",
                           "--contexts", "200", "--steps", "2", "--warmup", "1", "--block_size", "16",
                           "--budgets", "48", "--prefill_chunk", "64", "--selectors", "gate", "quest", "streaming", "--output", str(tmp_path)])
    rows = {r["label"]: r for r in summary["results"]}
    assert list(rows) == ["unpatched", "dense", "gate budget=48", "quest budget=48", "streaming budget=48"]
    assert rows["unpatched"]["decode_density"] is None and rows["dense"]["decode_density"] is None
    # 200 prompt tokens + 3 steps: 13 blocks; 48 tokens are 3 blocks of them.
    for label in ("gate budget=48", "quest budget=48", "streaming budget=48"):
        assert rows[label]["decode_density"] == pytest.approx(3 / 13, rel=0.05)
    assert json.loads((tmp_path / "results.json").read_text())["task"] == "decode"
    assert "| 2 | 200 | quest budget=48 |" in (tmp_path / "results.md").read_text()
