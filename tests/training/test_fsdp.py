"""Two CPU processes under FSDP2 (gloo): the gates stay in sync, match one process, the base weights do
not change, checkpoints hold no base weights and a resumed run ends where an uninterrupted one does.

accelerate runs FSDP on accelerators only; fsdp_worker.py explains how it is made to run here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import tiny_run_args

from seerattn_hf.training.cli import run

WORKER = Path(__file__).with_name("fsdp_worker.py")
FSDP2_ON_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: "no"
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_offload_params: false
"""
# What a checkpoint may hold: safetensors and JSON (checkpointing.py), one RNG state per process.
CHECKPOINT_FILES = {"gates", "gate_optimizer.safetensors", "gate_optimizer.json", "scheduler.json",
                    "trainer_state.json", "rng_state_0.json", "rng_state_1.json"}


def launch(config: Path, arguments: list[str], port: int) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), str(Path(__file__).parent)])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(port), str(WORKER), *arguments]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-12000:]


def gates(folder: Path) -> dict:
    return load_file(str(folder / "seer_gates.safetensors"))


@pytest.mark.slow
def test_fsdp2_two_processes(tiny_checkpoint, jsonl_corpus, tmp_path):
    config = tmp_path / "fsdp2.yaml"
    config.write_text(FSDP2_ON_CPU, encoding="utf-8")
    settings = {"per_device_train_batch_size": 1, "max_steps": 4, "save_steps": 2, "eval_steps": 0}
    full = tmp_path / "fsdp"
    launch(config, tiny_run_args(tiny_checkpoint, jsonl_corpus, full, **settings), 29541)

    hashes = [(full / f"gates-rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert hashes[0][:2] == ["2", "2"] and hashes[0] == hashes[1]  # 2 processes, FSDP2, same gates

    base_before = load_file(str(tiny_checkpoint / "model.safetensors"))
    base_after = load_file(str(full / "base_after.safetensors"))
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[key], base_before[key]) for key in base_before)

    for step in (2, 4):
        checkpoint = full / "checkpoints" / f"checkpoint-{step}"
        assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES
        optimizer = load_file(str(checkpoint / "gate_optimizer.safetensors"))
        assert optimizer and all("seer_gate" in name for name in optimizer)
        size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        assert size < 200_000, f"checkpoint-{step}: {size} bytes, more than gates and optimizer state"

    # Resumed from checkpoint-2 in another folder: the same final gates, bit for bit.
    resumed = tmp_path / "resumed"
    launch(config, tiny_run_args(tiny_checkpoint, jsonl_corpus, resumed, **settings,
                                 resume_from_checkpoint=full / "checkpoints" / "checkpoint-2"), 29542)
    expected, found = gates(full), gates(resumed)
    assert expected.keys() == found.keys()
    for key in expected:
        assert torch.equal(expected[key], found[key]), key

    # One process with batch 2 reads the same sequences per optimizer step.
    single = tmp_path / "single"
    run(tiny_run_args(tiny_checkpoint, jsonl_corpus, single, **{**settings, "per_device_train_batch_size": 2,
                                                                  "save_steps": 0}))
    reference = gates(single)
    for key in reference:  # the gates learn as in one process: their gradients are averaged
        assert torch.allclose(expected[key], reference[key], rtol=1e-4, atol=1e-5), key


@pytest.mark.slow
def test_fsdp2_trains_decode_gates_like_one_process(tiny_checkpoint, jsonl_corpus, tmp_path):
    config = tmp_path / "fsdp2.yaml"
    config.write_text(FSDP2_ON_CPU, encoding="utf-8")
    settings = {"per_device_train_batch_size": 1, "max_steps": 3, "save_steps": 0, "eval_steps": 0,
                "gate_type": "decode"}
    full = tmp_path / "fsdp"
    launch(config, tiny_run_args(tiny_checkpoint, jsonl_corpus, full, **settings), 29543)
    hashes = [(full / f"gates-rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert hashes[0][:2] == ["2", "2"] and hashes[0] == hashes[1]

    single = tmp_path / "single"
    run(tiny_run_args(tiny_checkpoint, jsonl_corpus, single, **{**settings, "per_device_train_batch_size": 2}))
    expected, reference = gates(full), gates(single)
    assert any(".decode." in key for key in reference)
    for key in reference:
        assert torch.allclose(expected[key], reference[key], rtol=1e-4, atol=1e-5), key
