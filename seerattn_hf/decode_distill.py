"""Decode-gate distillation inside the registered attention function (SeerAttention-R).

Every query token of a training sequence acts as a decoding step: its target is its dense attention
pooled over each complete key block before its own block (the decode selector's candidates) and
renormalized (`ops.decode_pooled_attn`): "block_max" (the default, the paper's) max-pools it over
the block and the GQA group, "block_mass" sums it over the block and averages over the group (the
attention a kept block preserves, `DecodeDistillSettings.target`); the decode gate scores the same
candidates from the token's pre-RoPE query and the blocks' pooled pre-RoPE keys, exactly as it does
at decoding time. The loss of a layer is the mean KL(target || gate) over the covered tokens (the
last `token_share` of each sequence) and KV heads.

A target is `[B, HKV, TQ, NB]`, which at 32k tokens is far larger than the prefill map: with
`on_layer_loss` set, each layer hands its loss over (the trainer back-propagates it at once, the gate
inputs being detached from the frozen model) and keeps only the detached value, so no two layers'
targets or gate graphs are alive together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .blocks import num_blocks, pool_blocks_padded
from .decode_gate import SeerDecodeGate
from .ops.decode_pooled_attn import check_decode_target, naive_decode_pooled_attention, triton_decode_pooled_attention

DISTILL_KINDS = ("prefill", "decode")


@dataclass
class DecodeDistillSettings:
    """How a layer distils its decode gate. token_share: the share of each sequence's last tokens the
    loss covers (the paper: 0.5). on_layer_loss: called with the layer's differentiable loss (a
    scalar), e.g. to back-propagate it at once; the record then keeps only its value. target: the
    decode target, one of `ops.decode_pooled_attn.DECODE_TARGETS` ("block_max": each token's attention max-pooled over a
    block and the GQA group; "block_mass": its mass on the block, averaged over the group)."""

    token_share: float = 0.5
    on_layer_loss: Callable[[torch.Tensor], None] | None = None
    target: str = "block_max"

    def __post_init__(self):
        check_decode_target(self.target)


@dataclass
class DecodeDistillRecord:
    """What one layer's decode distillation produced in one forward.

    kl: the layer's loss, detached. target: `[B, HKV, TQ, NB]` float32 (rows over candidates summing
    to 1) and gate_log_probs: `[B, HKV, TQ, NB]` float32 (-inf outside the candidates), detached, and
    rows: `[B, TQ]` bool (tokens with at least one candidate), kept only without `on_layer_loss`
    (evaluation); None otherwise.
    """

    layer_idx: int
    kl: torch.Tensor
    target: torch.Tensor | None = None
    gate_log_probs: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def first_loss_query(length: int, token_share: float) -> int:
    """The first position of the covered tokens: the last `ceil(token_share * length)` of the sequence."""
    return length - max(1, math.ceil(token_share * length))


def decode_pooled_attention(query, key, value, block_size, scale, seq_offsets, first_query,
                            backend: str, target: str = "block_max") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention `[B, T, HQ, D]` and the decode target `[B, HKV, TQ, NB]` of kind `target`: the
    Triton kernel on CUDA (unless the backend is "torch"), the torch reference otherwise."""
    use_triton = query.is_cuda and backend != "torch"
    implementation = triton_decode_pooled_attention if use_triton else naive_decode_pooled_attention
    return implementation(query, key, value, block_size, scale=scale, seq_offsets=seq_offsets,
                          first_query=first_query, target=target)


def decode_gate_log_probs(gate: SeerDecodeGate, captured_query: torch.Tensor, captured_key: torch.Tensor,
                          seq_offsets: torch.Tensor | None, first_query: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode gate's log-probabilities over each token's candidate blocks.

    captured_query: `[B, T, HQ, D]`, captured_key: `[B, T, HKV, D]` pre-RoPE states. Returns
    `[B, HKV, TQ, NB]` float32 for the tokens t >= first_query (-inf outside the candidates; 0 in rows
    without one) and `rows: [B, TQ]` bool, the tokens with at least one candidate block.
    """
    # float32 as at decoding time, also under a training run's autocast
    with torch.autocast(captured_key.device.type, enabled=False):
        return _decode_gate_log_probs(gate, captured_query, captured_key, seq_offsets, first_query)


def _decode_gate_log_probs(gate, captured_query, captured_key, seq_offsets, first_query):
    batch, length = captured_key.shape[:2]
    size = gate.config.block_size
    blocks = num_blocks(length, size)
    device = captured_key.device
    pooled = pool_blocks_padded(captured_key, list(gate.config.k_pooling), size, seq_offsets).transpose(1, 2)
    block_starts = (torch.arange(blocks, device=device) * size).expand(batch, blocks)
    gate_keys = gate.keys(pooled, block_starts)  # [B, HKV, NB, h]
    offsets = torch.zeros(batch, dtype=torch.long, device=device) if seq_offsets is None else seq_offsets.long()
    positions = torch.arange(first_query, length, device=device)[None, :] - offsets[:, None]  # from the start
    gate_queries = gate.queries(captured_query[:, first_query:], positions.clamp(min=0))
    scores = gate.scores(gate_queries, gate_keys)  # [B, HKV, TQ, NB]
    own_block = torch.where(positions >= 0, positions // size, 0)
    candidates = torch.arange(blocks, device=device) < own_block[..., None]  # [B, TQ, NB]
    rows = own_block > 0
    allowed = candidates | ~rows[..., None]  # rows without a candidate: any finite row, weighted 0
    return scores.masked_fill(~allowed[:, None], float("-inf")).log_softmax(dim=-1), rows


def decode_layer_kl(target: torch.Tensor, gate_log_probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over KV heads and the `rows` `[B, TQ]` of KL(target || gate) (a scalar); entries where the
    target is 0 (non-candidates) contribute 0."""
    safe_log_gate = gate_log_probs.masked_fill(target <= 0, 0.0)
    kl = (torch.xlogy(target, target) - target * safe_log_gate).sum(dim=-1)  # [B, HKV, TQ]
    weights = rows[:, None].expand_as(kl).to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp(min=1.0)


def decode_distill_attention(module: nn.Module, layer_idx: int, settings: DecodeDistillSettings | None,
                             query, key, value, captured_query, captured_key, scale: float,
                             seq_offsets, backend: str) -> tuple[torch.Tensor, DecodeDistillRecord]:
    """One layer's dense attention output `[B, T, HQ, D]` and its decode distillation record.

    query: `[B, HQ, T, D]` post-RoPE, key/value: `[B, HKV, T, D]`; captured_query / captured_key: the
    pre-RoPE states `[B, T, H, D]` (detached).
    """
    settings = settings or DecodeDistillSettings()
    gate: SeerDecodeGate = module.seer_decode_gate
    first = first_loss_query(query.shape[2], settings.token_share)
    with torch.no_grad():
        output, target = decode_pooled_attention(query, key, value, gate.config.block_size, scale, seq_offsets,
                                                 first, backend, settings.target)
    gate_log_probs, rows = decode_gate_log_probs(gate, captured_query, captured_key, seq_offsets, first)
    kl = decode_layer_kl(target, gate_log_probs, rows)
    if settings.on_layer_loss is not None:
        settings.on_layer_loss(kl)
        return output, DecodeDistillRecord(layer_idx, kl.detach())
    return output, DecodeDistillRecord(layer_idx, kl.detach(), target, gate_log_probs.detach(), rows)
