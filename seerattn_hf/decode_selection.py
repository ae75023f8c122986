"""Decode-time block selection: for each generated token, which KV blocks it reads (one list per
KV head, shared by the GQA group's query heads).

Candidates are the complete blocks before the token's own block; the token's block is always kept
(read densely, as its keys are still arriving), the first (sink) block optionally. Scores come from
the decode gate, the true attention (oracle: its block max; oracle_mass: its block mass), the Quest
bound or position (streaming), and become
kept-block lists by a token budget (top `budget / block_size - 1` candidates) or a threshold.
"""

from __future__ import annotations

import math

import torch

DECODE_SELECTORS = ("gate", "oracle", "oracle_mass", "quest", "streaming")
DECODE_SPARSITY_METHODS = ("token_budget", "threshold")


def blocked_slots(current_block: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """`[B, 1, NB]` bool: the block slots that are not candidates (each sequence's current block and
    every later slot)."""
    return torch.arange(num_blocks, device=current_block.device) >= current_block.view(-1, 1, 1)


def candidate_mask(current_block: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """`[B, 1, NB]` bool: the complete blocks before each sequence's current block."""
    return ~blocked_slots(current_block, num_blocks)


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, without dispatching a no-op cast when it is already (the decoding hot path
    counts host operations)."""
    return x if x.dtype == torch.float32 else x.float()


def _pooled_attention(query, keys, seq_offsets, seq_lens, block_size, num_blocks, scale, mass: bool):
    """The new token's attention probabilities pooled per key block: max over the GQA group, then
    over the block's keys (mass=False), or mean over the group, then summed over the block."""
    batch, heads, dim = query.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    positions = torch.arange(capacity, device=keys.device)[None, :] - seq_offsets[:, None]  # from the start
    valid = (positions >= 0) & (positions < seq_lens[:, None])
    grouped = query.float().view(batch, kv_heads, heads // kv_heads, dim)
    logits = torch.einsum("bkgd,bksd->bkgs", grouped, keys.float()) * scale
    probs = logits.masked_fill(~valid[:, None, None], float("-inf")).softmax(dim=-1)  # [B, HKV, G, S]
    probs = probs.mean(dim=2) if mass else probs.amax(dim=2)  # [B, HKV, S]
    block = (positions.clamp(min=0) // block_size).clamp(max=num_blocks - 1)
    pooled = probs.new_zeros(batch, kv_heads, num_blocks)
    index = block[:, None, :].expand(batch, kv_heads, capacity)
    return pooled.scatter_reduce(2, index, probs.masked_fill(~valid[:, None], 0.0), reduce="sum" if mass else "amax")


def oracle_scores(query: torch.Tensor, keys: torch.Tensor, seq_offsets: torch.Tensor, seq_lens: torch.Tensor,
                  block_size: int, num_blocks: int, scale: float) -> torch.Tensor:
    """The true attention of the new token, max-pooled over each key block and over the GQA group:
    `[B, HKV, NB]` (the "block_max" decode distillation target). query: `[B, HQ, D]`; keys: `[B, HKV, S, D]`."""
    return _pooled_attention(query, keys, seq_offsets, seq_lens, block_size, num_blocks, scale, mass=False)


def oracle_mass_scores(query: torch.Tensor, keys: torch.Tensor, seq_offsets: torch.Tensor, seq_lens: torch.Tensor,
                       block_size: int, num_blocks: int, scale: float) -> torch.Tensor:
    """The true attention mass of the new token on each key block, averaged over the GQA group:
    `[B, HKV, NB]` (the "block_mass" decode distillation target). The group shares one selection,
    and the mass it keeps, summed over the group's heads, is G times the sum of these scores over
    the kept blocks: their top-k keeps the most of it at a token budget. query: `[B, HQ, D]`;
    keys: `[B, HKV, S, D]`."""
    return _pooled_attention(query, keys, seq_offsets, seq_lens, block_size, num_blocks, scale, mass=True)


def quest_scores(query: torch.Tensor, key_max: torch.Tensor, key_min: torch.Tensor) -> torch.Tensor:
    """The Quest upper bound of q.k over each block (per channel the larger of q*max and q*min),
    maxed over the GQA group: `[B, HKV, NB]`. query: `[B, HQ, D]` post-RoPE; key_max/min: `[B, HKV, NB, D]`."""
    batch, heads, dim = query.shape
    kv_heads = key_max.shape[1]
    grouped = as_float32(query).view(batch, kv_heads, heads // kv_heads, 1, dim)
    bound = torch.maximum(grouped * as_float32(key_max)[:, :, None], grouped * as_float32(key_min)[:, :, None])
    return bound.sum(dim=-1).amax(dim=2)


def streaming_scores(batch: int, kv_heads: int, num_blocks: int, device) -> torch.Tensor:
    """A ranking by recency: later blocks first."""
    return torch.arange(num_blocks, device=device, dtype=torch.float32).expand(batch, kv_heads, num_blocks)


def decode_block_lists(scores: torch.Tensor, current_block: torch.Tensor, block_size: int, method: str,
                       token_budget: int, threshold: float, keep_first_block: bool,
                       probabilities: bool, blocked: torch.Tensor | None = None,
                       current_column: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept-block lists of one decoding step.

    scores: `[B, HKV, NB]` over block slots (higher is better); current_block: `[B]`, each sequence's
    block holding the new token. probabilities: whether `scores` are logits to soft-max over the
    candidates (gate) or already a distribution / ranking (for the threshold method: oracle scores are
    normalised over the candidates). Returns `block_idx: [B, HKV, K]` int32 (the kept blocks first,
    the current block among them) and `block_count: [B, HKV]` int32.

    blocked (`[B, 1, NB]` bool, `blocked_slots(current_block, NB)`) and
    current_column (`[B, 1, 1]` int32, `current_block`) may be given precomputed: they are the same
    in every layer of a decoding step.
    """
    batch, kv_heads, num_blocks = scores.shape
    if blocked is None:
        blocked = blocked_slots(current_block, num_blocks)
    if current_column is None:
        current_column = current_block.view(-1, 1, 1).to(torch.int32)
    ranked = as_float32(scores).masked_fill(blocked, float("-inf"))
    if method == "token_budget":
        width = min(max(token_budget // block_size - 1, 0), num_blocks)
        keep_score = ranked
    else:
        if probabilities:
            weights = ranked.softmax(dim=-1)
        else:
            weights = ranked.clamp(min=0).masked_fill(blocked, 0.0)
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-30)
        weights = torch.nan_to_num(weights, nan=0.0)
        keep_score = torch.where(~blocked & (weights > threshold), weights, float("-inf"))
        width = num_blocks
    if keep_first_block and num_blocks:
        sink = torch.where(blocked[..., :1], keep_score[..., :1], float("inf"))
        keep_score = torch.cat((sink, keep_score[..., 1:]), dim=-1)
    if not width:
        block_idx = current_column.expand(batch, kv_heads, 1)
        return block_idx.contiguous(), torch.ones(batch, kv_heads, dtype=torch.int32, device=scores.device)
    top, index = keep_score.topk(width, dim=-1)
    chosen = (top > float("-inf")).sum(dim=-1, dtype=torch.int32)  # [B, HKV]
    # Slot j < chosen holds the j-th kept block, every later slot (the last one always) the current block.
    padded = torch.nn.functional.pad(index.to(torch.int32), (0, 1))
    slots = torch.arange(width + 1, device=scores.device, dtype=torch.int32)
    block_idx = torch.where(slots < chosen[..., None], padded, current_column)
    return block_idx, chosen + 1


__all__ = ["DECODE_SELECTORS", "DECODE_SPARSITY_METHODS", "as_float32", "blocked_slots", "candidate_mask",
           "decode_block_lists", "oracle_mass_scores", "oracle_scores", "quest_scores", "streaming_scores"]
