"""Run by test_distributed.py under `accelerate launch --num_processes 2 --cpu`: train a tiny model,
then each rank writes the SHA-256 of its gate weights to <output_dir>/gates-rank<i>.txt."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import seerattn_hf as sa
from seerattn_hf.training.arguments import parse_arguments
from seerattn_hf.training.trainer import Trainer
from worker_exit import end_process


def main() -> None:
    trainer = Trainer(parse_arguments(sys.argv[1:]))
    trainer.train()
    digest = hashlib.sha256()
    for parameter in sa.gate_parameters(trainer.base):
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    rank = trainer.accelerator.process_index
    output = Path(trainer.arguments.train.output_dir) / f"gates-rank{rank}.txt"
    output.write_text(f"{trainer.accelerator.num_processes} {digest.hexdigest()}\n", encoding="utf-8")
    del trainer  # freed while the interpreter is alive
    end_process()


if __name__ == "__main__":
    main()
