"""Checkpoints of a training run: their folder layout, writing and reading them, pruning old ones.

Run folder (`output_dir`):
    checkpoints/checkpoint-<step>/   one resumable state per `--save_steps`
    checkpoints/latest               a text file naming the newest checkpoint folder

A checkpoint holds what the run changes and nothing of the frozen base model, in the same form
whether or not the model is sharded. It is safetensors and JSON only, so that resuming never
unpickles anything (a crafted pickle runs code when loaded):
    gates/                        the gate adapter (seer_gates.safetensors, seer_config.json)
    gate_optimizer.safetensors    the gates' optimizer state, full tensors keyed "<parameter name>/<entry>"
    gate_optimizer.json           the optimizer's param groups (hyperparameters, parameter names)
    scheduler.json                the learning-rate scheduler's counters and rates (not its functions)
    rng_state_<rank>.json         the random generators of each process: python, numpy, torch CPU and CUDA
    grad_scaler.json              with fp16 mixed precision only: the loss scale and its growth counter
    trainer_state.json            step, data position and the data settings a resume must match
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..adapter import load_gate_weights, save_gates
from ..utils import atomic_write_safetensors, atomic_write_text, fsync_directory

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
GATES = "gates"
OPTIMIZER_TENSORS = "gate_optimizer.safetensors"
OPTIMIZER_GROUPS = "gate_optimizer.json"
SCHEDULER = "scheduler.json"
GRAD_SCALER = "grad_scaler.json"
TRAINER_STATE = "trainer_state.json"
REQUIRED = (TRAINER_STATE, GATES, OPTIMIZER_TENSORS, OPTIMIZER_GROUPS, SCHEDULER)
# What pickle-based savers write (accelerate's save_state in earlier versions of this trainer:
# custom_checkpoint_0.pkl, random_states_<rank>.pkl, scaler.pt; torch.save: gate_optimizer.pt).
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin")
CHECKPOINT_NAME = re.compile(r"checkpoint-([0-9]+)")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def rng_state_file(process_index: int) -> str:
    return f"rng_state_{process_index}.json"


def checkpoint_step(name: str) -> int | None:
    """The step of a folder named checkpoint-<step>, None for any other name."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class TrainerState:
    """trainer_state.json. A resume skips `step` x accumulation batches per process (the data position;
    `micro_batches_per_process` records it as written), which are the sequences already trained on
    only when `global_batch` and `seq_len` match."""

    step: int
    global_batch: int
    seq_len: int
    micro_batches_per_process: int
    num_processes: int

    @classmethod
    def read(cls, path: Path) -> TrainerState:
        values = _read_json_object(path)
        names = [field.name for field in dataclasses.fields(cls)]
        wrong = {name: values.get(name) for name in names if type(values.get(name)) is not int}
        if wrong:
            raise ValueError(f"{path}: expected integers {names}, found {wrong}")
        return cls(**{name: values[name] for name in names})


# Finding a checkpoint ---------------------------------------------------------------------------

