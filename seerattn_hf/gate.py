"""The SeerAttention gate: block-pooled, pre-RoPE queries and keys -> block attention probabilities."""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import pool_blocks_padded
from .gate_config import GateConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class SeerGate(nn.Module):
    """The gate of one attention layer.

    Parameters are per-head linear maps `q_weight: [HQ, D * len(q_pooling), h]` and
    `k_weight: [HKV, D * len(k_pooling), h]`, kept in float32 whatever the model's dtype.
    Block-level RoPE uses the base model's rope parameters recomputed for the gate width `h`,
    at the position of each block's first token.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, config: GateConfig,
                 rope_inv_freq: torch.Tensor, rope_scaling: float = 1.0):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if rope_inv_freq.shape != (config.gate_hidden_size // 2,):
            raise ValueError(f"rope_inv_freq should have shape ({config.gate_hidden_size // 2},), "
                             f"found {tuple(rope_inv_freq.shape)}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size = config.block_size
        self.q_pooling, self.k_pooling = list(config.q_pooling), list(config.k_pooling)
        hidden = config.gate_hidden_size
        self.q_weight = nn.Parameter(torch.empty(num_heads, head_dim * len(self.q_pooling), hidden))
        self.k_weight = nn.Parameter(torch.empty(num_kv_heads, head_dim * len(self.k_pooling), hidden))
        self.register_buffer("rope_inv_freq", rope_inv_freq.float(), persistent=False)
        self.rope_scaling = rope_scaling
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The fan-in uniform initialisation of nn.Linear, per head.
        for weight in (self.q_weight, self.k_weight):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)

    def _block_rope(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32) * self.block_size
        freqs = positions[:, None] * self.rope_inv_freq.to(x.device)[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos() * self.rope_scaling, angles.sin() * self.rope_scaling
        return x * cos + rotate_half(x) * sin

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                seq_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Block attention log-probabilities.

        Args:
            query: `[B, T, HQ, D]` pre-RoPE query states.
            key: `[B, T, HKV, D]` pre-RoPE key states.
            seq_offsets: `[B]` left-padding lengths, or None.
        Returns:
            `[B, HQ, NB, NB]` float32 log-probabilities over key blocks, -inf above the block
            diagonal. Rows of blocks that lie wholly in padding hold finite values to be ignored.
        """
        batch, length = query.shape[:2]
        if query.shape[2:] != (self.num_heads, self.head_dim) or key.shape[2:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"gate expects query [B, T, {self.num_heads}, {self.head_dim}] and key "
                f"[B, T, {self.num_kv_heads}, {self.head_dim}], found {tuple(query.shape)} and {tuple(key.shape)}")
        pooled_q = pool_blocks_padded(query, self.q_pooling, self.block_size, seq_offsets)
        pooled_k = pool_blocks_padded(key, self.k_pooling, self.block_size, seq_offsets)
        gate_q = self._block_rope(torch.einsum("bnhi,hio->bhno", pooled_q, self.q_weight))
        gate_k = self._block_rope(torch.einsum("bnhi,hio->bhno", pooled_k, self.k_weight))
        blocks, hidden = gate_q.shape[-2], gate_q.shape[-1]
        groups = self.num_heads // self.num_kv_heads
        gate_q = gate_q.view(batch, self.num_kv_heads, groups, blocks, hidden)
        scores = gate_q @ gate_k.unsqueeze(2).transpose(-1, -2) / math.sqrt(hidden)
        scores = scores.view(batch, self.num_heads, blocks, blocks)
        above_diagonal = torch.ones(blocks, blocks, dtype=torch.bool, device=scores.device).triu(1)
        return scores.masked_fill(above_diagonal, float("-inf")).log_softmax(dim=-1)
