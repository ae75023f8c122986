"""Torch reference of the gate: block pooling with the per-head maps, then block RoPE, block scores
and their softmax (the spec of the Triton kernels, and the gate's own computation)."""

from __future__ import annotations

import torch

from ...blocks import pool_query_blocks
from ...rope import rotate_half

NORMALIZATIONS = ("none", "softmax", "log_softmax")


def block_rope(x: torch.Tensor, blocks: torch.Tensor, inv_freq: torch.Tensor, block_size: int,
               rope_scaling: float = 1.0) -> torch.Tensor:
    """Rotate `x: [B, H, N, h]` to the first token of blocks `blocks: [B or 1, N]`, in x's dtype (cos
    and sin are computed in float32 and rounded to it, as transformers' rotary embeddings do)."""
    positions = blocks.to(device=x.device, dtype=torch.float32)[:, None] * block_size
    freqs = positions[..., None] * inv_freq.to(x.device)
    angles = torch.cat((freqs, freqs), dim=-1)
    cos = (angles.cos() * rope_scaling).to(x.dtype)
    sin = (angles.sin() * rope_scaling).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def naive_gate_scores(gate_q: torch.Tensor, gate_k: torch.Tensor, diagonal: torch.Tensor, inv_freq: torch.Tensor,
                      block_size: int, rope_scaling: float = 1.0, normalize: str = "none") -> torch.Tensor:
    """Block scores of the gate's projected (not yet rotated) queries and keys.

    Args:
        gate_q: `[B, HQ, R, h]` one gate query per query-block row.
        gate_k: `[B, HK, NB, h]` one gate key per key block, HQ % HK == 0 (query head i reads key
            head i // (HQ // HK)).
        diagonal: `[B or 1, R]` int: the key block on each row's diagonal (`blocks.query_block_diagonals`).
        inv_freq: `[h / 2]` rope inverse frequencies; rows rotate to `diagonal * block_size`, keys to
            `j * block_size`, both scaled by `rope_scaling`.
        normalize: "none" (scores), "softmax" (probabilities in the inputs' dtype) or "log_softmax"
            (float32).
    Returns:
        `[B, HQ, R, NB]`: `q . k * h ** -0.5` (normalized over key blocks), -inf (probability 0)
        above each row's diagonal.
    """
    batch, heads, rows, hidden = gate_q.shape
    key_heads, blocks = gate_k.shape[1], gate_k.shape[2]
    gate_q = block_rope(gate_q, diagonal, inv_freq, block_size, rope_scaling)
    gate_k = block_rope(gate_k, torch.arange(blocks, device=gate_k.device)[None], inv_freq, block_size, rope_scaling)
    # Each gate key head serves a group of query heads.
    grouped = gate_q.reshape(batch, key_heads, heads // key_heads, rows, hidden)
    scores = (grouped @ gate_k.unsqueeze(2).transpose(-1, -2)) * hidden ** -0.5
    scores = scores.view(batch, heads, rows, blocks)
    above_diagonal = torch.arange(blocks, device=scores.device) > diagonal.to(scores.device)[:, None, :, None]
    scores = scores.masked_fill(above_diagonal, float("-inf"))
    if normalize == "softmax":
        return scores.softmax(dim=-1)
    if normalize == "log_softmax":
        return scores.float().log_softmax(dim=-1)
    return scores


def naive_gate_projection(x: torch.Tensor, weight: torch.Tensor, kinds: list[str], block_size: int, key_length: int,
                          seq_offsets: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The gate's queries or keys before block RoPE: `x` pooled per block, then mapped per head.

    Args:
        x: `[B, TX, H, D]` pre-RoPE states of the last TX of `key_length` positions (TX == key_length
            for keys and whole prompts; rows as `blocks.pool_query_blocks` orders them).
        weight: `[HW, D * len(kinds), h]`; HW == H, or a multiple of it (output head i reads input
            head i // (HW // H): pooled keys repeated to the query heads).
        kinds: pooling kinds in the order of weight's rows ("avg", "max", "min").
        seq_offsets: `[B]` left padding or None. dtype: the compute dtype (pooling accumulates in
            float32, the pooled states are rounded once to it).
    Returns:
        `[B, HW, R, h]` in `dtype`; rows past a sequence's end are zero.
    """
    pooled = pool_query_blocks(x, kinds, block_size, key_length, seq_offsets).to(dtype)
    if weight.shape[0] != x.shape[2]:
        pooled = pooled.repeat_interleave(weight.shape[0] // x.shape[2], dim=2)
    return torch.einsum("bnhi,hio->bhno", pooled, weight.to(dtype))
