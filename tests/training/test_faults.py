"""Faults while files are written: a kill or a full disk in the middle of `save_gates` or of a
checkpoint. What must hold: the previous files stay whole and readable, nothing half written appears
under a real name, no temporary is left once the writer has finished or failed (the hidden
temporaries of a killed checkpoint write are removed by the next checkpoint; a killed `save_gates`
can leave one beside the adapter), and a run resumed from `latest` ends with the same gates, bit for
bit, as an uninterrupted one. docs/reliability.md lists the outcomes.

A kill during a training step: test_trainer.py::test_killed_and_resumed_run_ends_with_the_same_gates.
A kill here is a forked child that ends with `os._exit` half way through a file write: no `except` or
`finally` runs, as after SIGKILL. A full disk is an `OSError(ENOSPC)` (naming no file, as the kernel's
does) from the write itself or from the flush (`os.fsync`: filesystems that allocate late report it there).
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_helpers import tiny_model, tiny_run_args

import seerattn_hf as sa
from seerattn_hf.adapter import CONFIG_NAME, WEIGHTS_NAME, gate_state_dict
from seerattn_hf.training.checkpointing import resolve_checkpoint
from seerattn_hf.training.cli import run

KILLED = 86  # exit status of a child that died at its fault
ADAPTER_FILES = (WEIGHTS_NAME, CONFIG_NAME, "README.md")
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds open files through /proc")


# Faults -------------------------------------------------------------------------------------------

def written_file(name: str, inside: str | None = None, text: str | None = None):
    """Selects the writes of file `name`, or of atomic_path's temporary for it (`.<name>.<random>.tmp`),
    in a folder named `inside` and with content `text` when given."""
    def matches(path: Path, data) -> bool:
        return ((path.name == name or path.name.startswith(f".{name}.")) and (inside is None or inside in path.parts)
                and (text is None or data == text))
    return matches


def break_writes(monkeypatch, matches, action, at: str = "write") -> None:
    """Make the writes that `matches(path, data)` selects fail: at "write", half the data reaches the
    file, then `action(path)` raises or ends the process; at "fsync", the flush of the file does
    (`data` is then None)."""
    if at == "fsync":
        real_fsync = os.fsync

        def fsync(descriptor):
            path = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
            if matches(path, None):
                action(path)
            return real_fsync(descriptor)

        monkeypatch.setattr(os, "fsync", fsync)
        return
    real_write_bytes, real_write_text = Path.write_bytes, Path.write_text

    def write_bytes(self, data):
        if matches(self, data):
            real_write_bytes(self, data[:len(data) // 2])
            action(self)
        return real_write_bytes(self, data)

    def write_text(self, data, encoding=None, errors=None, newline=None):
        if matches(self, data):
            real_write_text(self, data[:len(data) // 2], encoding, errors, newline)
            action(self)
        return real_write_text(self, data, encoding, errors, newline)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text", write_text)


def no_space_left(path: Path):
    raise OSError(errno.ENOSPC, NO_SPACE)


def killed_in_a_write(matches, work, *args) -> int | None:
    """Run `work(*args)` in a forked child that dies in the middle of the write `matches` selects;
    returns the child's exit status (KILLED when the fault was reached; else its output is printed)."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as output:
        child = multiprocessing.get_context("fork").Process(target=_die_in_a_write,
                                                            args=(matches, output.name, work, args))
        child.start()
        child.join(timeout=120)
        if child.exitcode is None:
            child.kill()
            child.join()
        if child.exitcode != KILLED:
            print(output.read())
    return child.exitcode


def _die_in_a_write(matches, output: str, work, args) -> None:
    sys.stdout = sys.stderr = open(output, "w", buffering=1)
    break_writes(pytest.MonkeyPatch(), matches, lambda path: os._exit(KILLED))
    work(*args)
    os._exit(0)


# Folders ------------------------------------------------------------------------------------------

