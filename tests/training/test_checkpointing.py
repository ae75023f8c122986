"""Checkpoints: safetensors and JSON only, nothing unpickled on resume, `latest` confined to the run
folder, and every piece of trainer state (optimizer, scheduler, grad scaler, RNG) restored exactly."""

from __future__ import annotations

import copy
import json
import os
import random
import shlex
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import tiny_run_args

from seerattn_hf.training import checkpointing
from seerattn_hf.training.arguments import parse_arguments
from seerattn_hf.training.checkpointing import resolve_checkpoint
from seerattn_hf.training.cli import run
from seerattn_hf.training.trainer import Trainer

CHECKPOINT_FILES = {"gates", "gate_optimizer.safetensors", "gate_optimizer.json", "scheduler.json",
                    "rng_state_0.json", "trainer_state.json"}


class RunsAShellCommandWhenUnpickled:
    """What a crafted pickle can do: `__reduce__` names any callable, called while unpickling."""

    def __init__(self, marker):
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def finished_run(tiny_checkpoint, jsonl_corpus, tmp_path_factory):
    """A 2-step run folder with checkpoint-1 and checkpoint-2 (`latest`)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    run(tiny_run_args(tiny_checkpoint, jsonl_corpus, folder, max_steps=2, save_steps=1, eval_steps=0))
    return folder


def copy_of(run_folder, tmp_path):
    copied = tmp_path / "run"
    shutil.copytree(run_folder, copied)
    return copied


def test_a_checkpoint_is_safetensors_and_json_only(finished_run):
    checkpoint = finished_run / "checkpoints" / "checkpoint-2"
    assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES
    for path in (p for p in checkpoint.rglob("*") if p.is_file()):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(str(path))
        else:
            assert path.relative_to(checkpoint).as_posix() == "gates/README.md"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state == {"step": 2, "global_batch": 4, "seq_len": 128, "micro_batches_per_process": 4,
                     "num_processes": 1}
    assert "lr_lambdas" not in json.loads((checkpoint / "scheduler.json").read_text())


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "gate_optimizer.pt"])
def test_resume_refuses_a_checkpoint_holding_a_pickle_and_never_loads_it(planted, finished_run, tiny_checkpoint,
                                                                         jsonl_corpus, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    marker = tmp_path / "the pickle ran"
    torch.save(RunsAShellCommandWhenUnpickled(marker), folder / "checkpoints" / "checkpoint-2" / planted)
    with pytest.raises(ValueError, match=f"found pickle files in .*checkpoint-2: \\['{planted}'\\]"):
        run(tiny_run_args(tiny_checkpoint, jsonl_corpus, folder, max_steps=3, save_steps=1, eval_steps=0,
                          resume_from_checkpoint="latest"))
    assert not marker.exists()


def test_latest_must_name_a_checkpoint_folder_inside_the_run(finished_run, tmp_path):
    elsewhere = copy_of(finished_run, tmp_path / "elsewhere")
    outside = elsewhere / "checkpoints" / "checkpoint-2"
    folder = copy_of(finished_run, tmp_path)
    root = folder / "checkpoints"
    assert resolve_checkpoint("latest", str(folder)) == root / "checkpoint-2"

    for pointer in (str(outside), "../../elsewhere/run/checkpoints/checkpoint-2",
                    "checkpoint-2/../../../elsewhere/run/checkpoints/checkpoint-2"):
        (root / "latest").write_text(pointer + "\n")
        with pytest.raises(ValueError, match="expected .*latest to name a checkpoint-<step> folder inside"):
            resolve_checkpoint("latest", str(folder))

    (root / "checkpoint-9").symlink_to(outside, target_is_directory=True)
    (root / "latest").write_text("checkpoint-9\n")
    with pytest.raises(ValueError, match="expected .*checkpoint-9 to be a folder inside .*, found a link to"):
        resolve_checkpoint("latest", str(folder))

    # Named explicitly, a checkpoint elsewhere is resumed.
    assert resolve_checkpoint(str(outside), str(folder)) == outside


class Recording(Trainer):
    """Keeps a copy of the optimizer's and scheduler's state and of the random generators at each checkpoint."""

    def save_checkpoint(self):
        self.saved = {"optimizer": copy.deepcopy(self.optimizer.optimizer.state_dict()),
                      "scheduler": self.scheduler.state_dict(), "rng": checkpointing.rng_state()}
        return super().save_checkpoint()


def assert_same_optimizer_state(found: dict, expected: dict):
    def listed(groups):  # torch's set_optimizer_state_dict itself turns AdamW's betas tuple into a list
        return [{key: list(value) if isinstance(value, tuple) else value for key, value in group.items()}
                for group in groups]

    assert listed(found["param_groups"]) == listed(expected["param_groups"])
    assert found["state"].keys() == expected["state"].keys()
    for index, entries in expected["state"].items():
        assert entries.keys() == found["state"][index].keys()
        for key, tensor in entries.items():
            assert torch.equal(found["state"][index][key], tensor) and found["state"][index][key].dtype == tensor.dtype


def test_resume_restores_optimizer_scheduler_and_random_generators_exactly(tiny_checkpoint, jsonl_corpus, tmp_path):
    folder = tmp_path / "run"
    arguments = tiny_run_args(tiny_checkpoint, jsonl_corpus, folder, max_steps=3, save_steps=3, eval_steps=0)
    writer = Recording(parse_arguments(arguments))
    writer.train()

    # (The new trainer seeds the generators: other states than at the checkpoint.)
    reader = Trainer(parse_arguments(arguments + ["--resume_from_checkpoint", "latest"]))
    assert checkpointing.rng_state() != writer.saved["rng"]
    reader.load_checkpoint(reader.resume_path)
    assert reader.step == 3
    assert_same_optimizer_state(reader.optimizer.optimizer.state_dict(), writer.saved["optimizer"])
    assert reader.scheduler.state_dict()["_last_lr"] == writer.saved["scheduler"]["_last_lr"]
    assert {k: v for k, v in reader.scheduler.state_dict().items() if k != "lr_lambdas"} == \
           {k: v for k, v in writer.saved["scheduler"].items() if k != "lr_lambdas"}
    assert checkpointing.rng_state() == writer.saved["rng"]


def test_scheduler_state_round_trips_through_json_and_keeps_its_own_lr_lambdas(tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    def schedule():
        parameter = torch.nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.AdamW([parameter], lr=0.1)
        return get_cosine_schedule_with_warmup(optimizer, 2, 10)

    trained, fresh = schedule(), schedule()
    for _ in range(4):
        trained.optimizer.step()
        trained.step()
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps(checkpointing.scheduler_state(trained)))
    assert "lr_lambdas" not in json.loads(path.read_text())
    functions = list(fresh.lr_lambdas)
    checkpointing.load_scheduler_state(fresh, path)
    assert fresh.lr_lambdas == functions
    assert fresh.state_dict() == trained.state_dict()
    for _ in range(6):
        for scheduler in (trained, fresh):
            scheduler.optimizer.step()
            scheduler.step()
        assert fresh.get_last_lr() == trained.get_last_lr()

    path.write_text(json.dumps({**checkpointing.scheduler_state(trained), "optimizer": None}))
    with pytest.raises(ValueError, match=r"expected keys of LambdaLR.state_dict\(\) \[.*\], last_epoch among them; "
                                         r"found \[.*'optimizer'"):
        checkpointing.load_scheduler_state(fresh, path)


def test_random_generators_round_trip_through_json(tmp_path):
    def draws():
        return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()

    np.random.randn()  # numpy now caches a gaussian
    path = tmp_path / "rng_state_0.json"
    path.write_text(json.dumps(checkpointing.rng_state()))
    expected = draws()
    checkpointing.restore_rng_state(json.loads(path.read_text()), path)
    assert draws() == expected
    with pytest.raises(ValueError, match="rng_state_0.json: expected the random generator states"):
        checkpointing.restore_rng_state({"python": {}}, path)


def test_grad_scaler_state_is_saved_and_required_when_a_scaler_is_used(finished_run, tiny_checkpoint, jsonl_corpus,
                                                                        tmp_path):
    # fp16 mixed precision needs a GPU; a CPU GradScaler stands in for accelerate's.
    folder = copy_of(finished_run, tmp_path)
    arguments = tiny_run_args(tiny_checkpoint, jsonl_corpus, folder, max_steps=2, eval_steps=0,
                              resume_from_checkpoint="latest")
    writer = Trainer(parse_arguments(arguments))
    writer.load_checkpoint(writer.resume_path)
    writer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7)
    writer.save_checkpoint()
    saved = json.loads((folder / "checkpoints" / "checkpoint-2" / "grad_scaler.json").read_text())
    assert saved == writer.accelerator.scaler.state_dict() and saved["scale"] == 256.0
    assert saved["growth_interval"] == 7

    reader = Trainer(parse_arguments(arguments))
    reader.accelerator.scaler = torch.amp.GradScaler("cpu")
    reader.load_checkpoint(reader.resume_path)
    assert reader.accelerator.scaler.state_dict() == saved

    (folder / "checkpoints" / "checkpoint-2" / "grad_scaler.json").unlink()
    with pytest.raises(FileNotFoundError, match="expected the grad scaler's state in grad_scaler.json, found none"):
        reader.load_checkpoint(reader.resume_path)
