"""Checkpoints of a training run: their folder layout, writing and reading them, pruning old ones.

Run folder (`output_dir`):
    checkpoints/checkpoint-<step>/   one resumable state per `--save_steps`
    checkpoints/latest               a text file naming the newest checkpoint folder

A checkpoint holds what the run changes and nothing of the frozen base model, in the same form
whether or not the model is sharded: `gates/` (the adapter), `gate_optimizer.pt` (the optimizer state of
the gates, full tensors keyed by parameter name), `trainer_state.json` (step, data position) and
accelerate's files for the scheduler, the RNG states of every process and the grad scaler.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..adapter import load_gate_weights, save_gates
from ..utils import atomic_write_text

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
GATES = "gates"
OPTIMIZER = "gate_optimizer.pt"


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def resolve_checkpoint(spec: str, output_dir: str) -> Path:
    """The checkpoint folder named by `--resume_from_checkpoint` ('latest' or a path)."""
    if spec == LATEST:
        pointer = checkpoint_root(output_dir) / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint latest: expected {pointer} (written with each "
                                    f"checkpoint), found no checkpoint in {checkpoint_root(output_dir)}")
        path = checkpoint_root(output_dir) / pointer.read_text(encoding="utf-8").strip()
    else:
        path = Path(spec)
    missing = [name for name in (TRAINER_STATE, GATES, OPTIMIZER) if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a checkpoint of this trainer (expected "
                                f"{TRAINER_STATE}, {GATES}/ and {OPTIMIZER}; missing {missing})")
    return path


def load_checkpoint_gates(path: Path, model) -> None:
    """The checkpoint's gates into the patched `model`, before accelerate prepares it: FSDP then shards
    the restored gates like fresh ones, no scatter needed."""
    load_gate_weights(model, path / GATES)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, state: dict, model, optimizer,
                    save_total_limit: int | None) -> Path:
    """Write checkpoint-<step> atomically: into a temporary folder, renamed when complete, then point
    `latest` at it (also atomically) and prune old ones beyond `save_total_limit`. Every process calls it.

    `state` is the trainer state (its "step" names the folder); `model` and `optimizer` are the prepared
    ones (the gates are saved from the unwrapped model; the registered scheduler goes with accelerate's files).
    """
    root = checkpoint_root(output_dir)
    final, temporary = root / f"checkpoint-{state['step']}", root / f".checkpoint-{state['step']}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    with _without_model_and_optimizer(accelerator):
        accelerator.save_state(str(temporary))
    if accelerator.is_main_process:  # gates are whole on every process, FSDP included
        save_gates(accelerator.unwrap_model(model), temporary / GATES)
    optimizer_state = _optimizer_state_dict(model, optimizer)
    # Every process writes its own RNG state into the temporary folder: all must be done before
    # the main process renames it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(optimizer_state, temporary / OPTIMIZER)
        atomic_write_text(temporary / TRAINER_STATE, json.dumps(state, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune_checkpoints(root, save_total_limit)
    accelerator.wait_for_everyone()
    return final


def _prune_checkpoints(root: Path, limit: int | None) -> None:
    if limit is None:
        return
    steps = sorted(int(p.name.split("-")[1]) for p in root.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    for step in steps[:-limit]:
        shutil.rmtree(root / f"checkpoint-{step}")


def load_checkpoint(path: Path, accelerator, model, optimizer, global_batch: int, seq_len: int) -> dict:
    """Restore the optimizer and accelerate's state from checkpoint `path` (its gates were loaded
    before prepare, `load_checkpoint_gates`); returns the trainer state. Every process calls it.

    Refused when the checkpoint was written with another sequence length or global batch: the data
    position would not name the same sequences."""
    state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    expected = {"global_batch": global_batch, "seq_len": seq_len}
    different = {key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value}
    if different:
        raise ValueError(f"{path} was written by a run with other data settings; (checkpoint, now): {different}. "
                         "Resume with the same seq_len and global batch (batch x accumulation x processes)")
    # The optimizer state is resharded like the gates.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # (The torch optimizer, not accelerate's wrapper: torch's helpers create missing state with one
    # zero-gradient step, which the wrapper would skip.)
    optimizer_state = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer.optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=True))
    with _without_model_and_optimizer(accelerator):
        accelerator.load_state(str(path))
    return state


def _optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer state of the gates as full tensors keyed by parameter name (the same for one
    process, DDP, FSDP1 and FSDP2; under FSDP only the gates' state is gathered), complete on the
    main process. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def _without_model_and_optimizer(accelerator):
    """accelerate's save_state / load_state for the scheduler, RNG states and scaler only.

    accelerate (1.x) always writes the prepared model and optimizer, and under FSDP it does so
    through its own sharded path, frozen base weights included, with no option to leave them out
    (a save-state pre-hook only sees the non-FSDP weights). The trainer writes the gates and their
    optimizer state itself, so the two lists are hidden from accelerate for the call."""
    models, optimizers = accelerator._models, accelerator._optimizers
    accelerator._models, accelerator._optimizers = [], []
    try:
        yield
    finally:
        accelerator._models, accelerator._optimizers = models, optimizers