def resolve_checkpoint(spec: str, output_dir: str | os.PathLike) -> Path:
    """The checkpoint folder named by `--resume_from_checkpoint`: "latest" (the folder that
    checkpoints/latest names, which must lie directly inside this run's checkpoints/) or a path.

    Refused: a folder missing one of the files a resume reads, and a folder holding pickle files,
    which this trainer never loads (a checkpoint of an earlier version, or a planted file)."""
    path = _latest_checkpoint(output_dir) if spec == LATEST else Path(spec)
    pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"--resume_from_checkpoint: expected a checkpoint of safetensors and JSON files only, "
                         f"found pickle files in {path}: {pickles}. They are never loaded (unpickling can run "
                         "code); a checkpoint written by accelerate's save_state (earlier versions of this "
                         "trainer) cannot be resumed: start a new run")
    missing = [name for name in REQUIRED if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a checkpoint of this trainer (expected "
                                f"{', '.join(REQUIRED)}; missing {missing})")
    return path


def _latest_checkpoint(output_dir: str | os.PathLike) -> Path:
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint latest: expected {pointer} (written with each "
                                f"checkpoint), found no checkpoint in {root}")
    name = pointer.read_text(encoding="utf-8").strip()
    path = root / name
    # The pointer names a folder of this run only: a checkpoint from anywhere else (an absolute path,
    # "..", a link out of the folder) is resumed only when its path is given explicitly.
    if checkpoint_step(name) is None:
        raise ValueError(f"--resume_from_checkpoint latest: expected {pointer} to name a checkpoint-<step> "
                         f"folder inside {root}, found {name!r}; pass a checkpoint elsewhere explicitly as "
                         "--resume_from_checkpoint PATH")
    if path.resolve() != root.resolve() / name:
        raise ValueError(f"--resume_from_checkpoint latest: expected {path} to be a folder inside {root}, found "
                         f"a link to {path.resolve()}; pass a checkpoint elsewhere explicitly as "
                         "--resume_from_checkpoint PATH")
    return path


# Writing ----------------------------------------------------------------------------------------

def save_checkpoint(accelerator, output_dir: str | os.PathLike, state: TrainerState, model, optimizer, scheduler,
                    save_total_limit: int | None) -> Path:
    """Write checkpoint-<step> atomically: into a hidden temporary folder, renamed when complete, then
    point `latest` at it (also atomically) and prune old ones beyond `save_total_limit`. Every process
    calls it. A failed write removes the temporary folder; the next save removes those of a killed run.

    `model` is the prepared model, `optimizer` the torch optimizer of the gates (not accelerate's wrapper)."""
    root = checkpoint_root(output_dir)
    final, temporary = root / f"checkpoint-{state.step}", root / f".checkpoint-{state.step}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*.tmp"):  # left by a run killed while writing a checkpoint or `latest`
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        temporary.mkdir()
    accelerator.wait_for_everyone()
    try:
        _write_json(temporary / rng_state_file(accelerator.process_index), rng_state(), indent=None)
        optimizer_state = _optimizer_state_dict(model, optimizer)
        if accelerator.is_main_process:
            save_gates(accelerator.unwrap_model(model), temporary / GATES)  # whole on every process, FSDP included
            _write_optimizer_state(temporary, optimizer_state)
            _write_json(temporary / SCHEDULER, scheduler_state(scheduler))
            if accelerator.scaler is not None:
                _write_json(temporary / GRAD_SCALER, accelerator.scaler.state_dict())
            _write_json(temporary / TRAINER_STATE, dataclasses.asdict(state))
    except BaseException:
        if accelerator.is_main_process:  # a failed write (a full disk): no partial checkpoint is kept
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    # Every process writes its own RNG state into the temporary folder: all must be done before
    # the main process renames it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_directory(temporary)  # its files were flushed as they were written
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        atomic_write_text(root / LATEST, final.name + "\n")  # (also makes the rename above durable)
        _prune_checkpoints(root, save_total_limit, keep=state.step)
    accelerator.wait_for_everyone()
    return final


def _prune_checkpoints(root: Path, limit: int | None, keep: int) -> None:
    """Remove the oldest checkpoints beyond `limit`, never checkpoint-<keep> (the one `latest` names,
    which a new run in the folder of a longer one writes below that run's steps)."""
    if limit is None:
        return
    others = sorted((step for step in (checkpoint_step(p.name) for p in root.iterdir() if p.is_dir())
                     if step is not None and step != keep), reverse=True)
    for step in others[limit - 1:]:
        shutil.rmtree(root / f"checkpoint-{step}")


def _optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer state of the gates as full tensors keyed by parameter name (the same for one
    process, DDP, FSDP1 and FSDP2; under FSDP only the gates' state is gathered), complete on the
    main process. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _write_optimizer_state(folder: Path, optimizer_state: dict) -> None:
    tensors = {}
    for name, entries in optimizer_state["state"].items():
        for entry, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state of {name}: expected tensors, found {entry}={value!r}")
            tensors[f"{name}/{entry}"] = value.contiguous()
    atomic_write_safetensors(folder / OPTIMIZER_TENSORS, tensors)
    _write_json(folder / OPTIMIZER_GROUPS, {"param_groups": optimizer_state["param_groups"]})


def scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """The scheduler's state_dict without its lr lambdas: the schedule's functions are rebuilt from the
    arguments on resume, never read from a checkpoint."""
    state = scheduler.state_dict()
    del state["lr_lambdas"]
    return state


def _write_json(path: Path, value, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=True) + "\n")


# Reading ----------------------------------------------------------------------------------------

