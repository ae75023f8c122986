"""The JSON-lines log of a run: records after a resumed checkpoint's step are dropped, atomically."""

from __future__ import annotations

import json
import logging

from seerattn_hf.training.run_log import JsonLog


def test_records_after_the_step_and_a_cut_off_line_are_dropped(tmp_path, caplog):
    path = tmp_path / "train_log.jsonl"
    log = JsonLog(path, enabled=True)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"step": 2, "eval": {"kl": 0.5}})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"kl": 0.1, "step": 4, "lo')  # the process was killed while writing

    with caplog.at_level(logging.WARNING):
        log.drop_records_after(2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 2, "eval": {"kl": 0.5}}]
    assert "line 5: expected a JSON record with an integer step" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["train_log.jsonl"]  # no temporary file left

    log.write({"step": 3, "loss": 0.25})
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 3, "loss": 0.25}


def test_only_the_writing_process_changes_the_log(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text('{"step": 5}\n', encoding="utf-8")
    JsonLog(path, enabled=False).drop_records_after(2)
    assert path.read_text() == '{"step": 5}\n'
    JsonLog(tmp_path / "absent.jsonl", enabled=True).drop_records_after(2)
    assert not (tmp_path / "absent.jsonl").exists()