def is_hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def file_bytes(folder: Path, hidden: bool = True) -> dict[str, bytes]:
    """Every file under `folder` (with `hidden=False`, none under a name starting with a dot) and its bytes."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and (hidden or not is_hidden(path, folder))}


def file_contents(folder: Path, hidden: bool = True) -> dict[str, object]:
    """`file_bytes`, a safetensors file read as its metadata and tensors (its header lists the metadata
    in any order: safetensors serializes it from a hash map)."""
    contents = file_bytes(folder, hidden)
    for name in (name for name in contents if name.endswith(".safetensors")):
        with safe_open(str(folder / name), framework="pt") as tensors:
            contents[name] = (tensors.metadata(), {key: (tensor.dtype, tuple(tensor.shape), tensor.numpy().tobytes())
                                                   for key, tensor in load_file(str(folder / name)).items()})
    return contents


def hidden_entries(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if is_hidden(path, folder))


def gates(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS_NAME))


def assert_same_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == found.keys()
    for key in expected:
        assert torch.equal(expected[key], found[key]), key


# save_gates ---------------------------------------------------------------------------------------

@pytest.fixture
def saved_adapter(tmp_path):
    """(model, folder, files, tensors): a patched tiny model whose gates were saved to `folder` (`files`:
    its files' bytes, `tensors`: the gates saved) and have changed since, so that a new save would
    write other tensors."""
    model = tiny_model("llama")
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, gate_hidden_size=16))
    folder = sa.save_gates(model, tmp_path / "adapter")
    tensors = {key: tensor.clone() for key, tensor in gate_state_dict(model).items()}
    with torch.no_grad():
        for parameter in sa.gate_parameters(model):
            parameter.add_(1.0)
    return model, folder, file_bytes(folder), tensors


def assert_adapter_unchanged(folder: Path, files: dict[str, bytes], tensors: dict[str, torch.Tensor],
                             hidden: bool = True) -> None:
    """The folder holds exactly the files it held (`hidden=False`: leftover hidden temporaries aside),
    and they load as the old gates."""
    assert file_bytes(folder, hidden) == files
    assert_same_tensors(tensors, gate_state_dict(sa.from_pretrained(folder, model=tiny_model("llama"))))


@pytest.mark.parametrize("at", ["write", "fsync"])
@pytest.mark.parametrize("name", ADAPTER_FILES)
def test_a_full_disk_in_save_gates_leaves_the_previous_adapter(saved_adapter, name, at, monkeypatch):
    model, folder, files, tensors = saved_adapter
    break_writes(monkeypatch, written_file(name), no_space_left, at)
    with pytest.raises(OSError, match=rf"\[Errno {errno.ENOSPC}\] {NO_SPACE}: '{re.escape(str(folder / name))}'"):
        sa.save_gates(model, folder)
    monkeypatch.undo()
    assert_adapter_unchanged(folder, files, tensors)


@pytest.mark.parametrize("name", ADAPTER_FILES)
def test_save_gates_killed_half_way_leaves_the_previous_adapter(saved_adapter, name):
    model, folder, files, tensors = saved_adapter
    assert killed_in_a_write(written_file(name), sa.save_gates, model, folder) == KILLED
    # A kill leaves no chance to clean up: a hidden temporary may remain, ignored by every reader.
    assert_adapter_unchanged(folder, files, tensors, hidden=False)
    assert all(entry.endswith(".tmp") for entry in hidden_entries(folder))


# Checkpoints --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, jsonl_corpus, tmp_path_factory):
    """A 6-step run folder with checkpoint-2, checkpoint-4 and checkpoint-6, never interrupted."""
    folder = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(tiny_run_args(tiny_checkpoint, jsonl_corpus, folder))
    return folder


def assert_checkpoints_match(folder: Path, uninterrupted: Path, latest: str) -> None:
    """checkpoints/latest names checkpoint `latest`, and every visible checkpoint file holds what the
    uninterrupted run's does: nothing half written is visible, the previous checkpoints are whole."""
    root, expected = folder / "checkpoints", uninterrupted / "checkpoints"
    assert (root / "latest").read_text(encoding="utf-8") == latest + "\n"
    found = file_contents(root, hidden=False)
    del found["latest"]
    assert found == {key: value for key, value in file_contents(expected).items() if key in found}
    assert f"{latest}/trainer_state.json" in found


def assert_resumes_exactly(folder: Path, uninterrupted: Path, arguments: list[str]) -> None:
    """Resumed from `latest`, the run ends with the uninterrupted run's gates and checkpoints, bit for bit,
    and no temporary is left.

    The random generators' files aside: the resumed run's data loader draws its base seed from torch's
    generator after the restore, the uninterrupted run's before checkpoint-2, one draw apart (no step
    draws from that generator: the gates agree)."""
    summary = run(arguments + ["--resume_from_checkpoint", "latest"])
    assert summary["step"] == 6
    assert_same_tensors(gates(uninterrupted), gates(folder))
    resumed, expected = (file_contents(run_folder / "checkpoints") for run_folder in (folder, uninterrupted))
    assert resumed.keys() == expected.keys()
    assert {key: value for key, value in resumed.items() if "rng_state_" not in key} == \
           {key: value for key, value in expected.items() if "rng_state_" not in key}
    assert hidden_entries(folder) == []


KILL_POINTS = {
    # Killed while writing checkpoint-4's optimizer state into its temporary folder.
    "optimizer state": written_file("gate_optimizer.safetensors", inside=".checkpoint-4.tmp"),
    # Killed after checkpoint-4 was renamed into place, while `latest` was being rewritten to name it.
    "latest": written_file("latest", text="checkpoint-4\n"),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_run_killed_while_writing_a_checkpoint_resumes_exactly(point, uninterrupted, tiny_checkpoint,
                                                                 jsonl_corpus, tmp_path):
    folder = tmp_path / "run"
    arguments = tiny_run_args(tiny_checkpoint, jsonl_corpus, folder)
    assert killed_in_a_write(KILL_POINTS[point], run, arguments) == KILLED
    assert_checkpoints_match(folder, uninterrupted, latest="checkpoint-2")
    visible = sorted(path.name for path in (folder / "checkpoints").iterdir() if not path.name.startswith("."))
    assert visible == (["checkpoint-2", "latest"] if point == "optimizer state" else
                       ["checkpoint-2", "checkpoint-4", "latest"])
    assert resolve_checkpoint("latest", folder).name == "checkpoint-2"
    # The killed writer's hidden temporaries are removed by the next checkpoint.
    assert_resumes_exactly(folder, uninterrupted, arguments)


@pytest.mark.parametrize("at", ["write", "fsync"])
def test_a_full_disk_while_writing_a_checkpoint_is_reported_and_resumes_exactly(at, uninterrupted, tiny_checkpoint,
                                                                               jsonl_corpus, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    arguments = tiny_run_args(tiny_checkpoint, jsonl_corpus, folder)
    break_writes(monkeypatch, written_file("gate_optimizer.safetensors", inside=".checkpoint-4.tmp"),
                 no_space_left, at)
    with pytest.raises(OSError, match=rf"\[Errno {errno.ENOSPC}\] {NO_SPACE}: '.*/\.checkpoint-4\.tmp/gate_optimizer"):
        run(arguments)
    monkeypatch.undo()
    assert_checkpoints_match(folder, uninterrupted, latest="checkpoint-2")
    assert sorted(path.name for path in (folder / "checkpoints").iterdir()) == ["checkpoint-2", "latest"]
    assert hidden_entries(folder) == []  # the failed checkpoint's temporary folder is gone
    assert_resumes_exactly(folder, uninterrupted, arguments)


def test_latest_names_a_checkpoint_that_exists_after_pruning(tiny_checkpoint, jsonl_corpus, tmp_path):
    # A new run in the folder of an earlier, longer one: its checkpoint-2 is the newest it wrote,
    # older than the earlier run's checkpoint-4. Pruning keeps the checkpoint `latest` names.
    folder = tmp_path / "run"
    run(tiny_run_args(tiny_checkpoint, jsonl_corpus, folder, max_steps=4, eval_steps=0, save_total_limit=1))
    run(tiny_run_args(tiny_checkpoint, jsonl_corpus, folder, max_steps=2, eval_steps=0, save_total_limit=1))
    assert resolve_checkpoint("latest", folder).name == "checkpoint-2"
    assert sorted(path.name for path in (folder / "checkpoints").iterdir()) == ["checkpoint-2", "latest"]