def load_checkpoint_gates(path: Path, model) -> None:
    """The checkpoint's gates into the patched `model`, before accelerate prepares it: FSDP then shards
    the restored gates like fresh ones, no scatter needed."""
    load_gate_weights(model, path / GATES)


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler, global_batch: int,
                    seq_len: int) -> TrainerState:
    """Restore the optimizer, scheduler, grad scaler and this process's RNG state from checkpoint
    `path` (its gates were loaded before prepare, `load_checkpoint_gates`); returns the trainer state.
    Every process calls it; `model` and `optimizer` as for `save_checkpoint`.

    Refused when the checkpoint was written with another sequence length or global batch: the data
    position would not name the same sequences."""
    state = TrainerState.read(path / TRAINER_STATE)
    different = {key: (found, expected) for key, found, expected in
                 (("global_batch", state.global_batch, global_batch), ("seq_len", state.seq_len, seq_len))
                 if found != expected}
    if different:
        raise ValueError(f"{path} was written by a run with other data settings; (checkpoint, now): {different}. "
                         "Resume with the same seq_len and global batch (batch x accumulation x processes)")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # The optimizer state is resharded like the gates. (The torch optimizer, not accelerate's wrapper:
    # torch's helpers create missing state with one zero-gradient step, which the wrapper would skip.)
    set_optimizer_state_dict(model, optimizer, _read_optimizer_state(path),
                             options=StateDictOptions(full_state_dict=True))
    load_scheduler_state(scheduler, path / SCHEDULER)
    if accelerator.scaler is not None:
        scaler_file = path / GRAD_SCALER
        if not scaler_file.is_file():
            raise FileNotFoundError(f"{path}: fp16 mixed precision scales the loss: expected the grad scaler's "
                                    f"state in {GRAD_SCALER}, found none (the checkpoint was written without fp16)")
        accelerator.scaler.load_state_dict(_read_json_object(scaler_file))
    rng_file = path / rng_state_file(accelerator.process_index)
    if rng_file.is_file():
        restore_rng_state(_read_json_object(rng_file), rng_file)
    else:
        logger.warning("%s holds no %s (written by %d processes): process %d keeps the generators seeded "
                       "with --seed", path, rng_file.name, state.num_processes, accelerator.process_index)
    return state


def _read_optimizer_state(folder: Path) -> dict:
    groups_file = folder / OPTIMIZER_GROUPS
    groups = _read_json_object(groups_file).get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
        raise ValueError(f"{groups_file}: expected {{\"param_groups\": [one object per group]}}, found "
                         f"param_groups={groups!r:.200}")
    state: dict[str, dict] = {}
    for key, tensor in load_file(str(folder / OPTIMIZER_TENSORS)).items():
        name, separator, entry = key.rpartition("/")
        if not (separator and name and entry):
            raise ValueError(f"{folder / OPTIMIZER_TENSORS}: expected tensor names \"<parameter name>/<entry>\", "
                             f"found {key!r}")
        state.setdefault(name, {})[entry] = tensor
    return {"state": state, "param_groups": groups}


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, path: Path) -> None:
    """Load what `scheduler_state` wrote; the scheduler keeps its own lr lambdas.

    Keys the scheduler does not have are refused (they would become its attributes); keys it has and
    the file lacks (a checkpoint of an older torch) keep their values, except the schedule position."""
    state = _read_json_object(path)
    known = set(scheduler_state(scheduler))
    if not set(state) <= known or "last_epoch" not in state:
        raise ValueError(f"{path}: expected keys of {type(scheduler).__name__}.state_dict() {sorted(known)}, "
                         f"last_epoch among them; found {sorted(state)}")
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})  # None: left as built


def _read_json_object(path: Path) -> dict:
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


# Random generators ------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's random generators as JSON values: python's `random`, numpy's global generator,
    torch's CPU generator and, with CUDA, the generator of every device."""
    python_version, python_internal, python_gauss = random.getstate()
    numpy_kind, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {"python": {"version": python_version, "internal": list(python_internal), "gauss_next": python_gauss},
             "numpy": {"kind": numpy_kind, "keys": numpy_keys.tolist(), "position": numpy_position,
                       "has_gauss": numpy_has_gauss, "cached_gaussian": numpy_gauss},
             "torch_cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["torch_cuda"] = [device_state.tolist() for device_state in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict, path: Path) -> None:
    """Set the generators to what `rng_state` returned (read from `path`, named in errors)."""
    try:
        python, numpy_state = state["python"], state["numpy"]
        random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
        np.random.set_state((numpy_state["kind"], np.array(numpy_state["keys"], dtype=np.uint32),
                             numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
        if "torch_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(device_state, dtype=torch.uint8)
                                          for device_state in state["torch_cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: expected the random generator states that rng_state() writes (python, numpy, "
                         f"torch_cpu, torch_cuda), found one that cannot be restored: {error!r}") from error
