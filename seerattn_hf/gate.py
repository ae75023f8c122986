"""The SeerAttention gate: block-pooled, pre-RoPE queries and keys -> block attention probabilities."""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import pool_query_blocks, query_block_diagonals
from .gate_config import GateConfig
from .ops.gate_scores import naive_gate_projection, naive_gate_scores, triton_gate_projection, triton_gate_scores


def gate_weight_shapes(config: GateConfig, num_heads: int, num_kv_heads: int,
                       head_dim: int) -> dict[str, tuple[int, ...]]:
    """The parameters (name -> shape) of one layer's gate in a model with these attention heads.

    Raises `ValueError` when the layout cannot fit the model: without a Q projection the pooled query
    is the gate query, so the gate width must be the model's head_dim.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    hidden = config.gate_hidden_size
    shapes = {}
    if config.q_projection:
        shapes["q_weight"] = (num_heads, head_dim * len(config.q_pooling), hidden)
    elif hidden != head_dim:
        raise ValueError(f"GateConfig.gate_hidden_size: expected the model's head_dim {head_dim} with "
                         f"q_projection=False (the pooled query is the gate query), found {hidden}")
    k_heads = num_kv_heads if config.k_projection == "kv_head" else num_heads
    shapes["k_weight"] = (k_heads, head_dim * len(config.k_pooling), hidden)
    return shapes


# Longest prompt (key positions) whose gate projection runs fused; longer ones take the torch path.
FUSED_PROJECTION_MAX_TOKENS = 16384


class SeerGate(nn.Module):
    """The gate of one attention layer.

    Parameters are per-head linear maps, kept in float32 whatever the model's dtype:
    `q_weight: [HQ, D * len(q_pooling), h]` (absent with `q_projection=False`) and
    `k_weight: [HK, D * len(k_pooling), h]`, HK = HKV (`k_projection="kv_head"`) or HQ ("query_head").
    Block-level RoPE uses the base model's rope parameters recomputed for the gate width `h`,
    at the position of each block's first token. The gate computes in float32 or, with
    `compute_dtype="model"`, in the dtype of the query states it is given.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, config: GateConfig,
                 rope_inv_freq: torch.Tensor, rope_scaling: float = 1.0):
        super().__init__()
        shapes = gate_weight_shapes(config, num_heads, num_kv_heads, head_dim)
        if rope_inv_freq.shape != (config.gate_hidden_size // 2,):
            raise ValueError(f"rope_inv_freq should have shape ({config.gate_hidden_size // 2},), "
                             f"found {tuple(rope_inv_freq.shape)}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size = config.block_size
        self.q_pooling, self.k_pooling = list(config.q_pooling), list(config.k_pooling)
        self.k_projection, self.compute_dtype = config.k_projection, config.compute_dtype
        self.q_weight = nn.Parameter(torch.empty(shapes["q_weight"])) if "q_weight" in shapes else None
        self.k_weight = nn.Parameter(torch.empty(shapes["k_weight"]))
        self.register_buffer("rope_inv_freq", rope_inv_freq.float(), persistent=False)
        self.rope_scaling = rope_scaling
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The fan-in uniform initialisation of nn.Linear, per head.
        for weight in self.parameters():
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)

    def projected(self, query: torch.Tensor, key: torch.Tensor, seq_offsets: torch.Tensor | None = None,
                  fused: bool = False):
        """The gate's queries `[B, HQ, R, h]` and keys `[B, HK, NB, h]` before block RoPE, in the
        compute dtype, and each query row's diagonal key block `[B, R]` (arguments as for `forward`)."""
        batch, query_length, key_length = query.shape[0], query.shape[1], key.shape[1]
        if (query.shape[2:] != (self.num_heads, self.head_dim) or key.shape[2:] != (self.num_kv_heads, self.head_dim)
                or key.shape[0] != batch or query_length > key_length):
            raise ValueError(
                f"gate expects query [B, TQ, {self.num_heads}, {self.head_dim}] and key "
                f"[B, T >= TQ, {self.num_kv_heads}, {self.head_dim}], found {tuple(query.shape)} and {tuple(key.shape)}")
        dtype = query.dtype if self.compute_dtype == "model" else torch.float32
        diagonal, _ = query_block_diagonals(query_length, key_length, self.block_size, seq_offsets, batch,
                                            query.device)
        # The fused projection wins on short prompts only (H200, 8B shape: 0.34 against 0.98 ms at 8k,
        # 1.40 against 1.05 ms at 32k: scripts/bench_gate.py); it computes in float32 from float32 weights
        # (a gate cast with its model, `model.to(torch.bfloat16)`, is read in float32 here).
        if fused and dtype == torch.float32 and key_length <= FUSED_PROJECTION_MAX_TOKENS:
            def project(x, weight, *args):
                return triton_gate_projection(x, weight.float(), *args)
        else:
            project = naive_gate_projection
        if self.q_weight is None:
            gate_q = pool_query_blocks(query, self.q_pooling, self.block_size, key_length, seq_offsets)
            gate_q = gate_q.to(dtype).transpose(1, 2)
        else:
            gate_q = project(query, self.q_weight, self.q_pooling, self.block_size, key_length, seq_offsets, dtype)
        # With k_projection="query_head" the map has a weight per query head, each reading its KV head.
        gate_k = project(key, self.k_weight, self.k_pooling, self.block_size, key_length, seq_offsets, dtype)
        return gate_q, gate_k, diagonal

    def block_scores(self, query: torch.Tensor, key: torch.Tensor,
                     seq_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, HQ, R, NB]` gate scores `q . k * h ** -0.5` in the compute dtype, -inf above each
        row's diagonal block (arguments as for `forward`)."""
        return naive_gate_scores(*self.projected(query, key, seq_offsets), self.rope_inv_freq, self.block_size,
                                 self.rope_scaling)

    def forward(self, query: torch.Tensor, key: torch.Tensor, seq_offsets: torch.Tensor | None = None,
                probabilities: bool = False, fused: bool = False) -> torch.Tensor:
        """Block attention log-probabilities, or probabilities.

        Args:
            query: `[B, TQ, HQ, D]` pre-RoPE query states of the last TQ <= T positions (TQ < T: a
                chunk continued from a cache, its rows as `blocks.query_block_diagonals` orders them).
            key: `[B, T, HKV, D]` pre-RoPE key states.
            seq_offsets: `[B]` left-padding lengths, or None.
            probabilities: return the softmax in the compute dtype (what sparse prefill selects
                from; the published gates threshold their bf16 softmax) instead of float32
                log-probabilities (what distillation trains).
            fused: the Triton kernels (pooling with the per-head maps, then block RoPE, scores and
                softmax); inference only (no gradient) and float32 compute only, else the torch path runs.
        Returns:
            `[B, HQ, R, NB]` over key blocks (R = NB for a whole prompt), zero probability (-inf
            log-probability) above each row's diagonal block. Rows of blocks that lie wholly in
            padding hold finite values to be ignored.
        """
        normalize = "softmax" if probabilities else "log_softmax"
        fused = fused and not (torch.is_grad_enabled() and self.k_weight.requires_grad)
        gate_q, gate_k, diagonal = self.projected(query, key, seq_offsets, fused)
        if fused and gate_q.dtype == torch.float32:
            return triton_gate_scores(gate_q, gate_k, diagonal, self.rope_inv_freq, self.block_size,
                                      self.rope_scaling, normalize)
        return naive_gate_scores(gate_q, gate_k, diagonal, self.rope_inv_freq, self.block_size, self.rope_scaling,
                                 normalize)
