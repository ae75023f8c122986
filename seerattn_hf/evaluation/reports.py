"""Result files shared by the evaluation scripts: JSON with the run's environment, markdown tables."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch


def environment() -> dict:
    """Versions and hardware, stored with every result so numbers can be compared later."""
    import transformers

    import seerattn_hf

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "seerattn_hf": seerattn_hf.__version__,
            "command": " ".join(sys.argv), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: str | Path, values: dict) -> Path:
    from seerattn_hf.utils import atomic_write_text

    atomic_write_text(path, json.dumps(values, indent=2, sort_keys=False) + "\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    from seerattn_hf.utils import atomic_write_text

    atomic_write_text(path, text)
    return Path(path)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are written with 4 significant digits, None as an empty cell."""
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def relative_change(value: float | None, reference: float | None) -> str | None:
    """'+2.4%' style change of `value` over `reference`."""
    if value is None or reference is None:
        return None
    change = round(100.0 * (value / reference - 1.0), 1)
    return f"{change + 0.0:+.1f}%"  # + 0.0 turns -0.0 into 0.0
