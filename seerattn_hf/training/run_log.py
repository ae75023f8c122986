"""What a run records as it goes: the JSON-lines log of the run folder and the experiment trackers."""

from __future__ import annotations

import importlib.util
import json
import logging
import resource
from pathlib import Path

import torch

from ..utils import atomic_write_text
from .arguments import Arguments

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"


class JsonLog:
    """Append-only JSON-lines log, written by the main process."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")

    def drop_records_after(self, step: int) -> None:
        """Keep the records of steps up to `step` only, rewriting the file atomically: a run resumed from
        the checkpoint of `step` logs the later steps again. A line that is not a JSON record with a step
        (one cut off when the run was killed) is dropped with a warning."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or type(record.get("step")) is not int:
                logger.warning("%s line %d: expected a JSON record with an integer step, found %.80r; dropped",
                               self.path, number, line)
            elif record["step"] <= step:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))


def tracker_names(report_to: list[str]) -> list[str] | str:
    """accelerate's `log_with` for `--report_to` ("auto": TensorBoard when it is installed)."""
    if "none" in report_to:
        return []
    if "all" in report_to:
        return "all"
    names = [name for name in report_to if name != "auto"]
    if "auto" in report_to and importlib.util.find_spec("tensorboard") is not None:
        names.append("tensorboard")
    return sorted(set(names))


def tracker_config(arguments: Arguments) -> dict:
    # TensorBoard's hparams take scalars and strings only.
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in arguments.to_dict().items()}


def tracker_scalars(prefix: str, metrics: dict) -> dict:
    """`metrics` flattened to `{prefix + name: number}` for the trackers (nested dicts as `name/key`)."""
    values = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            values.update({f"{prefix}{key}/{k}": v for k, v in value.items()})
        elif value is not None:
            values[f"{prefix}{key}"] = value
    return values


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
