"""Run by test_fsdp.py under `accelerate launch` with an FSDP config and ACCELERATE_USE_CPU: train a
tiny model with its parameters sharded by FSDP on the CPU (gloo), then
    each rank writes the SHA-256 of its full gate tensors to <output_dir>/gates-rank<i>.txt, and
    rank 0 writes the full base-model state after training to <output_dir>/base_after.safetensors.

accelerate (1.15) uses FSDP only on accelerators: on the CPU it silently runs plain data parallel
(MULTI_CPU) whatever the config says. torch's FSDP itself runs on the CPU with gloo, so this worker
promotes accelerate's state to FSDP when the config asked for it, and places the model on device
`cpu` (accelerate's `cpu:0` is rejected by FSDP1 as inconsistent with the compute device `cpu`).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from worker_exit import end_process

_original_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Into PartialState's shared state too: every later AcceleratorState() copies it over its own.
        promoted = {"distributed_type": DistributedType.FSDP, "device": torch.device("cpu")}
        PartialState._shared_state.update(promoted)
        self.__dict__.update(promoted, fsdp_plugin=fsdp_plugin)


AcceleratorState.__init__ = _init_with_fsdp_on_cpu


def record(trainer) -> None:
    """Per-rank gate hashes and the gathered base weights, written just before the trainer's `_finish`
    (which ends the process group)."""
    from safetensors.torch import save_file

    from seerattn_hf.adapter import gate_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gates = gate_state_dict(trainer.base)
    digest = hashlib.sha256()
    for key in sorted(gates):
        digest.update(key.encode() + gates[key].numpy().tobytes())
    accelerator = trainer.accelerator
    output = Path(trainer.arguments.train.output_dir)
    (output / f"gates-rank{accelerator.process_index}.txt").write_text(
        f"{accelerator.num_processes} {trainer.fsdp_version} {digest.hexdigest()}\n", encoding="utf-8")
    # The whole model, gathered once here (the trainer itself never does): the base weights must
    # be the loaded ones.
    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in state.items() if "seer_gate" not in k},
                  str(output / "base_after.safetensors"))


def main() -> None:
    from seerattn_hf.training.arguments import parse_arguments
    from seerattn_hf.training.trainer import Trainer

    class Checked(Trainer):
        def _finish(self, final_eval):
            record(self)
            return super()._finish(final_eval)

    trainer = Checked(parse_arguments(sys.argv[1:]))
    if trainer.accelerator.distributed_type != DistributedType.FSDP:
        raise RuntimeError(f"expected an FSDP run, found {trainer.accelerator.distributed_type}")
    trainer.train()
    del trainer  # freed while the interpreter is alive
    end_process()


if __name__ == "__main__":
    main()
