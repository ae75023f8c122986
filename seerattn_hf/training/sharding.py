"""Full gate tensors out of a model whose parameters FSDP shards, without gathering the base model.

Under FSDP2 (`fully_shard`, the only FSDP the trainer supports) every parameter is a DTensor sharded
on its first dimension, the gates with the frozen weights of their decoder layer; `full_tensor()`
all-gathers one parameter, so what leaves the shards is the gates only (29M float32 values for
Llama-3.1-8B), never the base model. Every rank must call `full_gate_state` (a collective).
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapter import gate_tensors
from ..patching import patched_attention_modules


def full_gate_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every gate tensor, float32 on the CPU, keyed as in the adapter file (`layers.{i}.{name}`), on
    every rank; sharded (DTensor) gates are gathered one tensor at a time."""
    from torch.distributed.tensor import DTensor

    state = {}
    for attention in patched_attention_modules(model):
        for key, tensor in gate_tensors(attention).items():
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            state[key] = full.detach().float().cpu().contiguous()
    return state
