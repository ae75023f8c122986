"""Two CPU processes (accelerate launch, gloo): gates stay in sync across ranks and match one process
reading the same global batches."""

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

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("gate_type, port", [("prefill", 29517), ("decode", 29518)])
def test_two_processes_keep_gates_in_sync(tiny_checkpoint, jsonl_corpus, tmp_path, gate_type, port):
    # Decode gates train outside DDP's hooks (layer by layer): their gradients are averaged by the trainer.
    out = tmp_path / "ddp"
    arguments = tiny_run_args(tiny_checkpoint, jsonl_corpus, out, per_device_train_batch_size=1, max_steps=3,
                              save_steps=3, eval_steps=0, gate_type=gate_type)
    # torchrun through accelerate's multi-process launcher; ACCELERATE_USE_CPU makes accelerate use
    # gloo on the CPU (`--cpu` alone would start a single process).
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
                   "PYTHONPATH": str(Path(__file__).parents[2])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(WORKER), *arguments]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    hashes = [(out / f"gates-rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert hashes[0][0] == "2" and hashes[0] == hashes[1]
    assert (out / "checkpoints" / "checkpoint-3" / "rng_state_1.json").is_file()

    # One process with batch 2 reads the same sequences per optimizer step.
    single = tmp_path / "single"
    run(tiny_run_args(tiny_checkpoint, jsonl_corpus, single, per_device_train_batch_size=2, max_steps=3,
                       save_steps=0, eval_steps=0, gate_type=gate_type))
    distributed, reference = load_file(str(out / "seer_gates.safetensors")), load_file(str(single / "seer_gates.safetensors"))
    for key in reference:
        torch.testing.assert_close(distributed[key], reference[key], rtol=1e-4, atol=1e-5)
